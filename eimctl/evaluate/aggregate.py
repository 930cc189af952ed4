"""Several runs at once: mean ± spread over runs of one recipe (seeds), and paired differences to a baseline.

Rows are eimctl.steps.report's ReportRow: `group` (the run folder's name: one recipe), `origin` (its
parent: one seed), `stage`, `benchmark`, `metrics` (0-1 caption metrics) and `diagnostics`.
"""
from __future__ import annotations

import math

from eimctl.evaluate.paired import paired_differences

# pycocoevalcap metrics (0-1 scale), in the order papers print them, with their headers.
CAPTION_METRICS = {"Bleu_1": "BLEU-1", "Bleu_2": "BLEU-2", "Bleu_3": "BLEU-3", "Bleu_4": "BLEU-4",
                   "METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr", "SPICE": "SPICE"}
# Headline figures of the other benchmarks, as they report them: ScienceQA's average accuracy, MME's sums.
HEADLINE_METRICS = {"Avg": "Avg acc", "perception": "Perception", "cognition": "Cognition"}
SCORED = {**CAPTION_METRICS, **HEADLINE_METRICS}
# What the aggregate table shows: (header, scale, decimals); caption metrics ×100 as papers print them.
AGGREGATED = {**{name: (f"{label} ×100", 100.0, 2) for name, label in CAPTION_METRICS.items()},
              **{name: (label, 1.0, 2) for name, label in HEADLINE_METRICS.items()},
              "val_nll": ("Val NLL", 1.0, 3), "image_use_gap": ("Image gap", 1.0, 3)}
# The summary's columns per benchmark: the first of these sets that the benchmark's rows have.
SUMMARY_COLUMNS = (("Bleu_4", "CIDEr"), ("Avg",), ("perception", "cognition"))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _figure(row, name: str):
    return row.metrics.get(name) if name in SCORED else (row.diagnostics or {}).get(name)


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def aggregate_rows(rows: list[ReportRow]) -> list[dict]:
    """Scored rows grouped by (run folder name, stage, benchmark): n, mean and sample std per metric.

    Runs of one recipe over several seeds (runs/seed-1/eim, runs/seed-2/eim, ...) share a group."""
    groups: dict[tuple[str, str, str], list[ReportRow]] = {}
    for row in rows:
        if row.benchmark != "-":
            groups.setdefault((row.group or row.run, row.stage, row.benchmark), []).append(row)
    out = []
    for (group, stage, benchmark), members in groups.items():
        stats = {}
        for name in AGGREGATED:
            values = [AGGREGATED[name][1] * value for value in map(lambda r: _figure(r, name), members)
                      if _is_number(value)]
            if values:
                mean = sum(values) / len(values)
                spread = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
                          if len(values) > 1 else 0.0)
                stats[name] = (mean, spread)
        seconds = [r.train_seconds for r in members if _is_number(r.train_seconds)]
        out.append({"group": group, "stage": stage, "benchmark": benchmark, "n": len(members), "metrics": stats,
                    "train_seconds": sum(seconds) / len(seconds) if seconds else None})
    return out


def aggregate_markdown(aggregated: list[dict]) -> str:
    names = [n for n in AGGREGATED if any(n in a["metrics"] for a in aggregated)]
    lines = ["| Recipe | Stage | Benchmark | n | " + " | ".join(AGGREGATED[n][0] for n in names)
             + " | Train time (mean) |",
             "|---|---|---|---:|" + "---:|" * len(names) + "---:|"]
    for a in aggregated:
        cells = [f"{a['metrics'][n][0]:.{AGGREGATED[n][2]}f} ± {a['metrics'][n][1]:.{AGGREGATED[n][2]}f}"
                 if n in a["metrics"] else "" for n in names]
        lines.append(f"| {a['group']} | {a['stage']} | {a['benchmark']} | {a['n']} | " + " | ".join(cells)
                     + f" | {format_seconds(a['train_seconds'])} |")
    return "\n".join(lines)


