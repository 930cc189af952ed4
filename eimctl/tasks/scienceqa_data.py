"""ScienceQA problems: the official files, checked row by row, as a split of samples.

    data.path = folder with problems.json, pid_splits.json and (optionally) captions.json
    data.image_root = folder with {split}/{qid}/image.png   (default: <data.path>/images)

`problems.json` maps a qid (a string) to its 14 fields (question, choices, answer, hint, image,
task, grade, subject, topic, category, skill, lecture, solution, split); `pid_splits.json` maps a
split name (train, val, test, trainval, minitrain, minival, minitest) to its list of qids, whose
order is the split's order (a sample's position is its queue index). `captions.json` holds
`{"captions": {qid: caption}}`; a problem without one has the caption "".

An image lives under the folder of the problem's own `split` field, so `minitest` or `trainval`
find their images where the official download puts them. The split is an eimctl/data/captions.py
Split; `images()` lists only the problems that have an image.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from eimctl.data.captions import Split
from eimctl.runtime.errors import EimError

FIELDS = ("question", "choices", "answer", "hint", "image", "task", "grade", "subject", "topic", "category",
          "skill", "lecture", "solution", "split")
TEXT_FIELDS = ("question", "hint", "task", "grade", "subject", "topic", "category", "skill", "lecture", "solution",
               "split")
MIN_CHOICES, MAX_CHOICES = 2, 5


@dataclass(frozen=True)
class ScienceQASample:
    sample_id: str            # the qid
    image_id: str             # the qid when the problem has an image, else ""
    image: str | None         # path relative to the split's image root, None for a text-only problem
    question: str
    choices: tuple[str, ...]
    answer: int               # index into choices
    hint: str                 # the textual context ("" when none)
    caption: str              # from captions.json ("" when none); in the prompt only with use_caption
    lecture: str
    solution: str
    subject: str
    grade: str
    topic: str
    category: str
    skill: str
    task: str
    split: str                # the problem's own split field (train, val or test)

    @property
    def has_image(self) -> bool:
        return self.image is not None

    def row(self) -> dict:
        """The fields the official scorer reads, as in problems.json."""
        return {"answer": self.answer, "hint": self.hint, "image": self.image, "subject": self.subject,
                "grade": self.grade, "topic": self.topic, "choices": list(self.choices), "split": self.split}


@dataclass
class ScienceQASplit(Split):
    samples: list[ScienceQASample]


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise EimError(f"{what} not found: {path}", hint="data.path must be the folder of the official "
                                                         "problems.json and pid_splits.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise EimError(f"malformed JSON: {error.msg} at line {error.lineno}", where=str(path),
                       hint="restore the file from the official ScienceQA release") from None


def _row_problem(row) -> str | None:
    """What is wrong with one problems.json row, or None."""
    if not isinstance(row, dict):
        return "is not a JSON object"
    missing = [name for name in FIELDS if name not in row]
    if missing:
        return f"lacks field(s) {', '.join(missing)}"
    wrong = [name for name in TEXT_FIELDS if not isinstance(row[name], str)]
    if wrong:
        return f"field(s) {', '.join(wrong)} must be strings"
    if row["image"] is not None and (not isinstance(row["image"], str) or not row["image"]):
        return f"image must be a file name or null, not {row['image']!r}"
    choices = row["choices"]
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices) \
            or not MIN_CHOICES <= len(choices) <= MAX_CHOICES:
        return f"choices must be a list of {MIN_CHOICES} to {MAX_CHOICES} strings, not {choices!r}"
    answer = row["answer"]
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        return f"answer {answer!r} is not an index into its {len(choices)} choices"
    return None


def check_problem(row, qid: str, path: Path) -> None:
    """One EimError naming the file and the qid when a problems.json row is malformed."""
    problem = _row_problem(row)
    if problem:
        raise EimError(f"problem {qid} {problem}", where=f"{path}, problem {qid}",
                       hint="fix or remove that problem (the official problems.json has all 14 fields per problem)")


def load_problems(path: Path) -> dict[str, dict]:
    """problems.json, every row checked (one error naming the first bad qid)."""
    problems = _read_json(Path(path), "problems.json")
    if not isinstance(problems, dict) or not problems:
        raise EimError("problems.json must map qids to problems", where=str(path),
                       hint="use the official ScienceQA problems.json")
    for qid, row in problems.items():
        check_problem(row, qid, Path(path))
    return problems


def _split_qids(path: Path, split: str, problems: dict) -> list[str]:
    splits = _read_json(path, "pid_splits.json")
    if not isinstance(splits, dict) or split not in splits:
        known = ", ".join(sorted(splits)) if isinstance(splits, dict) else "none"
        raise EimError(f"no split '{split}' in pid_splits.json", where=str(path), hint=f"splits there: {known}")
    qids = splits[split]
    if not isinstance(qids, list) or not qids:
        raise EimError(f"split '{split}' is not a non-empty list of qids", where=str(path),
                       hint="use the official pid_splits.json")
    seen: set[str] = set()
    for qid in map(str, qids):
        if qid not in problems:
            raise EimError(f"split '{split}' names qid {qid}, which problems.json lacks", where=f"{path}, qid {qid}",
                           hint="use the problems.json and pid_splits.json of the same release")
        if qid in seen:
            raise EimError(f"split '{split}' names qid {qid} twice", where=f"{path}, qid {qid}",
                           hint="give every qid once")
        seen.add(qid)
    return [str(qid) for qid in qids]


def _captions(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    loaded = _read_json(path, "captions.json")
    captions = loaded.get("captions") if isinstance(loaded, dict) else None
    if not isinstance(captions, dict) or not all(isinstance(c, str) for c in captions.values()):
        raise EimError("captions.json must hold {\"captions\": {qid: caption}}", where=str(path),
                       hint="use the official data/captions.json, or remove the file")
    return captions


def make_sample(qid: str, row: dict, caption: str = "") -> ScienceQASample:
    image = f"{row['split']}/{qid}/{row['image']}" if row["image"] is not None else None
    return ScienceQASample(
        sample_id=qid, image_id=qid if image is not None else "", image=image, question=row["question"],
        choices=tuple(row["choices"]), answer=row["answer"], hint=row["hint"], caption=caption,
        lecture=row["lecture"], solution=row["solution"], subject=row["subject"], grade=row["grade"],
        topic=row["topic"], category=row["category"], skill=row["skill"], task=row["task"], split=row["split"])


def _digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def read_scienceqa(data, split: str) -> ScienceQASplit:
    """The qids of `split` (pid_splits.json order) as samples; `data` is the config's DataConfig."""
    if not data.path:
        raise EimError("no data set given", hint="set data.path to the folder of problems.json and pid_splits.json")
    folder = Path(data.path)
    if folder.is_file():  # data.path may name problems.json itself
        folder = folder.parent
    problems_path, splits_path, captions_path = (folder / name for name in
                                                 ("problems.json", "pid_splits.json", "captions.json"))
    problems = load_problems(problems_path)
    qids = _split_qids(splits_path, split, problems)
    captions = _captions(captions_path)
    samples = [make_sample(qid, problems[qid], captions.get(qid, "")) for qid in qids]
    files = [p for p in (problems_path, splits_path, captions_path) if p.is_file()]
    root = Path(data.image_root) if data.image_root else folder / "images"
    return ScienceQASplit(split, root, samples, f"{_digest(files)}:{split}")
