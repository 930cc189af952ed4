"""`eimctl report`: one table of every run, stage and benchmark, plus training-loss plots.

    eimctl report runs/base runs/eim --out runs/eim/report

Reads only what the steps wrote:

    runs/<run>/stages/<stage>/{manifest.json, metrics.jsonl}
    runs/<run>/eval/<stage>-<benchmark>/{manifest.json, metrics.json}

and writes `report.md` (a markdown table, notes, links to the plots) and one
`loss_<run>_<stage>.png` per stage, each file atomically. Caption metrics are
shown ×100, as papers print them. Incomplete or unreadable steps become notes
in the report, never a crash: a report is most wanted while runs are half done.
"""
from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from eimctl.runtime.atomic import write_text
from eimctl.runtime.errors import EimError
from eimctl.evaluate.diagnostic_figures import (diagnostic_columns, diagnostics_section, read_stage_diagnostics,
                                               val_figures)
from eimctl.evaluate.aggregate import (CAPTION_METRICS, aggregate_markdown, aggregate_rows, format_seconds,
                                       paired_markdown, summary_markdown)
from eimctl.evaluate.scienceqa_gate import gate_section
from eimctl.evaluate.transcripts import transcripts_section
from eimctl.evaluate.plots import plot_loss_overlay, plot_scores, plot_stage_losses
from eimctl.runtime.jsonl import read_jsonl
from eimctl.runtime.rundir import step_status

# The schedules' training order; other stage names follow alphabetically.
STAGE_ORDER = ("base", "st", "st-base", "lm", "lm-base", "adapter", "base-ie")
# Other benchmarks' columns in their papers' order (ScienceQA's nine); the rest alphabetically.
ORDERED_METRICS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg")



@dataclass
class ReportRow:
    """One line of the table: a trained stage scored on one benchmark (or not yet scored)."""

    run: str
    stage: str
    benchmark: str = "-"
    split: str = ""
    metrics: dict[str, float | None] = field(default_factory=dict)
    train_seconds: float | None = None
    final_loss: float | None = None
    final_losses: dict = field(default_factory=dict)  # each loss_* of the last log interval, when several
    dataset: str = ""  # the data set an evaluation scored (data.path), shown with the benchmark's name
    is_baseline: bool = False
    group: str = ""  # the run folder's own name: runs of one recipe over several seeds share it
    origin: str = ""  # the run folder's parent: runs of one seed (clipcap, eim) share it, which pairs them
    diagnostics: dict = field(default_factory=dict)  # val_nll, image_use_gap, ... (eimctl/eim/diagnostics.py)


@dataclass
class _Collected:
    rows: list[ReportRow]
    notes: list[str]
    curves: dict[tuple[str, str], list[dict]]  # (run, stage) -> metrics.jsonl records
    diagnostics: dict[tuple[str, str], dict] = field(default_factory=dict)  # (run, stage) -> diagnostics.json


def _stage_sort_key(name: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(name), "") if name in STAGE_ORDER else (len(STAGE_ORDER), name)


def _complete_manifest(step_dir: Path, label: str, notes: list[str]) -> dict | None:
    """The step's manifest if the step is complete and intact, else None plus a note saying why."""
    try:
        manifest, why_not = step_status(step_dir)
    except EimError as error:
        manifest, why_not = None, error.what
    if manifest is None:
        notes.append(f"{label} skipped: {why_not}")
    return manifest


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _stage_rows(run: str, run_dir: Path, notes: list[str], curves: dict) -> dict[str, ReportRow]:
    """One row per complete stage of a run, with its training time and last logged loss."""
    stage_rows: dict[str, ReportRow] = {}
    stage_dirs = sorted((p for p in (run_dir / "stages").iterdir() if p.is_dir()),
                        key=lambda p: _stage_sort_key(p.name))
    for folder in stage_dirs:
        manifest = _complete_manifest(folder, f"{run}: stage {folder.name}", notes)
        if manifest is None:
            continue
        row = ReportRow(run=run, stage=folder.name, group=run_dir.name)
        wall = manifest.get("wall_seconds")
        row.train_seconds = float(wall) if _is_number(wall) else None
        row.diagnostics = read_stage_diagnostics(folder, manifest, f"{run}: stage {folder.name}", notes)
        metrics_file = folder / "metrics.jsonl"
        if metrics_file.is_file():
            records, bad = read_jsonl(metrics_file, tolerant=True)
            if bad:
                notes.append(f"{run}: stage {folder.name}: {bad} unreadable line(s) in metrics.jsonl ignored")
            logged = [r for r in records if _is_number(r.get("loss"))]
            row.final_loss = float(logged[-1]["loss"]) if logged else None
            parts = {k: v for k, v in (logged[-1] if logged else {}).items() if k.startswith("loss_") and _is_number(v)}
            row.final_losses = parts if len(parts) > 1 else {}
            curves[(run, folder.name)] = records
        stage_rows[folder.name] = row
    return stage_rows


