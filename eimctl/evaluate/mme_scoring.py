"""MME's official scoring (eval_tool/calculation.py), rule for rule.

Answer files: one `<subtask>.txt` per subtask, one line per question,
`image \\t question \\t ground truth \\t prediction`, the prediction on one line. Lines come in
consecutive pairs, one pair per image (the Yes question first in the official templates).

- Lines are read with `readlines()`, so a prediction keeps its trailing newline ("yes\\n").
- They are chunked in consecutive pairs; a pair must have 2 lines (an odd count is refused).
- A line must split on tabs into exactly 4 fields and its ground truth, lower-cased, must be yes or
  no (the official script asserts the latter and skips a line that does not split; here both are
  one error naming the file and line).
- `pred = pred.lower()`; exactly "yes" or "no" is that answer; otherwise in `pred[:4]`: "yes" in it
  -> yes, elif "no" in it -> no, else "other", which is wrong ("not sure" -> no, " yes" -> yes,
  "  yes" -> other, "y" -> other, "none" -> no).
- Per subtask: acc = correct questions / questions; acc+ = images with both questions right /
  images; score = 100·acc + 100·acc+ (at most 200). Perception sums the 10 perception subtasks,
  Cognition the 4 cognition subtasks, in the official order and summation order, so the floats
  equal the official printout's.
"""
from __future__ import annotations

from pathlib import Path

from eimctl.runtime.errors import EimError

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
              "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
GROUPS = {"perception": PERCEPTION, "cognition": COGNITION}
SUBTASKS = PERCEPTION + COGNITION
ANSWERS = ("yes", "no")
FORMAT_HINT = "each line is image<TAB>question<TAB>Yes|No<TAB>prediction, two lines (one pair) per image"


def parse_prediction(pred: str) -> str:
    """The official answer of a prediction: "yes", "no" or "other"."""
    pred = pred.lower()
    if pred in ANSWERS:
        return pred
    prefix = pred[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def split_line(line: str, where: str) -> tuple[str, str, str, str]:
    """(image, question, gt lower-cased, prediction as written) of one answer line."""
    fields = line.split("\t")
    if len(fields) != 4:
        raise EimError(f"answer line has {len(fields)} tab-separated fields, not 4", where=where, hint=FORMAT_HINT)
    image, question, gt, pred = fields
    if gt.lower() not in ANSWERS:
        raise EimError(f"ground truth {gt!r} is not yes or no", where=where, hint=FORMAT_HINT)
    return image, question, gt.lower(), pred


def score_subtask(lines: list[str], where: str) -> dict:
    """acc, acc_plus and score of one subtask's answer lines (`where`: the file, for errors as file:line)."""
    if not lines:
        raise EimError("answer file has no lines", where=where, hint=FORMAT_HINT)
    if len(lines) % 2:
        raise EimError(f"answer file has {len(lines)} lines, an odd number: the last image lacks its second "
                       "question", where=where, hint=FORMAT_HINT)
    correct = both = other = 0
    for start in range(0, len(lines), 2):
        right = 0
        for number in (start + 1, start + 2):
            _, _, gt, pred = split_line(lines[number - 1], f"{where}:{number}")
            answer = parse_prediction(pred)
            right += answer == gt
            other += answer == "other"
        correct += right
        both += right == 2
    acc, acc_plus = correct / len(lines), both / (len(lines) // 2)
    score = 0
    score += acc * 100
    score += acc_plus * 100
    return {"acc": acc, "acc_plus": acc_plus, "score": score, "questions": len(lines), "images": len(lines) // 2,
            "other": other}


def _check_tasks(tasks, where: str) -> tuple[str, ...]:
    tasks = SUBTASKS if tasks is None else tuple(tasks)
    unknown = [task for task in tasks if task not in SUBTASKS]
    if unknown or not tasks:
        raise EimError(f"unknown MME subtask(s): {', '.join(unknown) or 'none given'}", where=where,
                       hint=f"MME's subtasks: {', '.join(SUBTASKS)}")
    return tasks


def score_tables(tables: dict[str, tuple[list[str], str]]) -> dict:
    """Scores of {subtask: (answer lines, where)}: perception and cognition (sums over the subtasks given, of
    each group that has any), per subtask acc/acc_plus/score, a flat `metrics` table, and `printed`: the
    figures rounded to 2 decimals as papers print them."""
    subtasks = {task: score_subtask(*tables[task]) for task in SUBTASKS if task in tables}
    result: dict = {}
    for group, members in GROUPS.items():
        if any(task in subtasks for task in members):
            total = 0
            for task in members:
                if task in subtasks:
                    total += subtasks[task]["score"]
            result[group] = total
    missing = [task for task in SUBTASKS if task not in subtasks]
    metrics = {**result, **{task: entry["score"] for task, entry in subtasks.items()}}
    return {**result, "subtasks": subtasks, "missing_subtasks": missing, "metrics": metrics,
            "printed": {name: f"{value:.2f}" for name, value in metrics.items()}}


def read_answer_lines(path: Path) -> list[str]:
    """The file's lines as the official script reads them (`readlines()`: newlines kept)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.readlines()
    except UnicodeDecodeError as error:
        raise EimError(f"answer file is not UTF-8 text (byte {error.start})", where=str(path),
                       hint="write the answer files as UTF-8 text") from None


def read_answer_dir(folder: Path, tasks=None) -> dict[str, tuple[list[str], str]]:
    """{subtask: (lines, path)} of `<folder>/<subtask>.txt`; every subtask of `tasks` (all 14 when None) must
    have its file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EimError(f"answer folder not found: {folder}",
                       hint="pass the folder holding one <subtask>.txt answer file per MME subtask")
    tables = {}
    for task in _check_tasks(tasks, str(folder)):
        path = folder / f"{task}.txt"
        if not path.is_file():
            raise EimError(f"no answer file for MME subtask '{task}'", where=str(path),
                           hint=f"write {task}.txt ({FORMAT_HINT})")
        tables[task] = (read_answer_lines(path), str(path))
    return tables


def score_answer_dir(folder: Path, tasks=None) -> dict:
    """The official scores of a folder of answer files (all 14 subtasks, or the subset `tasks`)."""
    return score_tables(read_answer_dir(folder, tasks))


def always_yes(tables: dict[str, tuple[list[str], str]]) -> dict[str, tuple[list[str], str]]:
    """The same questions answered "yes" throughout (the always-yes control; call after scoring the real
    lines, which checks their format)."""
    return {task: (["\t".join(line.split("\t")[:3] + ["yes\n"]) for line in lines], f"{where} (always yes)")
            for task, (lines, where) in tables.items()}


def answer_line(image: str, question: str, gt: str, prediction: str) -> str:
    """One answer-file line, newline included; the prediction must already be on one line without tabs."""
    return f"{image}\t{question}\t{gt}\t{prediction}\n"


def summary_lines(result: dict) -> list[str]:
    """perception / cognition lines, then one row per subtask (score, acc, acc+ in percent)."""
    lines = [f"{group} {result[group]:.2f}" for group in GROUPS if group in result]
    for task, entry in ((task, result["subtasks"][task]) for task in SUBTASKS if task in result["subtasks"]):
        lines.append(f"  {task:<22} {entry['score']:7.2f}  (acc {100 * entry['acc']:6.2f}, "
                     f"acc+ {100 * entry['acc_plus']:6.2f})")
    if result.get("missing_subtasks"):
        lines.append(f"not scored (absent): {', '.join(result['missing_subtasks'])}; the totals sum the others only")
    return lines
