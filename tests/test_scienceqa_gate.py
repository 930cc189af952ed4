"""The ScienceQA demo's learning gate on hand-made report rows."""
from eimctl.evaluate.scienceqa_gate import gate_checks, gate_section
from eimctl.steps.report import ReportRow


def rows(zeroed_img: float, zeroed_txt: float, avg: float = 70.0) -> list[ReportRow]:
    cols = {"TXT": 80.0, "IMG": 60.0, "NO": 75.0, "Avg": avg}
    return [ReportRow("r", "base", "scienceqa", metrics=cols),
            ReportRow("r", "base", "scienceqa (images zeroed)",
                      metrics={**cols, "IMG": zeroed_img, "TXT": zeroed_txt, "Avg": 50.0}),
            ReportRow("r", "-", "scienceqa (always a)", metrics={"TXT": 33.0, "IMG": 35.0, "NO": 30.0, "Avg": 33.0},
                      is_baseline=True),
            ReportRow("r", "-", "scienceqa (chance)", metrics={"TXT": 32.0, "IMG": 34.0, "NO": 31.0, "Avg": 32.0},
                      is_baseline=True)]


def test_gate_passes_and_fails_on_each_condition():
    assert all(ok for _, ok in gate_checks(rows(36.0, 78.0), "r", "base"))
    assert [ok for _, ok in gate_checks(rows(45.0, 78.0), "r", "base")] == [True, False, True, True]  # IMG still up
    assert [ok for _, ok in gate_checks(rows(36.0, 70.0), "r", "base")] == [True, True, False, True]  # TXT fell
    assert [ok for _, ok in gate_checks(rows(36.0, 78.0, avg=57.0), "r", "base")][0] is False       # 57 < 33 + 25
    assert "PASS" in "".join(gate_section(rows(36.0, 78.0))) and "FAIL" in "".join(gate_section(rows(45.0, 78.0)))


def test_no_gate_without_the_zeroed_score():
    assert gate_checks(rows(36.0, 78.0)[:1], "r", "base") is None and gate_section([]) == []


def test_controls_listed_once_serve_every_run():
    other = [ReportRow("s", "base", row.benchmark, metrics=row.metrics) for row in rows(36.0, 78.0)[:2]]
    assert all(ok for _, ok in gate_checks(rows(36.0, 78.0) + other, "s", "base"))
