"""Paired differences over seeds and the t-test's p-value, against hand-computed and table values."""
import math

import pytest

from eimctl.evaluate.paired import paired_differences, paired_summary, t_test_p_value
from eimctl.steps.report import ReportRow


def test_p_values_match_closed_forms_and_tables():
    assert t_test_p_value(2.0, 2) == pytest.approx(1 - 2 / math.sqrt(6), abs=1e-12)   # df = 2 closed form
    assert t_test_p_value(1.0, 1) == pytest.approx(0.5, abs=1e-12)                    # Cauchy: P(|t| > 1)
    assert t_test_p_value(12.706, 1) == pytest.approx(0.05, abs=1e-4)                 # t-table, 95%
    assert t_test_p_value(2.776, 4) == pytest.approx(0.05, abs=1e-4)
    assert t_test_p_value(0.0, 3) == pytest.approx(1.0)


def test_paired_summary_by_hand():
    stats = paired_summary([1.0, 2.0, 3.0])        # mean 2, std 1, t = 2 / (1/sqrt 3)
    assert stats["mean"] == 2.0 and stats["std"] == pytest.approx(1.0)
    assert stats["t"] == pytest.approx(2 * math.sqrt(3))
    assert stats["p"] == pytest.approx(t_test_p_value(2 * math.sqrt(3), 2))
    assert paired_summary([0.5])["p"] is None


def test_pairs_are_formed_within_a_seed_folder():
    def row(origin, group, stage, bleu):
        return ReportRow(run=group, stage=stage, benchmark="coco", metrics={"Bleu_4": bleu, "CIDEr": 1.0},
                         group=group, origin=origin)
    rows = [row("s1", "clipcap", "base", 0.40), row("s1", "eim", "base-ie", 0.42),
            row("s2", "clipcap", "base", 0.30), row("s2", "eim", "base-ie", 0.31),
            row("s3", "eim", "base-ie", 0.90)]       # no baseline in s3: not paired
    (entry,) = paired_differences(rows, ("clipcap", "base"))
    bleu = entry["metrics"]["Bleu_4"]
    assert (entry["group"], entry["stage"], bleu["n"]) == ("eim", "base-ie", 2)
    assert bleu["mean"] == pytest.approx(1.5) and bleu["std"] == pytest.approx(math.sqrt(0.5))


def test_aggregate_gives_mean_and_spread_of_metrics_and_diagnostics():
    from eimctl.evaluate.aggregate import aggregate_markdown, aggregate_rows
    rows = [ReportRow(run="eim", stage="base-ie", benchmark="coco", metrics={"Bleu_4": b}, group="eim",
                      diagnostics={"val_nll": nll, "image_use_gap": gap})
            for b, nll, gap in ((0.40, 0.7, 0.2), (0.44, 0.9, 0.4))]
    (entry,) = aggregate_rows(rows)
    assert entry["n"] == 2 and entry["metrics"]["Bleu_4"] == pytest.approx((42.0, math.sqrt(8.0)))
    assert entry["metrics"]["val_nll"] == pytest.approx((0.8, math.sqrt(0.02)))
    assert entry["metrics"]["image_use_gap"] == pytest.approx((0.3, math.sqrt(0.02)))
    table = aggregate_markdown([entry])
    assert "Val NLL" in table and "Image gap" in table and "42.00 ± 2.83" in table


