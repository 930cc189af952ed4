"""MME questions as a split of samples, from the official release or from answer templates.

    data.path = the MME root (MME_Benchmark_release_version/), one folder per subtask:
        artwork, celebrity, landmark, posters, scene:  <task>/images/<img> + <task>/questions_answers_YN/<img>.txt
        the other subtasks:                            <task>/<img> + <task>/<img>.txt side by side
      each .txt holds 2 lines `question<TAB>Yes|No`; images are .png (cognition) or .jpg (perception);
      either is accepted for any subtask. A subtask folder with questions_answers_YN/ is read the first way.
    or data.path = a folder of answer-template files `<task>.txt` (eval_tool/Your_Results/), lines
      `image<TAB>question<TAB>gt` (a 4th field, a prediction, is ignored), consecutive pairs per image,
      with data.image_root = the MME root whose `<task>/images/<img>` or `<task>/<img>` is the image.
    data.image_root defaults to data.path.

Samples keep the files' order: question files by name, the two questions of an image as written
(Yes first in the official files). Subtasks without a folder (or template file) are left out and
listed in `missing`; at least one must be there.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from eimctl.evaluate.mme_scoring import SUBTASKS
from eimctl.runtime.errors import EimError

IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")
SPLIT_NAME = "mme"
ROOT_HINT = ("set data.path (eimctl evaluate mme --mme-root DIR) to the MME release folder with one folder per "
             "subtask, or to a folder of <subtask>.txt answer templates (images under data.image_root)")


@dataclass(frozen=True)
class MMESample:
    sample_id: str      # "<subtask>/<image name>/<0|1>": the question's place in its pair
    image_id: str       # "<subtask>/<image name>" (image names repeat across subtasks)
    image: str          # path relative to the split's image root
    image_name: str     # the name the answer file writes (e.g. 0001.jpg)
    question: str
    gt: str             # "Yes" or "No" as the file writes it
    subtask: str

    @property
    def has_image(self) -> bool:
        return True


@dataclass
class MMESplit:
    name: str
    image_root: Path
    samples: list[MMESample]
    fingerprint: str
    source: str = ""                                   # the folder it was read from
    missing: tuple[str, ...] = field(default=())       # subtasks absent from it

    def images(self) -> list[tuple[str, str]]:
        """Unique (image_id, image path) pairs in split order."""
        seen: dict[str, str] = {}
        for sample in self.samples:
            seen.setdefault(sample.image_id, sample.image)
        return list(seen.items())

    @property
    def subtasks(self) -> list[str]:
        return [task for task in SUBTASKS if task not in self.missing]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise EimError(f"not UTF-8 text (byte {error.start})", where=str(path),
                       hint="restore the file from the MME release") from None


def _question(line: str, where: str) -> tuple[str, str]:
    """(question, "Yes"|"No") of one line `question<TAB>answer` of an official question file."""
    fields = line.strip().split("\t")
    if len(fields) != 2 or fields[1].strip().lower() not in ("yes", "no"):
        raise EimError("not a question line `question<TAB>Yes|No`", where=where,
                       hint="restore the file from the MME release")
    return fields[0], fields[1].strip()


def _image_of(folder: Path, stem: str, where: str) -> str:
    for suffix in IMAGE_SUFFIXES:
        if (folder / (stem + suffix)).is_file():
            return stem + suffix
    raise EimError(f"no image {stem}{'|'.join(IMAGE_SUFFIXES)} for this question file", where=where,
                   hint=f"put the image next to it in {folder}")


def _official_subtask(root: Path, task: str) -> tuple[list[MMESample], list[Path]]:
    """A subtask folder of the release: its questions in file-name order, and the files read."""
    folder = root / task
    nested = (folder / "questions_answers_YN").is_dir()
    questions, images = (folder / "questions_answers_YN", folder / "images") if nested else (folder, folder)
    prefix = f"{task}/images" if nested else task
    files = sorted(questions.glob("*.txt"))
    if not files:
        raise EimError(f"MME subtask '{task}' has no question files", where=str(questions),
                       hint="restore the subtask's folder from the MME release")
    samples = []
    for path in files:
        lines = [(n, line) for n, line in enumerate(_read_text(path).splitlines(), 1) if line.strip()]
        if len(lines) != 2:
            raise EimError(f"question file has {len(lines)} questions, not 2", where=str(path),
                           hint="each image has one Yes and one No question, one per line")
        name = _image_of(images, path.stem, str(path))
        for k, (number, line) in enumerate(lines):
            question, gt = _question(line, f"{path}:{number}")
            samples.append(MMESample(f"{task}/{name}/{k}", f"{task}/{name}", f"{prefix}/{name}", name, question,
                                     gt, task))
    return samples, files


def _image_under(image_root: Path, task: str, name: str, where: str) -> str:
    for relative in (f"{task}/images/{name}", f"{task}/{name}"):
        if (image_root / relative).is_file():
            return relative
    raise EimError(f"image {name} not found under {image_root / task}", where=where,
                   hint=f"set data.image_root to the MME root holding {task}/images/{name} or {task}/{name}")


def _template_pair(path: Path, pair: list[tuple[int, str]]) -> list[tuple[str, str, str]]:
    rows = []
    for number, line in pair:
        fields = line.rstrip("\r\n").split("\t")
        if len(fields) not in (3, 4) or fields[2].lower() not in ("yes", "no"):
            raise EimError("not a template line `image<TAB>question<TAB>Yes|No`", where=f"{path}:{number}",
                           hint="use the answer templates of MME's eval_tool (Your_Results/)")
        rows.append(tuple(fields[:3]))
    if rows[0][0] != rows[1][0]:
        raise EimError(f"the pair's two lines name different images ({rows[0][0]}, {rows[1][0]})",
                       where=f"{path}:{pair[1][0]}", hint="keep the two questions of an image on consecutive lines")
    return rows


def _template_subtask(path: Path, task: str, image_root: Path) -> list[MMESample]:
    lines = [(n, line) for n, line in enumerate(_read_text(path).split("\n"), 1) if line.strip()]
    if not lines or len(lines) % 2:
        raise EimError(f"template has {len(lines)} lines, not a positive even number", where=str(path),
                       hint="two lines (one pair of questions) per image")
    samples = []
    for start in range(0, len(lines), 2):
        pair = _template_pair(path, lines[start:start + 2])
        name = pair[0][0]
        image = _image_under(image_root, task, name, f"{path}:{lines[start][0]}")
        samples += [MMESample(f"{task}/{name}/{k}", f"{task}/{name}", image, name, question, gt, task)
                    for k, (_, question, gt) in enumerate(pair)]
    return samples


def _digest(root: Path, paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def read_mme(data, split: str = SPLIT_NAME) -> MMESplit:
    """Every question of the MME data in `data.path` (`data`: the config's DataConfig). MME has one set of
    questions, so `split` only names nothing: the split is always called "mme"."""
    if not data.path:
        raise EimError("no MME data given", hint=ROOT_HINT)
    root = Path(data.path)
    if not root.is_dir():
        raise EimError(f"MME folder not found: {root}", hint=ROOT_HINT)
    image_root = Path(data.image_root) if data.image_root else root
    templates = [task for task in SUBTASKS if (root / f"{task}.txt").is_file()]
    folders = [task for task in SUBTASKS if (root / task).is_dir()]
    samples: list[MMESample] = []
    read: list[Path] = []
    if templates:
        for task in templates:
            samples += _template_subtask(root / f"{task}.txt", task, image_root)
            read.append(root / f"{task}.txt")
    elif folders:
        for task in folders:
            found, files = _official_subtask(root, task)
            samples += found
            read += files
    else:
        raise EimError(f"no MME subtask folder or answer template in {root}", hint=ROOT_HINT)
    present = templates or folders
    missing = tuple(task for task in SUBTASKS if task not in present)
    return MMESplit(SPLIT_NAME, image_root, samples, f"{_digest(root, read)}:{len(samples)}", str(root), missing)
