"""Instruction-tuning data (Alpaca-52k, LLaVA-Instruct-158k) as one split of text-only and image samples.

    data.path       = a folder holding LaVIN's files (those present, in this order): alpaca_data.json,
                      complex_reasoning_77k.json, detail_23k.json, conversation_58k.json;
                      or one JSON file; or a comma-separated list of JSON files (in that order)
    data.image_root = the COCO folder (default: the data folder)

A file's kind comes from its rows: a JSON list of {"instruction", "input", "output"} objects is Alpaca
(text-only samples, qid alpaca_{n}); a list of {"image", "conversations": [{"from": "human"|"gpt",
"value"}, ...]} objects is LLaVA-Instruct ("id" optional). As in LaVIN's conversion, a LLaVA file whose name
starts with "conversation" (conversation_58k) gives every (human, gpt) turn pair as an independent
single-turn sample with no history (qid gpt4_2_{n}_{j}, j the human turn's index), any other LLaVA file its
first pair only (qid gpt4_{n}); n counts rows across the files of the same rule, in order. The human text
loses its "<image>" marker (instruct_prompts.strip_image_marker).

An image resolves as <image_root>/<image>, or else <image_root>/train2014/COCO_train2014_<image> (the COCO
file name LaVIN reads); a missing one is an error at read time naming the file and the row. A bad row
(not an object, a missing key, a wrong type, a human turn without a gpt turn after it, turns out of order)
is one EimError naming the file and the row (its 0-based position in the JSON list).

Splits: `train` is the files above; `val`, when data.path is a folder holding a `val/` folder, is read
from there the same way (qids prefixed "val:"); the data has no test split (no benchmark: evaluate a
chatbot stage with mme). The split is an eimctl/data/captions.py Split.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

from eimctl.data.images import resolve_image
from eimctl.data.captions import Split
from eimctl.runtime.errors import EimError
from eimctl.tasks.instruct_prompts import strip_image_marker

LAVIN_FILES = ("alpaca_data.json", "complex_reasoning_77k.json", "detail_23k.json", "conversation_58k.json")
ALL_TURNS_PREFIX = "conversation"
COCO_PREFIX = "train2014/COCO_train2014_"
ALPACA_KEYS = ("instruction", "input", "output")
NO_BENCHMARK = "instruct has no benchmark; evaluate with mme or chat"


@dataclass(frozen=True)
class InstructSample:
    sample_id: str            # LaVIN's qid: alpaca_{n}, gpt4_{n}, gpt4_2_{n}_{j}
    image_id: str             # the LLaVA image name; "" for a text-only sample
    image: str | None         # path relative to the split's image root; None for a text-only sample
    instruction: str          # Alpaca's instruction, or the human text without its <image> marker
    input: str                # Alpaca's input ("" when none; always "" for LLaVA)
    response: str             # Alpaca's output, or the gpt turn's text
    kind: str                 # alpaca | llava

    @property
    def has_image(self) -> bool:
        return self.image is not None

    @property
    def caption(self) -> str:
        """The response: the text `eim.same_text` compares."""
        return self.response


@dataclass
class InstructSplit(Split):
    samples: list[InstructSample]


def _bad_row(path: Path, row: int, problem: str, hint: str) -> EimError:
    return EimError(f"row {row} {problem}", where=f"{path}, row {row}", hint=hint)


def load_rows(path: Path) -> list:
    """The JSON list in `path` (one error for a missing file, malformed JSON or another top-level type)."""
    if not path.is_file():
        raise EimError(f"instruction file not found: {path}",
                       hint="data.path must be a folder of Alpaca/LLaVA-Instruct JSON files, a file, or a "
                            "comma-separated list of files")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise EimError(f"malformed JSON: {error.msg} at line {error.lineno}", where=str(path),
                       hint="restore the file from its release") from None
    if not isinstance(rows, list) or not rows:
        raise EimError("an instruction file must hold a non-empty JSON list", where=str(path),
                       hint="use alpaca_data.json or a LLaVA-Instruct file such as conversation_58k.json")
    return rows


def file_kind(rows: list, path: Path) -> str:
    """`alpaca` or `llava`, from the first row's keys."""
    first = rows[0]
    if isinstance(first, dict) and "conversations" in first:
        return "llava"
    if isinstance(first, dict) and "instruction" in first:
        return "alpaca"
    raise _bad_row(path, 0, "is neither an Alpaca row nor a LLaVA-Instruct row",
                   'Alpaca rows are {"instruction", "input", "output"}; LLaVA rows {"image", "conversations"}')


def alpaca_samples(rows: list, path: Path, start: int) -> list[InstructSample]:
    """Text-only samples, qid alpaca_{start + row}."""
    hint = 'write {"instruction": str, "input": str ("" when none), "output": str}'
    samples = []
    for row, record in enumerate(rows):
        if not isinstance(record, dict):
            raise _bad_row(path, row, "is not a JSON object", hint)
        missing = [key for key in ALPACA_KEYS if key not in record]
        if missing:
            raise _bad_row(path, row, f"lacks key(s) {', '.join(missing)}", hint)
        wrong = [key for key in ALPACA_KEYS if not isinstance(record[key], str)]
        if wrong:
            raise _bad_row(path, row, f"key(s) {', '.join(wrong)} must be strings", hint)
        samples.append(InstructSample(f"alpaca_{start + row}", "", None, record["instruction"], record["input"],
                                      record["output"], "alpaca"))
    return samples


