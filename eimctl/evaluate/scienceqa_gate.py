"""The ScienceQA demo's learning gate, read from a report's rows (a stage's score, its images-zeroed score and
the task's controls):

    Avg  >= always-(A) Avg + 25 points                 the model learnt the task, not the answer position
    IMG  with images zeroed within 5 points of chance   the image questions were answered from the image
    TXT, NO with images zeroed within 5 points of their own score   ... and nothing else depended on it
"""
from __future__ import annotations

MARGIN_OVER_ALWAYS_A = 25.0
TOLERANCE = 5.0


def _find(rows, run: str | None, benchmark: str, stage: str | None = None):
    return next((row for row in rows if run in (None, row.run) and row.benchmark == benchmark
                 and (stage is None or row.stage == stage)), None)


def _control(rows, run: str, benchmark: str):
    """A control of the run's own evaluation, or the same control of another run (the report lists a
    control once when several runs scored the same split)."""
    return _find(rows, run, benchmark) or _find(rows, None, benchmark)


def gate_checks(rows, run: str, stage: str) -> list[tuple[str, bool]] | None:
    """[(what was checked, passed)] for one stage's ScienceQA score, or None without its zeroed score."""
    scored, zeroed = _find(rows, run, "scienceqa", stage), _find(rows, run, "scienceqa (images zeroed)", stage)
    always_a, chance = _control(rows, run, "scienceqa (always a)"), _control(rows, run, "scienceqa (chance)")
    if None in (scored, zeroed, always_a, chance):
        return None
    got, off, floor, guess = scored.metrics, zeroed.metrics, always_a.metrics, chance.metrics
    checks = [(f"Avg {got['Avg']:.2f} ≥ always-(A) {floor['Avg']:.2f} + {MARGIN_OVER_ALWAYS_A:g}",
               got["Avg"] >= floor["Avg"] + MARGIN_OVER_ALWAYS_A)]
    if "IMG" in off:
        checks.append((f"IMG with images zeroed {off['IMG']:.2f} within {TOLERANCE:g} of chance {guess['IMG']:.2f}",
                       abs(off["IMG"] - guess["IMG"]) <= TOLERANCE))
    for column in ("TXT", "NO"):
        if column in off:
            checks.append((f"{column} with images zeroed {off[column]:.2f} within {TOLERANCE:g} of "
                           f"{got[column]:.2f}", abs(off[column] - got[column]) <= TOLERANCE))
    return checks


def gate_section(rows) -> list[str]:
    """Markdown lines: the gate for every stage scored on ScienceQA with and without its images."""
    lines = []
    for row in rows:
        if row.benchmark != "scienceqa":
            continue
        checks = gate_checks(rows, row.run, row.stage)
        if checks is None:
            continue
        verdict = "PASS" if all(ok for _, ok in checks) else "FAIL"
        lines.append(f"- **{row.run} / {row.stage}: {verdict}** — "
                     + "; ".join(f"{text} {'✓' if ok else '✗'}" for text, ok in checks))
    if not lines:
        return []
    return ["## ScienceQA learning gate", "",
            f"Each stage scored with and without its images: Avg at least {MARGIN_OVER_ALWAYS_A:g} points above "
            f"always-(A); with images zeroed, IMG within {TOLERANCE:g} points of chance while TXT and NO stay "
            f"within {TOLERANCE:g} points of their score.", "", *lines, ""]