def test_summary_table_has_a_row_per_configuration_and_paired_deltas():
    from eimctl.evaluate.aggregate import summary_markdown
    def row(origin, group, stage, bleu, cider, baseline=False):
        return ReportRow(run=group, stage=stage, benchmark="coco (fixed caption)" if baseline else "coco",
                         metrics={"Bleu_4": bleu, "CIDEr": cider}, group=group, origin=origin, is_baseline=baseline)
    rows = [row("s1", "clipcap", "base", 0.40, 1.00), row("s1", "eim", "base-ie", 0.42, 1.10),
            row("s2", "clipcap", "base", 0.30, 1.20), row("s2", "eim", "base-ie", 0.31, 1.00),
            row("s1", "clipcap", "base", 0.10, 0.50, baseline=True)]
    table = summary_markdown(rows, ("clipcap", "base"))
    assert "| clipcap / base | 2 | 35.00 ± 7.07 | 110.00 ± 14.14 | baseline | baseline |" in table
    assert "| eim / base-ie | 2 | 36.50 ± 7.78 | 105.00 ± 7.07 | +1.50 ± 0.71 | -5.00 ± 21.21 |" in table
    assert table.count("best single fixed caption") == 1


def test_the_score_chart_and_the_loss_overlay_are_drawn(tmp_path):
    from eimctl.evaluate.plots import plot_loss_overlay, plot_scores
    aggregated = [{"group": "clipcap", "stage": "base", "benchmark": "coco", "n": 2,
                   "metrics": {"Bleu_4": (35.0, 1.0), "CIDEr": (110.0, 3.0)}}]
    assert plot_scores(aggregated, tmp_path / "scores.png")
    curves = {("clipcap", "base"): [{"epoch": 0.5, "loss_base": 2.0}, {"epoch": 1.0, "loss_base": 1.5}],
              ("eim", "base-ie"): [{"epoch": 0.5, "loss_base": 2.2, "loss_ie": 3.0}, {"epoch": 1.0, "loss_base": 1.4}]}
    assert plot_loss_overlay(curves, tmp_path / "overlay.png")
    assert (tmp_path / "overlay.png").read_bytes()[:4] == b"\x89PNG"
    assert not plot_loss_overlay({("eim", "st"): [{"epoch": 1.0, "loss_st": 5.0}]}, tmp_path / "none.png")


def test_the_summary_names_the_data_a_benchmark_was_scored_on():
    from eimctl.evaluate.aggregate import summary_markdown
    rows = [ReportRow(run="eim", stage="base-ie", benchmark="coco", metrics={"Bleu_4": 0.3, "CIDEr": 1.0},
                      group="eim", dataset="demo/data"),
            ReportRow(run="old", stage="base", benchmark="coco", metrics={"Bleu_4": 0.3, "CIDEr": 1.0}, group="old")]
    table = summary_markdown(rows, ("eim", "base-ie"))
    assert table.startswith("### coco on demo/data") and table.count("### ") == 1   # one table per benchmark


def test_the_summary_shows_each_benchmarks_own_headline_metric():
    from eimctl.evaluate.aggregate import summary_markdown
    rows = [ReportRow(run="lavin-base", stage="base", benchmark="scienceqa", metrics={"Avg": 40.0, "IMG": 30.0},
                      group="lavin-base"),
            ReportRow(run="lavin-eim", stage="base-ie", benchmark="scienceqa", metrics={"Avg": 42.5}, group="lavin-eim"),
            ReportRow(run="lavin-eim", stage="base-ie", benchmark="mme",
                      metrics={"perception": 208.33, "color": 58.33}, group="lavin-eim"),
            *(ReportRow(run=run, stage="-", benchmark="scienceqa (always a)", metrics={"Avg": 34.5}, group=run,
                        is_baseline=True) for run in ("lavin-base", "lavin-eim"))]
    table = summary_markdown(rows, ("lavin-base", "base"))
    assert "| Configuration | n | Avg acc | Δ Avg acc | Val NLL | Image gap |" in table
    assert "| lavin-base / base | 1 | 40.00 | baseline |" in table
    assert "| lavin-eim / base-ie | 1 | 42.50 | +2.50 |" in table   # accuracy in points, not ×100
    assert "| Configuration | n | Perception | Δ Perception | Val NLL | Image gap |" in table
    assert "| lavin-eim / base-ie | 1 | 208.33 |  |" in table and "BLEU" not in table
    assert table.count("| control: always a | | 34.50 |") == 1 and "### scienceqa (always a)" not in table
