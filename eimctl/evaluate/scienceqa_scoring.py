"""ScienceQA's official scoring: generated text -> answer index, and the accuracy table.

Answer extraction (`parse_answer`): the regex `The answer is ([A-Z]).` taken literally: the `.`
is unescaped, so one more character (any but a newline) must follow the letter, and
"The answer is B" at the end of the text, or "The answer is B\\n", does not match.
- `official` (ScienceQA's run_gpt3.py): the text is stripped and must match exactly once;
  otherwise the prediction is FAILED.
- `lavin` (LaVIN's eval.py): the first match counts (the text is not stripped).
A letter among the first len(choices) of A-E gives its index; FAILED, or a letter beyond the
choices, gives `rng.choice(range(len(choices)))`: a uniformly random index, as upstream does, from a
`random.Random(seed)` consumed in problem order (upstream seeds the global `random`).

Accuracy (`official_scores`, ScienceQA's tools/evaluate_acc.py): for each scored problem,
`pred = int(results[qid])` and correct = (answer == pred). A category's score is the string
"{:.2f}" of correct/total*100, or the int -1 when the category has no problem. NAT/SOC/LAN by
subject; TXT = has a hint (with or without an image); IMG = has an image (with or without a hint);
NO = neither; G1-6 / G7-12 by grade; one `acc_<topic>` per topic. The average's denominator is
len(results), not the number of scored problems. The official script also asserts
len(results) == 4241 (the full test split); this scorer does not, so smaller test sets score too.
The official topic keys are its 26 topics, always present (-1 when absent); a topic outside them
gets a key of its own.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from eimctl.runtime.atomic import write_json
from eimctl.runtime.errors import EimError

ANSWER_PATTERN = re.compile(r"The answer is ([A-Z]).")
PARSE_MODES = ("official", "lavin")
OPTIONS = ("A", "B", "C", "D", "E")
GRADES_1_6 = ("grade1", "grade2", "grade3", "grade4", "grade5", "grade6")
GRADES_7_12 = ("grade7", "grade8", "grade9", "grade10", "grade11", "grade12")
# The official script's topics, in its order.
OFFICIAL_TOPICS = ("punctuation", "literacy-in-science", "verbs", "pronouns", "civics", "culture", "word-study",
                   "economics", "physics", "units-and-measurement", "science-and-engineering-practices",
                   "reading-comprehension", "global-studies", "grammar", "figurative-language", "us-history",
                   "writing-strategies", "world-history", "reference-skills", "biology", "earth-science",
                   "phonological-awareness", "capitalization", "chemistry", "vocabulary", "geography")
CATEGORIES = {
    "acc_natural": lambda row: row["subject"] == "natural science",
    "acc_social": lambda row: row["subject"] == "social science",
    "acc_language": lambda row: row["subject"] == "language science",
    "acc_has_text": lambda row: bool(row["hint"]),
    "acc_has_image": lambda row: bool(row["image"]),
    "acc_no_context": lambda row: not row["hint"] and not row["image"],
    "acc_grade_1_6": lambda row: row["grade"] in GRADES_1_6,
    "acc_grade_7_12": lambda row: row["grade"] in GRADES_7_12,
}
# The paper's column names of the main keys.
COLUMNS = {"acc_natural": "NAT", "acc_social": "SOC", "acc_language": "LAN", "acc_has_text": "TXT",
           "acc_has_image": "IMG", "acc_no_context": "NO", "acc_grade_1_6": "G1-6", "acc_grade_7_12": "G7-12",
           "acc_average": "Avg"}


def extract_letter(text: str, mode: str) -> str | None:
    """The answer letter of a generated text, or None (upstream's "FAILED")."""
    if mode not in PARSE_MODES:
        raise EimError(f"unknown answer parsing mode '{mode}'", where="scienceqa.parse",
                       hint=f"one of {', '.join(PARSE_MODES)}")
    if mode == "official":
        found = ANSWER_PATTERN.findall(text.strip())
        return found[0] if len(found) == 1 else None
    found = ANSWER_PATTERN.findall(text)
    return found[0] if found else None


def parse_answer(text: str, n_choices: int, mode: str, rng: random.Random) -> tuple[int, bool]:
    """(answer index, whether it fell back to a random index: FAILED or a letter beyond the choices)."""
    letter = extract_letter(text, mode)
    if letter is not None and letter in OPTIONS[:n_choices]:
        return OPTIONS.index(letter), False
    return rng.choice(range(n_choices)), True


def category_score(flags: list[bool]) -> str | int:
    """The official per-category value: "{:.2f}" of the accuracy in percent, or -1 when empty."""
    if not flags:
        return -1
    return "{:.2f}".format(sum(flags) / len(flags) * 100)


def _prediction(results: dict, qid: str, where: str) -> int:
    if qid not in results:
        raise EimError(f"no prediction for test problem {qid}", where=where,
                       hint="the results must hold an answer index for every scored qid")
    try:
        return int(results[qid])
    except (TypeError, ValueError):
        raise EimError(f"prediction {results[qid]!r} for problem {qid} is not an answer index", where=where,
                       hint="write 0 for (A), 1 for (B), ...") from None


def official_scores(rows: dict[str, dict], results: dict, where: str = "results") -> dict:
    """The official table for the scored problems `rows` ({qid: problems.json row}) and `results`
    ({qid: predicted index, int or int-like string})."""
    if not results:
        raise EimError("the results hold no prediction", where=where, hint="write {\"results\": {qid: index}}")
    correct = {qid: row["answer"] == _prediction(results, qid, where) for qid, row in rows.items()}
    scores = {key: category_score([correct[qid] for qid, row in rows.items() if test(row)])
              for key, test in CATEGORIES.items()}
    scores["acc_average"] = "{:.2f}".format(sum(correct.values()) / len(results) * 100)
    extra = sorted({row["topic"] for row in rows.values()} - set(OFFICIAL_TOPICS))
    for topic in (*OFFICIAL_TOPICS, *extra):
        scores["acc_" + topic] = category_score([correct[qid] for qid, row in rows.items() if row["topic"] == topic])
    return scores


def columns(scores: dict) -> dict[str, float]:
    """The paper's nine columns as numbers (NAT ... Avg); an empty category is left out."""
    return {name: float(scores[key]) for key, name in COLUMNS.items() if scores[key] != -1}


def control_results(rows: dict[str, dict], seed: int) -> dict[str, dict[str, int]]:
    """Predictions of the controls: always (A), and a uniformly random index drawn in problem order."""
    rng = random.Random(seed)
    return {"always_a": {qid: 0 for qid in rows},
            "random": {qid: rng.choice(range(len(row["choices"]))) for qid, row in rows.items()}}


def control_scores(rows: dict[str, dict], seed: int) -> dict[str, dict]:
    scores = {name: official_scores(rows, results, where=f"control {name}")
              for name, results in control_results(rows, seed).items()}
    scores["chance"] = expected_chance(rows)
    return scores


def expected_chance(rows: dict[str, dict]) -> dict:
    """The expected accuracy of a uniform guess (the mean of 1/number of choices) in the official table's form."""
    def chance(members: list[dict]):
        return "{:.2f}".format(100 * sum(1 / len(r["choices"]) for r in members) / len(members)) if members else -1
    table = {key: chance([row for row in rows.values() if test(row)]) for key, test in CATEGORIES.items()}
    table["acc_average"] = chance(list(rows.values()))
    topics = sorted({row["topic"] for row in rows.values()} - set(OFFICIAL_TOPICS))
    for topic in (*OFFICIAL_TOPICS, *topics):
        table["acc_" + topic] = chance([row for row in rows.values() if row["topic"] == topic])
    return table


def read_results(path: Path) -> dict:
    """{qid: index} from the official result file ({"results": {...}, ...}) or LaVIN's bare {qid: index}."""
    path = Path(path)
    if not path.is_file():
        raise EimError(f"results file not found: {path}", hint="pass the JSON file the model's run wrote")
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise EimError(f"malformed JSON: {error.msg} at line {error.lineno}", where=str(path),
                       hint="the file must be JSON") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("results"), dict):
        return {str(qid): value for qid, value in loaded["results"].items()}
    if isinstance(loaded, dict) and loaded and not any(isinstance(v, (dict, list)) for v in loaded.values()):
        return {str(qid): value for qid, value in loaded.items()}
    raise EimError("not a ScienceQA results file", where=str(path),
                   hint="write {\"results\": {qid: index}} (official) or {qid: index} (LaVIN)")


def write_results(path: Path, results: dict[str, int], outputs: dict[str, str], answers: dict[str, int]) -> None:
    """The official result-file format: acc, correct, count, results {qid: index}, outputs {qid: text}."""
    correct = sum(answers[qid] == index for qid, index in results.items())
    write_json(path, {"acc": correct / len(results) * 100 if results else 0.0, "correct": correct,
                      "count": len(results), "results": results, "outputs": outputs})
