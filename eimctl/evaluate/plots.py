"""The report's figures: each stage's loss curves, baseline-vs-EIM loss_base curves on one set of axes,
and a score bar chart with the seed spread. Matplotlib's object API (no pyplot state), PNGs written
atomically."""
from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure

from eimctl.evaluate.aggregate import CAPTION_METRICS
from eimctl.runtime.atomic import atomic_path


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _save(figure: Figure, path: Path) -> None:
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")


def _series(records: list[dict], key: str, x: str = "step") -> tuple[list, list]:
    points = [(record.get(x, index), record[key]) for index, record in enumerate(records)
              if _is_number(record.get(key))]
    return tuple(map(list, zip(*points))) if points else ([], [])


def plot_stage_losses(run: str, stage: str, records: list[dict], path: Path) -> bool:
    """Every loss_* / val_loss* series of one stage against the step; the total `loss` only when the
    stage has several losses (with one it is the same curve). False if there is nothing to plot."""
    keys = sorted({key for record in records for key, value in record.items()
                   if key.startswith(("loss", "val_loss")) and _is_number(value)})
    if len([k for k in keys if k.startswith("loss_")]) == 1 and "loss" in keys:
        keys.remove("loss")
    if not keys:
        return False
    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.add_subplot()
    for key in keys:
        steps, values = _series(records, key)
        # Validation losses come every few hundred steps: show the points, not just a line.
        axes.plot(steps, values, label=key, marker="o" if key.startswith("val_") or len(steps) < 20 else None)
    axes.set(xlabel="step", ylabel="loss", title=f"{run} — stage {stage}")
    axes.grid(alpha=0.3)
    axes.legend()
    _save(figure, path)
    return True


def _mean_lines(curves: dict[tuple[str, str], list[dict]], key: str, group_of: dict[str, str]) -> dict:
    """{"group / stage": (epochs, mean values)} over the runs of one recipe (several seeds) that logged `key`."""
    grouped: dict[str, list[tuple[list, list]]] = {}
    for (run, stage), records in curves.items():
        epochs, values = _series(records, key, x="epoch")
        if epochs:
            grouped.setdefault(f"{group_of.get(run, run)} / {stage}", []).append((epochs, values))
    lines = {}
    for label, series in grouped.items():
        length = min(len(values) for _, values in series)
        means = [sum(values[i] for _, values in series) / len(series) for i in range(length)]
        lines[label + (f" (mean of {len(series)})" if len(series) > 1 else "")] = (series[0][0][:length], means)
    return lines


def plot_loss_overlay(curves: dict[tuple[str, str], list[dict]], path: Path, key: str = "loss_base",
                      group_of: dict[str, str] | None = None, baseline: str = "") -> bool:
    """`key` of every stage that logged it on the same axes against the epoch (stages differ in steps);
    runs of one recipe (`group_of`: run -> run folder name) are averaged; the `baseline` ("group / stage")
    is drawn in black."""
    lines = _mean_lines(curves, key, group_of or {})
    if len(lines) < 2:
        return False
    figure = Figure(figsize=(8, 4.5), dpi=100)
    axes = figure.add_subplot()
    for label, (epochs, values) in lines.items():
        is_baseline = bool(baseline) and label.startswith(baseline)
        axes.plot(epochs, values, label=label, linewidth=2.4 if is_baseline else 1.2,
                  color="black" if is_baseline else None)
    axes.set(xlabel="epoch", ylabel=key, title=f"{key} of every stage trained with it")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    _save(figure, path)
    return True


def plot_scores(aggregated: list[dict], path: Path, metrics: tuple[str, ...] = ("Bleu_4", "CIDEr")) -> bool:
    """One bar per configuration and metric (×100), error bars = sample std over seeds; `aggregated` as
    eimctl.evaluate.aggregate.aggregate_rows gives it (fixed-caption floors drawn as dashed lines)."""
    scored = [a for a in aggregated if "fixed caption" not in a["benchmark"] and any(m in a["metrics"] for m in metrics)]
    if not scored:
        return False
    figure = Figure(figsize=(4 + 1.2 * len(scored), 4.5), dpi=100)
    panels = [m for m in metrics if any(m in a["metrics"] for a in scored)]
    for number, metric in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), number)
        labels = [f"{a['group']}\n{a['stage']}" for a in scored]
        means = [a["metrics"].get(metric, (0.0, 0.0))[0] for a in scored]
        spreads = [a["metrics"].get(metric, (0.0, 0.0))[1] for a in scored]
        axes.bar(range(len(scored)), means, yerr=spreads, capsize=4, color="tab:blue", alpha=0.8)
        for floor in (a for a in aggregated if "fixed caption" in a["benchmark"] and metric in a["metrics"]):
            axes.axhline(floor["metrics"][metric][0], linestyle="--", color="grey", label="fixed-caption floor")
        axes.set_xticks(range(len(scored)), labels, fontsize="small", rotation=45, ha="right")
        axes.set(title=f"{CAPTION_METRICS.get(metric, metric)} ×100 (mean ± std over seeds)")
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize="small", loc="lower right")
    _save(figure, path)
    return True
