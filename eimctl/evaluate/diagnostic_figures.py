"""The diagnostics as `eimctl report` shows them: a stage's diagnostics.json, the table's two columns, and
the report's "Diagnostics" section. The figures themselves are made by eimctl/eim/diagnostics.py (in
`train-stage` and `evaluate`); this module only reads JSON, so the report needs no torch.

    Val NLL     teacher-forced loss_base per response token on a fixed validation subset
    Image gap   NLL with another image's visual input minus Val NLL (> 0: the model uses the image)
"""
from __future__ import annotations

import json
import math
from pathlib import Path

DIAGNOSTICS_FILE = "diagnostics.json"
SECTION_INTRO = ("Val NLL is the teacher-forced loss_base per response token on a fixed validation subset "
                 "(`eval.diagnostic_samples`); Image gap is the NLL with another image's visual input minus "
                 "it (> 0: the captions depend on the image, about 0: the image is ignored). Below: the LM "
                 "alone on the same captions (text-only NLL, before → after the stage; the first token is not "
                 "scored) and, per contrastive loss, the mean cosine between a training sample's query and "
                 "its own key.")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_stage_diagnostics(folder: Path, manifest: dict, label: str, notes: list[str]) -> dict:
    """The stage's diagnostics.json when its manifest lists it (so its size was checked), else {}."""
    if DIAGNOSTICS_FILE not in manifest.get("outputs", {}):
        return {}
    try:
        record = json.loads((Path(folder) / DIAGNOSTICS_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        notes.append(f"{label}: {DIAGNOSTICS_FILE} unreadable ({type(error).__name__})")
        return {}
    return record if isinstance(record, dict) else {}


def diagnostic_columns(rows: list) -> list[tuple[str, callable]]:
    """("Val NLL", cell) and ("Image gap", cell) when any row has them; rows carry `diagnostics`."""
    if not any(_number(row.diagnostics.get("val_nll")) for row in rows):
        return []

    def figure(name: str, form: str):
        def cell(row) -> str:
            value = row.diagnostics.get(name)
            return form.format(value) if _number(value) else ""
        return cell
    return [("Val NLL", figure("val_nll", "{:.3f}")), ("Image gap", figure("image_use_gap", "{:+.3f}"))]


def _stage_line(record: dict) -> str:
    parts = []
    text = record.get("text_only_nll") or {}
    if _number(text.get("after")):
        before = f"{text['before']:.3f}" if _number(text.get("before")) else "n/a"
        parts.append(f"text-only NLL {before} → {text['after']:.3f}")
    cosines = [f"loss_{loss} vs {entry.get('queue', '?')} {entry['mean_cos']:.3f}"
               for loss, entry in sorted((record.get("query_key_cosine") or {}).items())
               if isinstance(entry, dict) and _number(entry.get("mean_cos"))]
    if cosines:
        parts.append("cos(query, own key): " + ", ".join(cosines))
    if record.get("skipped"):
        parts.append(f"validation figures skipped: {record['skipped']}")
    return "; ".join(parts)


def diagnostics_section(records: dict[tuple[str, str], dict]) -> list[str]:
    """Markdown lines of the report's Diagnostics section ([] when no stage recorded any);
    `records` maps (run, stage) to that stage's diagnostics.json."""
    lines = [f"- {run} / {stage}: {line}" for (run, stage), record in records.items()
             if (line := _stage_line(record))]
    return ["## Diagnostics", "", SECTION_INTRO, "", *lines, ""] if records else []


def val_figures(evaluation: dict | None, stage: dict) -> dict:
    """The evaluation's own validation figures (metrics.json `diagnostics`), else the stage's."""
    return evaluation if isinstance(evaluation, dict) and _number(evaluation.get("val_nll")) else stage