def _eval_rows(run: str, run_dir: Path, stage_rows: dict[str, ReportRow], notes: list[str]) -> list[ReportRow]:
    """One row per complete evaluation of a run (plus its fixed-caption floor, when it has one)."""
    eval_rows: list[ReportRow] = []
    eval_root = run_dir / "eval"
    for folder in sorted(p for p in eval_root.iterdir() if p.is_dir()) if eval_root.is_dir() else []:
        label = f"{run}: evaluation {folder.name}"
        if _complete_manifest(folder, label, notes) is None:
            continue
        try:
            result = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            notes.append(f"{label} skipped: metrics.json unreadable ({type(error).__name__})")
            continue
        stage, benchmark = str(result.get("stage", folder.name)), str(result.get("benchmark", "?"))
        if result.get("zero_images"):  # the image-ablation control of a stage (eval.zero_images)
            benchmark += " (images zeroed)"
        trained = stage_rows.get(stage, ReportRow(run=run, stage=stage))
        eval_rows.append(ReportRow(
            run=run, stage=stage, benchmark=benchmark, split=str(result.get("split", "")),
            metrics=dict(result.get("metrics", {})), train_seconds=trained.train_seconds,
            final_loss=trained.final_loss, final_losses=trained.final_losses, group=run_dir.name,
            dataset=str(result.get("dataset", "")),  # the data it was scored on: the demo's scenes are not COCO
            diagnostics=val_figures(result.get("diagnostics"), trained.diagnostics)))
        for metric, reason in sorted(result.get("unavailable", {}).items()):
            notes.append(f"{benchmark} {result.get('split', '')}: {metric} not computed — {reason}")
        baseline = result.get("fixed_caption_baseline") or {}
        if baseline:
            eval_rows.append(ReportRow(
                run=run, stage=stage, benchmark=f"{benchmark} (fixed caption)", group=run_dir.name,
                split=str(result.get("split", "")), is_baseline=True,
                metrics={metric: entry.get("score") for metric, entry in baseline.items()}))
            for metric, entry in sorted(baseline.items()):
                notes.append(f"{benchmark} {result.get('split', '')}: best single caption for {metric}: "
                             f"\"{entry.get('caption')}\"")
        eval_rows += _control_rows(run, run_dir, result)
    return eval_rows


def _control_rows(run: str, run_dir: Path, result: dict) -> list[ReportRow]:
    """The task's controls scored like a model (ScienceQA: always (A), uniform random, expected chance)."""
    return [ReportRow(run=run, stage="-", benchmark=f"{result.get('benchmark', '?')} ({name.replace('_', ' ')})",
                      group=run_dir.name, split=str(result.get("split", "")), is_baseline=True,
                      metrics=dict(control.get("metrics", {})))
            for name, control in sorted((result.get("controls") or {}).items())]


def _collect(run_dirs: list[Path]) -> _Collected:
    rows: list[ReportRow] = []
    notes: list[str] = []
    curves: dict[tuple[str, str], list[dict]] = {}
    names_seen: set[str] = set()
    diagnostics: dict[tuple[str, str], dict] = {}
    for run_dir in map(Path, run_dirs):
        if not (run_dir / "stages").is_dir():
            raise EimError("not a run directory", where=str(run_dir),
                           hint="pass runs/<run>, the folder that holds stages/ (and eval/)")
        run = run_dir.name
        if run in names_seen:  # two runs/<same name> from different parents
            run = f"{run_dir.parent.name}/{run_dir.name}"
        names_seen.add(run)
        stage_rows = _stage_rows(run, run_dir, notes, curves)
        eval_rows = _eval_rows(run, run_dir, stage_rows, notes)
        diagnostics.update({(run, name): row.diagnostics for name, row in stage_rows.items() if row.diagnostics})
        scored_stages = {row.stage for row in eval_rows}
        # Trained-but-unscored stages still get a row, so training cost and loss stay visible.
        run_rows = [row for name, row in stage_rows.items() if name not in scored_stages] + eval_rows
        # Stable sort: a model row stays just above its fixed-caption row.
        for row in run_rows:
            row.origin = str(run_dir.resolve().parent)
        rows.extend(sorted(run_rows, key=lambda r: _stage_sort_key(r.stage)))
    # A benchmark's floor and its notes are the same for every evaluation on the same split: once each.
    return _Collected(rows=_floors_once(rows), notes=list(dict.fromkeys(notes)), curves=curves,
                      diagnostics=diagnostics)