def turn_pairs(record, path: Path, row: int) -> list[tuple[int, str, str]]:
    """(human turn index, human text, gpt text) of a LLaVA row's turns, checked."""
    hint = 'write {"image": "<COCO file name>", "conversations": [{"from": "human", "value": ...}, ' \
           '{"from": "gpt", "value": ...}, ...]}'
    if not isinstance(record, dict):
        raise _bad_row(path, row, "is not a JSON object", hint)
    missing = [key for key in ("image", "conversations") if key not in record]
    if missing:
        raise _bad_row(path, row, f"lacks key(s) {', '.join(missing)}", hint)
    if not isinstance(record["image"], str) or not record["image"]:
        raise _bad_row(path, row, f"image must be a file name, not {record['image']!r}", hint)
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise _bad_row(path, row, "conversations must be a non-empty list of turns", hint)
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise _bad_row(path, row, f"turn {index} must be an object with a string 'value'", hint)
        expected = "human" if index % 2 == 0 else "gpt"
        if turn.get("from") != expected:
            raise _bad_row(path, row, f"turn {index} is from {turn.get('from')!r}, expected '{expected}' "
                                      "(turns alternate human, gpt)", hint)
    if len(turns) % 2:
        raise _bad_row(path, row, f"human turn {len(turns) - 1} has no gpt turn after it", hint)
    return [(j, turns[j]["value"], turns[j + 1]["value"]) for j in range(0, len(turns), 2)]


class ImageResolver:
    """A LLaVA image name -> its path under the root (as given, or COCO's train2014 name), cached per name."""

    def __init__(self, root: Path, allow_outside_root: bool):
        self.root, self.allow_outside_root = Path(root), allow_outside_root
        self.found: dict[str, str] = {}

    def __call__(self, name: str, where: str) -> str:
        if name not in self.found:
            candidates = (name, COCO_PREFIX + name)
            for candidate in candidates:
                try:
                    path = resolve_image(self.root, candidate, self.allow_outside_root)
                except EimError as error:
                    raise EimError(error.what, where=where, hint=error.hint) from None
                if path.is_file():
                    self.found[name] = candidate
                    break
            else:
                raise EimError(f"image not found: {name}", where=where,
                               hint=f"looked for {self.root / candidates[0]} and {self.root / candidates[1]}; "
                                    "set data.image_root to the COCO folder (holding train2014/)")
        return self.found[name]


def llava_samples(rows: list, path: Path, start: int, images: ImageResolver) -> list[InstructSample]:
    """Image samples: every turn pair (a conversation* file, qid gpt4_2_{n}_{j}) or the first pair (gpt4_{n})."""
    all_turns = path.stem.startswith(ALL_TURNS_PREFIX)
    samples = []
    for row, record in enumerate(rows):
        pairs = turn_pairs(record, path, row)
        image = images(record["image"], f"{path}, row {row}")
        n = start + row
        for j, human, gpt in pairs if all_turns else pairs[:1]:
            qid = f"gpt4_2_{n}_{j}" if all_turns else f"gpt4_{n}"
            samples.append(InstructSample(qid, record["image"], image, strip_image_marker(human), "", gpt, "llava"))
    return samples


def data_files(path_text: str) -> list[Path]:
    """The instruction files data.path names: LaVIN's files in a folder, or a file, or a comma-separated list."""
    parts = [Path(part.strip()) for part in path_text.split(",") if part.strip()]
    if len(parts) == 1 and parts[0].is_dir():
        found = [parts[0] / name for name in LAVIN_FILES if (parts[0] / name).is_file()]
        if not found:
            raise EimError(f"no instruction files in {parts[0]}",
                           hint=f"put one or more of {', '.join(LAVIN_FILES)} there, or list the files in "
                                "data.path (comma-separated)")
        return found
    return parts


def _digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def read_files(files: list[Path], images: ImageResolver) -> list[InstructSample]:
    """Every file's samples in order; qid counters run on across the files of the same kind and rule."""
    samples: list[InstructSample] = []
    counters = {"alpaca": 0, "first": 0, "all": 0}
    for path in files:
        rows = load_rows(path)
        if file_kind(rows, path) == "alpaca":
            samples += alpaca_samples(rows, path, counters["alpaca"])
            counters["alpaca"] += len(rows)
            continue
        rule = "all" if path.stem.startswith(ALL_TURNS_PREFIX) else "first"
        samples += llava_samples(rows, path, counters[rule], images)
        counters[rule] += len(rows)
    return samples


def _split_files(data, split: str) -> tuple[Path, list[Path]]:
    """(data folder, the split's files)."""
    if not data.path:
        raise EimError("no instruction data given",
                       hint=f"set data.path to a folder holding {', '.join(LAVIN_FILES)} (those you have), or "
                            "to a comma-separated list of Alpaca/LLaVA-Instruct JSON files")
    first = Path(data.path.split(",")[0].strip())
    folder = first if first.is_dir() else first.parent
    if split == "train":
        return folder, data_files(data.path)
    if split == "val":
        if first.is_dir() and (first / "val").is_dir():
            return folder, data_files(str(first / "val"))
        raise EimError("the instruction data has no val split",
                       hint=f"put held-out files with the same names in {folder / 'val'} for the val diagnostics")
    raise EimError(f"the instruction data has no '{split}' split", where="data.task=instruct", hint=NO_BENCHMARK)


def read_instruct(data, split: str) -> InstructSplit:
    """The split's samples in file order (a sample's position is its queue index); `data` is the DataConfig."""
    folder, files = _split_files(data, split)
    root = Path(data.image_root) if data.image_root else folder
    samples = read_files(files, ImageResolver(root, data.allow_outside_root))
    if split != "train":
        samples = [replace(sample, sample_id=f"{split}:{sample.sample_id}") for sample in samples]
    return InstructSplit(split, root, samples, f"{_digest(files)}:{split}")
