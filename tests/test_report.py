"""`eimctl report` (eimctl.report) on a hand-made run directory."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest
from rich.console import Console

from eimctl.runtime.errors import EimError
from eimctl.steps.report import collect_rows, render_table, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))


def complete(stage: str, wall_seconds: float) -> dict:
    return {"status": "complete", "step": "train-stage", "stage": stage, "config": {}, "wall_seconds": wall_seconds}


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "runs" / "eim"
    write(run / "stages/st/manifest.json", complete("st", 54.0))
    write(run / "stages/st/metrics.jsonl",
          "\n".join(json.dumps({"step": s, "epoch": s / 4, "loss": 3.0 - s / 4, "loss_st": 3.0 - s / 4,
                                "lr": 1e-3, "elapsed_s": s}) for s in range(1, 5))
          + '\n{"step": 5, "loss": 2.')  # a line cut off by a crash is skipped, not fatal
    write(run / "stages/base-ie/manifest.json", complete("base-ie", 3723.4))
    records = [{"step": 10, "epoch": 0.5, "loss": 2.5, "loss_base": 2.0, "loss_ie": 0.5, "lr": 1e-4, "elapsed_s": 1.0},
               {"step": 20, "epoch": 1.0, "loss": 1.25, "loss_base": 1.0, "loss_ie": 0.25, "val_loss": 1.5,
                "lr": 1e-4, "elapsed_s": 2.0}]
    write(run / "stages/base-ie/metrics.jsonl", "\n".join(json.dumps(r) for r in records) + "\n")
    write(run / "stages/lm/manifest.json", {"status": "running", "step": "train-stage", "stage": "lm"})
    (run / "stages/adapter").mkdir(parents=True)  # started, never finished
    metrics = {"Bleu_1": 0.7, "Bleu_2": 0.5, "Bleu_3": 0.4, "Bleu_4": 0.31, "METEOR": 0.25, "ROUGE_L": 0.55,
               "CIDEr": 1.0, "SPICE": None}
    write(run / "eval/base-ie-coco/metrics.json",
          {"benchmark": "coco", "stage": "base-ie", "split": "test", "metrics": metrics,
           "unavailable": {"SPICE": "Stanford CoreNLP 3.6.0 jars not given; pass --spice-jars DIR"},
           "fixed_caption_baseline": {"Bleu_4": {"caption": "a man riding a horse", "score": 0.05},
                                      "CIDEr": {"caption": "a plate of food", "score": 0.123}},
           "wall_seconds": 12.0})
    write(run / "eval/base-ie-coco/manifest.json", {"status": "complete", "step": "evaluate"})
    return run


def test_rows_hold_scaled_metrics_training_time_and_loss(run_dir):
    rows = collect_rows([run_dir])
    assert [(r.stage, r.benchmark) for r in rows] == [("st", "-"), ("base-ie", "coco"),
                                                      ("base-ie", "coco (fixed caption)")]
    st, model, floor = rows
    assert st.final_loss == 2.0 and st.train_seconds == 54.0 and st.metrics == {}
    assert model.final_loss == 1.25 and model.train_seconds == 3723.4
    assert model.metrics["Bleu_4"] == 0.31 and model.metrics["SPICE"] is None
    assert floor.is_baseline and floor.metrics == {"Bleu_4": 0.05, "CIDEr": 0.123}

    console = Console(record=True, width=250)
    console.print(render_table(rows))
    text = console.export_text()
    assert "(caption metrics ×100)" in text and "BLEU-4" in text and "CIDEr" in text
    assert "31.00" in text and "100.00" in text and "12.30" in text and "n/a" in text
    assert "1:02:03" in text and "1.2500" in text


def test_report_markdown_and_plots(run_dir, tmp_path):
    out = tmp_path / "report"
    path = write_report([run_dir], out)
    assert path == out / "report.md"
    markdown = path.read_text()
    lines = markdown.splitlines()
    header = next(line for line in lines if line.startswith("| Run"))
    assert header == ("| Run | Stage | Benchmark | Split | BLEU-1 ×100 | BLEU-2 ×100 | BLEU-3 ×100 | BLEU-4 ×100 "
                      "| METEOR ×100 | ROUGE-L ×100 | CIDEr ×100 | SPICE ×100 | Train time | Final loss |")
    assert "| eim | st | - |  |  |  |  |  |  |  |  |  | 0:00:54 | 2.0000 |" in lines
    assert ("| eim | base-ie | coco | test | 70.00 | 50.00 | 40.00 | 31.00 | 25.00 | 55.00 | 100.00 | n/a "
            "| 1:02:03 | 1.2500 (base 1.000 + ie 0.250) |") in lines
    assert "| eim | base-ie | coco (fixed caption) | test |  |  |  | 5.00 |  |  | 12.30 |  |  |  |" in lines
    # Incomplete stages are notes, not rows or crashes.
    assert "eim: stage lm skipped: status is 'running', not 'complete'" in markdown
    assert "eim: stage adapter skipped: no manifest.json" in markdown
    assert "1 unreadable line(s)" in markdown
    assert "SPICE not computed — Stanford CoreNLP 3.6.0 jars not given" in markdown
    assert 'best single caption for CIDEr: "a plate of food"' in markdown

    for stage in ("st", "base-ie"):
        png = out / f"loss_eim_{stage}.png"
        assert f"]({png.name})" in markdown
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        height, width, _ = matplotlib.image.imread(png).shape
        assert (width, height) == (700, 400)
    assert sorted(p.name for p in out.iterdir()) == ["loss_eim_base-ie.png", "loss_eim_st.png", "report.md",
                                                     "scores.png"]
    # the Table 4-shaped summary comes first: one row per configuration, the floor once
    assert markdown.index("## Summary") < markdown.index("## Results")
    assert "| eim / base-ie | 1 | 31.00 | 100.00 |" in markdown
    assert "| best single fixed caption | | 5.00 | 12.30 | | | | |" in markdown


def test_incomplete_evaluation_is_skipped(run_dir, tmp_path):
    write(run_dir / "eval/base-ie-coco/manifest.json", {"status": "running"})
    rows = collect_rows([run_dir])
    assert [(r.stage, r.benchmark) for r in rows] == [("st", "-"), ("base-ie", "-")]
    markdown = write_report([run_dir], tmp_path / "r").read_text()
    assert "eim: evaluation base-ie-coco skipped: status is 'running'" in markdown


def test_not_a_run_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EimError, match="not a run directory"):
        write_report([tmp_path / "empty"], tmp_path / "out")
    with pytest.raises(EimError, match="not a run directory"):
        collect_rows([tmp_path / "nowhere"])


def test_aggregate_over_seeds_gives_mean_and_sample_spread(tmp_path):
    runs = []
    for seed, bleu in ((1, 0.30), (2, 0.32), (3, 0.34)):
        run = tmp_path / f"seed-{seed}" / "eim"
        write(run / "stages/base-ie/manifest.json", complete("base-ie", 60.0 * seed))
        write(run / "eval/base-ie-coco/metrics.json", {"benchmark": "coco", "stage": "base-ie", "split": "test",
                                                       "metrics": {"Bleu_4": bleu, "CIDEr": 1.0}})
        write(run / "eval/base-ie-coco/manifest.json", {"status": "complete", "step": "evaluate"})
        runs.append(run)
    from eimctl.steps.report import aggregate_rows
    (group,) = aggregate_rows(collect_rows(runs))
    assert (group["group"], group["stage"], group["n"]) == ("eim", "base-ie", 3)
    mean, spread = group["metrics"]["Bleu_4"]
    assert mean == pytest.approx(32.0) and spread == pytest.approx(2.0)   # 30, 32, 34: sample std 2
    assert group["metrics"]["CIDEr"] == (pytest.approx(100.0), pytest.approx(0.0))
    assert group["train_seconds"] == pytest.approx(120.0)
    text = write_report(runs, tmp_path / "report", aggregate=True).read_text()
    assert "| eim | base-ie | coco | 3 | 32.00 ± 2.00 | 100.00 ± 0.00 | 0:02:00 |" in text


def _with_diagnostics(run: Path, stage: str, record: dict) -> None:
    """A stage's diagnostics.json, listed in its manifest's outputs as train-stage lists it."""
    write(run / f"stages/{stage}/diagnostics.json", record)
    manifest = json.loads((run / f"stages/{stage}/manifest.json").read_text())
    manifest["outputs"] = {"diagnostics.json": (run / f"stages/{stage}/diagnostics.json").stat().st_size}
    write(run / f"stages/{stage}/manifest.json", manifest)


def test_val_nll_and_image_gap_columns_and_the_diagnostics_section(run_dir, tmp_path):
    _with_diagnostics(run_dir, "st", {"split": "val", "val_nll": 3.25, "image_use_gap": 0.5,
                                      "query_key_cosine": {"st": {"queue": "ke", "mean_cos": 0.4125}}})
    _with_diagnostics(run_dir, "base-ie", {"split": "val", "val_nll": 9.0, "image_use_gap": 9.0,
                                           "text_only_nll": {"before": 4.5, "after": 4.75},
                                           "query_key_cosine": {"ie": {"queue": "kt", "mean_cos": 0.25}}})
    metrics = json.loads((run_dir / "eval/base-ie-coco/metrics.json").read_text())
    metrics["diagnostics"] = {"split": "val", "val_nll": 2.125, "image_use_gap": -0.0625}   # the evaluation's own
    write(run_dir / "eval/base-ie-coco/metrics.json", metrics)

    st, model, floor = collect_rows([run_dir])
    assert st.diagnostics["val_nll"] == 3.25                  # unscored stage: its diagnostics.json
    assert model.diagnostics["val_nll"] == 2.125              # scored: the evaluation's figures win
    assert floor.diagnostics == {}
    lines = write_report([run_dir], tmp_path / "report").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| Run"))
    assert header.endswith("| CIDEr ×100 | SPICE ×100 | Val NLL | Image gap | Train time | Final loss |")
    assert "| eim | st | - |  |  |  |  |  |  |  |  |  | 3.250 | +0.500 | 0:00:54 | 2.0000 |" in lines
    assert ("| eim | base-ie | coco | test | 70.00 | 50.00 | 40.00 | 31.00 | 25.00 | 55.00 | 100.00 | n/a "
            "| 2.125 | -0.062 | 1:02:03 | 1.2500 (base 1.000 + ie 0.250) |") in lines
    assert "| eim | base-ie | coco (fixed caption) | test |  |  |  | 5.00 |  |  | 12.30 |  |  |  |  |  |" in lines
    section = lines[lines.index("## Diagnostics"):]
    assert "- eim / st: cos(query, own key): loss_st vs ke 0.412" in section
    assert "- eim / base-ie: text-only NLL 4.500 → 4.750; cos(query, own key): loss_ie vs kt 0.250" in section

    console = Console(record=True, width=250)
    console.print(render_table(collect_rows([run_dir])))
    text = console.export_text()
    assert "Val NLL" in text and "Image gap" in text and "+0.500" in text


def test_evaluation_without_diagnostics_falls_back_to_the_stage_and_unlisted_files_are_ignored(run_dir, tmp_path):
    _with_diagnostics(run_dir, "base-ie", {"split": "val", "val_nll": 1.5, "image_use_gap": 0.75})
    write(run_dir / "stages/st/diagnostics.json", {"val_nll": 7.0})   # not in st's manifest: not trusted
    st, model, _ = collect_rows([run_dir])
    assert model.diagnostics["val_nll"] == 1.5 and st.diagnostics == {}
    markdown = write_report([run_dir], tmp_path / "report").read_text()
    assert "| 1.500 | +0.750 |" in markdown and "7.000" not in markdown
    assert "## Diagnostics" in markdown and "- eim / base-ie" not in markdown   # nothing but the val figures


def test_floor_and_notes_once_across_runs(run_dir, tmp_path):
    import shutil
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    rows = collect_rows([run_dir, other])
    assert sum(row.is_baseline for row in rows) == 1          # the benchmark's floor: one row
    out = write_report([run_dir, other], tmp_path / "report")
    text = out.read_text()
    assert text.count("SPICE not computed") == 1 and text.count("best single caption for CIDEr") == 1


def test_the_completion_line_states_the_final_loss_the_report_shows(tmp_path):
    from eimctl.steps.train_stage import final_losses_text
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 3.25, "loss_base": 1.0, "loss_ie": 2.25}\n')
    assert final_losses_text(path) == ("final loss 3.2500 = loss_base 1.0000 + loss_ie 2.2500 "
                                       "(mean of the last log interval)")