def paired_markdown(rows: list[ReportRow], baseline: tuple[str, str]) -> str:
    """Each configuration minus the baseline of the same seed: mean ± std over seeds, paired t-test."""
    paired = paired_differences(rows, baseline)
    if not paired:
        return f"No configuration shares a seed with the baseline {baseline[0]}/{baseline[1]}."
    lines = [f"| Recipe | Stage | Benchmark | pairs | " + " | ".join(
        f"Δ{CAPTION_METRICS[m]} ×100 | p" for m in ("Bleu_4", "CIDEr")) + " |", "|---|---|---|---:|" + "---:|---:|" * 2]
    for entry in paired:
        cells, n = [], 0
        for metric in ("Bleu_4", "CIDEr"):
            stats = entry["metrics"].get(metric)
            n = max(n, stats["n"]) if stats else n
            if stats is None:
                cells += ["", ""]
                continue
            spread = f" ± {stats['std']:.2f}" if stats["std"] is not None else ""
            cells += [f"{stats['mean']:+.2f}{spread}", f"{stats['p']:.3f}" if stats["p"] is not None else "n/a"]
        lines.append(f"| {entry['group']} | {entry['stage']} | {entry['benchmark']} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)




def _cell(stats: tuple[float, float] | None, n: int, decimals: int = 2) -> str:
    if stats is None:
        return ""
    return f"{stats[0]:.{decimals}f} ± {stats[1]:.{decimals}f}" if n > 1 else f"{stats[0]:.{decimals}f}"


def _delta(entry: dict, base: dict | None, paired: dict | None, metric: str) -> str:
    """Δ vs the baseline ×100: paired over seeds when the runs pair up, else the difference of means."""
    if paired and metric in paired["metrics"]:
        stats = paired["metrics"][metric]
        return f"{stats['mean']:+.2f}" + (f" ± {stats['std']:.2f}" if stats["std"] is not None else "")
    if base is None or metric not in entry["metrics"] or metric not in base["metrics"]:
        return ""
    return f"{entry['metrics'][metric][0] - base['metrics'][metric][0]:+.2f}"


def _summary_columns(entries: list[dict]) -> tuple[str, ...]:
    """The benchmark's headline metrics: BLEU-4 and CIDEr for captions, Avg for ScienceQA, MME's two sums."""
    for columns in SUMMARY_COLUMNS:
        if any(name in entry["metrics"] for entry in entries for name in columns):
            return tuple(name for name in columns if any(name in entry["metrics"] for entry in entries))
    return SUMMARY_COLUMNS[0]


def _label(name: str) -> str:
    header, scale, _ = AGGREGATED[name]
    return header if scale == 1.0 else header.replace(" ×100", "")


def _floor_lines(aggregated: list[dict], floors: set[str], benchmark: str, columns: tuple[str, ...]) -> list[str]:
    """One row per floor of the benchmark, once: its best single fixed caption, its controls (always (A), ...)."""
    first: dict[str, dict] = {}
    for entry in aggregated:
        if entry["benchmark"] in floors and entry["benchmark"].startswith(f"{benchmark} ("):
            first.setdefault(entry["benchmark"], entry)
    lines = []
    for name, floor in first.items():
        kind = name[len(benchmark) + 2:-1]
        label = "best single fixed caption" if kind == "fixed caption" else f"control: {kind}"
        lines.append(f"| {label} | | " + " | ".join(_cell(floor["metrics"].get(m), 1) for m in columns)
                     + " |" + " |" * (len(columns) + 2))
    return lines


def summary_markdown(rows, baseline: tuple[str, str]) -> str:
    """One compact table per benchmark in the paper's Table 4 shape: a row per configuration (run folder
    / stage), the benchmark's headline metrics (BLEU-4 and CIDEr, ScienceQA's Avg, MME's perception and
    cognition; mean ± std when several seeds), Δ vs the baseline, val NLL and image-use gap; the benchmark's
    floors (fixed caption, the task's controls) once each, last."""
    aggregated = aggregate_rows(rows)
    paired = {(p["group"], p["stage"], p["benchmark"]): p for p in paired_differences(rows, baseline)}
    floors = {row.benchmark for row in rows if row.is_baseline}   # fixed captions and the tasks' controls
    benchmarks = [name for name in dict.fromkeys(a["benchmark"] for a in aggregated) if name not in floors]
    blocks = []
    for benchmark in benchmarks:
        entries = [a for a in aggregated if a["benchmark"] == benchmark]
        columns = _summary_columns(entries)
        base = next((a for a in entries if (a["group"], a["stage"]) == baseline), None)
        datasets = sorted({row.dataset for row in rows if row.benchmark == benchmark and getattr(row, "dataset", "")})
        title = f"### {benchmark}" + (f" on {', '.join(datasets)}" if datasets else "")
        lines = [title, "", "| Configuration | n | " + " | ".join(AGGREGATED[m][0] for m in columns) + " | "
                 + " | ".join(f"Δ {_label(m)}" for m in columns) + " | Val NLL | Image gap |",
                 "|---|---:|" + "---:|" * (2 * len(columns) + 2)]
        for entry in entries:
            get = entry["metrics"].get
            deltas = ["baseline"] * len(columns) if entry is base else [
                _delta(entry, base, paired.get((entry["group"], entry["stage"], benchmark)), m) for m in columns]
            lines.append(f"| {entry['group']} / {entry['stage']} | {entry['n']} | "
                         + " | ".join(_cell(get(m), entry["n"]) for m in columns) + " | " + " | ".join(deltas)
                         + f" | {_cell(get('val_nll'), entry['n'], 3)} | "
                         f"{_cell(get('image_use_gap'), entry['n'], 3)} |")
        lines += _floor_lines(aggregated, floors, benchmark, columns)
        if base is None:
            lines += ["", f"(No baseline {baseline[0]}/{baseline[1]} among these runs: Δ left empty; "
                          "choose one with `eimctl report --baseline RUN:STAGE`.)"]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