def _floors_once(rows: list[ReportRow]) -> list[ReportRow]:
    seen, kept = set(), []
    for row in rows:
        key = (row.benchmark, row.split, tuple(sorted(row.metrics.items())))
        if row.is_baseline and key in seen:
            continue
        seen.add(key)
        kept.append(row)
    return kept


def collect_rows(run_dirs: list[Path]) -> list[ReportRow]:
    """The table rows for these run directories (what `render_table` draws)."""
    return _collect(run_dirs).rows


def _final_loss_cell(row: ReportRow) -> str:
    """The last log interval's mean loss, with each loss named when the stage has several."""
    if row.final_loss is None:
        return ""
    parts = " + ".join(f"{name.removeprefix('loss_')} {value:.3f}" for name, value in row.final_losses.items())
    return f"{row.final_loss:.4f}" + (f" ({parts})" if parts else "")


def _columns(rows: list[ReportRow]) -> list[tuple[str, callable]]:
    """(header, row -> cell text) for every column the rows need, shared by markdown and rich."""
    present = {name for row in rows for name in row.metrics}
    caption_metrics = [name for name in CAPTION_METRICS if name in present]
    other_metrics = [name for name in ORDERED_METRICS if name in present] + \
        sorted(present - set(CAPTION_METRICS) - set(ORDERED_METRICS))

    def metric_cell(name: str, scale: float):
        def cell(row: ReportRow) -> str:
            if name not in row.metrics:
                return ""
            value = row.metrics[name]
            return f"{value * scale:.2f}" if _is_number(value) else "n/a"
        return cell

    columns = [("Run", lambda r: r.run), ("Stage", lambda r: r.stage), ("Benchmark", lambda r: r.benchmark),
               ("Split", lambda r: r.split)]
    columns += [(f"{CAPTION_METRICS[name]} ×100", metric_cell(name, 100.0)) for name in caption_metrics]
    columns += [(name, metric_cell(name, 1.0)) for name in other_metrics]
    columns += diagnostic_columns(rows)  # val NLL and image-use gap, when the steps recorded them
    columns += [("Train time", lambda r: format_seconds(r.train_seconds)),
                ("Final loss", _final_loss_cell)]
    return columns


def render_table(rows: list[ReportRow]) -> Table:
    """The report table for a terminal (print it with rich.console.Console().print)."""
    # Terminals are narrow: the title carries the ×100, headers are short, borders
    # light, and only the benchmark name may wrap.
    columns = _columns(rows)
    splits = {row.split for row in rows if row.split}
    title = "eimctl report (caption metrics ×100)"
    if len(splits) <= 1:  # one split for all rows: say it once
        columns = [column for column in columns if column[0] != "Split"]
        title += f", split: {splits.pop()}" if splits else ""
    table = Table(title=title, box=box.SIMPLE_HEAD, collapse_padding=True)
    short = {"Train time": "Train", "Final loss": "Loss"}
    for header, _ in columns:
        text_column = header in ("Run", "Stage", "Benchmark", "Split")
        table.add_column(short.get(header, header.removesuffix(" ×100")),
                         justify="left" if text_column else "right", no_wrap=header != "Benchmark",
                         min_width=12 if header == "Benchmark" else None)
    for row in rows:
        table.add_row(*(cell(row) for _, cell in columns), style="dim" if row.is_baseline else None)
    return table


