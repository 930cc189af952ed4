"""Paired comparisons over seeds: each configuration against a baseline trained with the same seed.

    differences = paired_differences(rows, baseline=("clipcap", "base"))

A pair is two scored rows from run folders that share a parent (runs/demo-seeds/seed-1/clipcap and
runs/demo-seeds/seed-1/eim): same seed, same data. For each metric the mean and sample standard
deviation of the differences over the pairs are given with a two-sided paired t-test (n - 1 degrees
of freedom). With three seeds the test has little power: read the p-value as a guide, not a verdict.
"""
from __future__ import annotations

import math


def _continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz method)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((qam + 2 * m) * (a + 2 * m)),
                          -(a + m) * (qab + m) * x / ((a + 2 * m) * (qap + 2 * m))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return result


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _continued_fraction(b, a, 1.0 - x) / b


def t_test_p_value(t: float, degrees: int) -> float:
    """Two-sided p-value of Student's t with `degrees` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return regularized_beta(degrees / (degrees + t * t), degrees / 2.0, 0.5)


def paired_summary(differences: list[float]) -> dict:
    """n, mean, sample std, t and two-sided p of paired differences (t and p need n >= 2)."""
    n = len(differences)
    mean = sum(differences) / n
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "t": None, "p": None}
    std = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
    t = mean / (std / math.sqrt(n)) if std > 0 else (math.inf if mean else 0.0)
    p = t_test_p_value(t, n - 1) if std > 0 or mean == 0 else 0.0
    return {"n": n, "mean": mean, "std": std, "t": t, "p": 1.0 if (std == 0 and mean == 0) else p}


def paired_differences(rows, baseline: tuple[str, str], metrics: tuple[str, ...] = ("Bleu_4", "CIDEr"),
                       scale: float = 100.0) -> list[dict]:
    """For every (run folder name, stage, benchmark) other than the baseline: paired statistics of
    `scale`·(metric − baseline's metric) over the parents (seeds) where both were scored."""
    scored = [r for r in rows if r.benchmark != "-" and not r.is_baseline]
    base = {(r.origin, r.benchmark): r for r in scored if (r.group, r.stage) == baseline}
    groups: dict[tuple[str, str, str], list] = {}
    for row in scored:
        if (row.group, row.stage) != baseline and (row.origin, row.benchmark) in base:
            groups.setdefault((row.group, row.stage, row.benchmark), []).append(row)
    out = []
    for (group, stage, benchmark), members in groups.items():
        stats = {}
        for metric in metrics:
            diffs = [scale * (r.metrics[metric] - base[(r.origin, benchmark)].metrics[metric]) for r in members
                     if _number(r.metrics.get(metric)) and _number(base[(r.origin, benchmark)].metrics.get(metric))]
            if diffs:
                stats[metric] = paired_summary(diffs)
        out.append({"group": group, "stage": stage, "benchmark": benchmark, "metrics": stats})
    return out


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