def _markdown_table(rows: list[ReportRow]) -> str:
    columns = _columns(rows)

    def escape(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(header for header, _ in columns) + " |",
             "|" + "|".join("---" if i < 4 else "---:" for i in range(len(columns))) + "|"]
    lines += ["| " + " | ".join(escape(cell(row)) for _, cell in columns) + " |" for row in rows]
    return "\n".join(lines)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def _summary(collected: _Collected, out_dir: Path, baseline: tuple[str, str]) -> list[str]:
    """The report's first section: the Table 4-shaped summary, the score chart and the loss overlay."""
    lines = ["## Summary", "",
             f"One row per configuration (run folder / stage); several seeds give mean ± sample std and Δ is "
             f"paired seed by seed against {baseline[0]}/{baseline[1]} (caption metrics ×100, others in their own "
             f"units).", "",
             summary_markdown(collected.rows, baseline), ""]
    if plot_scores(aggregate_rows(collected.rows), out_dir / "scores.png"):
        lines += ["![scores with the seed spread](scores.png)", ""]
    group_of = {row.run: row.group or row.run for row in collected.rows}
    if plot_loss_overlay(collected.curves, out_dir / "loss_base_overlay.png", group_of=group_of,
                         baseline=f"{baseline[0]} / {baseline[1]}"):
        lines += ["![loss_base of every stage trained with it, baseline and EIM on the same axes]"
                  "(loss_base_overlay.png)", ""]
    return lines


def write_report(run_dirs: list[Path], out_dir: Path, aggregate: bool = False,
                 baseline: tuple[str, str] = ("clipcap", "base")) -> Path:
    """Write report.md and the loss plots into out_dir; returns the report.md path.

    With `aggregate`, a first table gives mean ± sample standard deviation over the runs that
    share a folder name (one recipe over several seeds)."""
    collected = _collect(run_dirs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    plots: list[tuple[str, str, str]] = []
    for (run, stage), records in collected.curves.items():
        name = f"loss_{_safe_name(run)}_{_safe_name(stage)}.png"
        if plot_stage_losses(run, stage, records, out_dir / name):
            plots.append((run, stage, name))

    lines = ["# eimctl report", "", "Runs: " + ", ".join(f"`{Path(p)}`" for p in run_dirs), ""]
    if collected.rows:
        lines += _summary(collected, out_dir, baseline)
    if aggregate and collected.rows:
        lines += ["## Mean ± spread over runs", "",
                  "Runs whose folders share a name (one recipe, several seeds) are grouped; each cell is "
                  "mean ± sample standard deviation (×100) over the n runs.", "",
                  aggregate_markdown(aggregate_rows(collected.rows)), "",
                  f"## Paired differences vs {baseline[0]}/{baseline[1]} (same seed)", "",
                  "Each configuration's score minus the baseline's in the same seed folder; mean ± sample "
                  "standard deviation over the seeds, and the two-sided paired t-test's p-value (n − 1 "
                  "degrees of freedom; with 3 seeds a guide, not a verdict).", "",
                  paired_markdown(collected.rows, baseline), ""]
    if collected.rows:
        lines += ["## Results", "",
                  "Caption metrics (BLEU, METEOR, ROUGE-L, CIDEr, SPICE) are ×100, as in papers; "
                  "other metrics as the benchmark reports them. Train time is the stage's wall time "
                  "(h:mm:ss); final loss is the mean training loss of the last log interval (the figure a "
                  "stage prints when it completes; with several losses, their weighted sum). A \"fixed "
                  "caption\" row scores "
                  "one caption predicted for every image (each metric picks its own best caption), "
                  "a floor to beat.", "", _markdown_table(collected.rows), ""]
    else:
        lines += ["No complete stages or evaluations found.", ""]
    lines += gate_section(collected.rows)
    lines += transcripts_section(run_dirs)
    lines += diagnostics_section(collected.diagnostics)
    if collected.notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in collected.notes] + [""]
    if plots:
        lines += ["## Training loss", ""]
        for run, stage, name in plots:
            lines += [f"- [{run} / {stage}]({name})"]
        lines += [""]
        for run, stage, name in plots:
            lines += [f"![training loss, {run} / {stage}]({name})", ""]
    report_path = out_dir / "report.md"
    write_text(report_path, "\n".join(lines))
    return report_path


def report(run_dirs: list[Path], out_dir: Path, *, aggregate: bool = False, show: bool = True,
           baseline: tuple[str, str] = ("clipcap", "base")) -> Path:
    """`eimctl report`: write the report, and show its table in the terminal."""
    path = write_report(run_dirs, out_dir, aggregate=aggregate, baseline=baseline)
    if show:
        console = Console() if sys.stdout.isatty() else Console(width=160)
        rows = collect_rows(run_dirs)
        console.print(render_table(rows))
        if aggregate:
            print(aggregate_markdown(aggregate_rows(rows)))
            print(paired_markdown(rows, baseline))
        print(f"report written to {path}")
    return path
