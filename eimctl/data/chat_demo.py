"""Instruction data and an MME-layout benchmark over rendered scenes, for the offline embedded chat demo.

    summary = generate_chat_demo(Path("runs/chat-demo/data"))

Scenes are the caption demo's (data/demo.py): 64x64 pictures of one to three coloured shapes in distinct
cells of a 3x3 grid, drawn with its object-count weights over every colour-shape pair (its `world`
distribution, which the demo CLIP was pretrained on) and drawn by its renderer. Written atomically (a
temporary sibling folder, renamed into place), summary.json last:

    <out>/train/detail_23k.json        LLaVA rows, first turn only: "<image>\\nDescribe the picture." (a few
                                       paraphrases) -> a description naming every object and its place
    <out>/train/conversation_58k.json  LLaVA rows, every (human, gpt) pair a sample: 2-3 turns per image,
                                       open questions with short answers (colour, shape, count, position,
                                       size) and MME-style yes/no questions ("... Please answer yes or no."
                                       -> "Yes"/"No") in (Yes, No) pairs of one family: existence, count,
                                       position or colour
    <out>/train/alpaca_data.json       Alpaca rows, text-only (with and without `input`): word facts,
                                       arithmetic, opposites, naming, rewriting; 30% of all samples
    <out>/train/images/train-<n>.png   the pictures; a LLaVA row's `image` is the bare file name
    <out>/mme/<subtask>/<subtask>-<n>.jpg + .txt   the MME release layout for existence, count, position and
                                       color: two lines `question<TAB>Yes` then `question<TAB>No`, both about
                                       the image, on scenes unlike every training scene
    <out>/mme/answer_templates/<subtask>.txt       the eval tool's Your_Results form: `image<TAB>question<TAB>gt`
    <out>/summary.json                 parameters and counts (samples by kind, text-only share, yes/no balance)

The training files carry LaVIN's names because eimctl's instruct reader takes exactly those from a folder
(tasks/instruct_data.py), so a config reads them with

    data.task=instruct  data.path=<out>/train  data.image_root=<out>/train/images

and the benchmark is `eimctl evaluate mme --mme-root <out>/mme` (or data.path=<out>/mme/answer_templates
with data.image_root=<out>/mme). Deterministic: one generator per (seed, part, index, attempt); a folder
holding a finished set with the same parameters is kept.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from eimctl.data.demo import (COLOURS, COUNT_WORDS, OBJECT_COUNT_WEIGHTS, POSITION_PHRASES, SHAPES, SIZES,
                              SceneObject, build_set_once, render_scene)
from eimctl.runtime.atomic import write_json, write_text
from eimctl.runtime.errors import EimError

GENERATOR_VERSION = 1  # bump when the scene, question or file rules change, so an older cached set is not reused
SUMMARY = "summary.json"
TRAIN_FILES = {"alpaca": "alpaca_data.json", "detail": "detail_23k.json", "conversation": "conversation_58k.json"}
MME_SUBTASKS = ("existence", "count", "position", "color")
CODES = {"train": 20, "alpaca": 21, "existence": 22, "count": 23, "position": 24, "color": 25}
TEXT_ONLY_SHARE = 0.3
YES_NO = " Please answer yes or no."
DESCRIBE = ("Describe the picture.", "What do you see in this image?", "Describe the image in detail.",
            "Tell me what is in the picture.", "What does this image show?", "Give a short description of the image.")
_COLOURS, _CELLS = tuple(COLOURS), tuple(POSITION_PHRASES)
MAX_ATTEMPTS = 200


def _pick(rng: np.random.Generator, values):
    return values[int(rng.integers(len(values)))]


def sample_scene(rng: np.random.Generator) -> list[SceneObject]:
    """The caption demo's world scene: 1-3 objects (its weights) in distinct cells, any colour-shape pair."""
    n = int(rng.choice(3, p=OBJECT_COUNT_WEIGHTS)) + 1
    cells = rng.choice(len(_CELLS), size=n, replace=False)
    return [SceneObject(shape=_pick(rng, SHAPES), colour=_pick(rng, _COLOURS), size=_pick(rng, SIZES),
                        cell=divmod(int(cell), 3)) for cell in cells]


def scene_key(objects: list[SceneObject]) -> tuple:
    """What makes two scenes the same picture up to jitter, background and noise."""
    return tuple(sorted((o.cell, o.colour, o.shape, o.size) for o in objects))


def _unique(objects: list[SceneObject], key) -> list[SceneObject]:
    """The objects no other object shares `key` with (so "the <key>" names exactly one)."""
    counts = Counter(key(o) for o in objects)
    return [o for o in objects if counts[key(o)] == 1]


def _loosely_at(phrase_cell: tuple[int, int], cell: tuple[int, int]) -> bool:
    """Whether an object in `cell` could be said to be at `phrase_cell`'s phrase: an edge phrase ("at the top",
    "on the left") names its whole row or column; corners and the centre name their cell only."""
    row, col = phrase_cell
    if (row, col) == (1, 1) or (row != 1 and col != 1):
        return phrase_cell == cell
    return cell[0] == row if col == 1 else cell[1] == col


# Yes/no families: (objects, rng) -> (question answered Yes, question answered No), or None when the scene
# has no object the family can name unambiguously. Both questions are about the same picture.
def _existence(objects: list[SceneObject], rng: np.random.Generator):
    present = {(o.colour, o.shape) for o in objects}
    shown = _pick(rng, objects)
    absent = [(c, s) for c in _COLOURS for s in SHAPES if (c, s) not in present]
    near = [(c, s) for c, s in absent if any(c == o.colour or s == o.shape for o in objects)]
    colour, shape = _pick(rng, near if near and rng.random() < 0.5 else absent)
    return (f"Is there a {shown.colour} {shown.shape} in this image?", f"Is there a {colour} {shape} in this image?")


def _count_question(n: int, noun: str) -> str:
    return f"Is there one {noun} in this image?" if n == 1 else f"Are there {COUNT_WORDS[n]} {noun}s in this image?"


def _count(objects: list[SceneObject], rng: np.random.Generator):
    noun, n = _pick(rng, ("object", "shape")), len(objects)
    return _count_question(n, noun), _count_question(_pick(rng, [m for m in COUNT_WORDS if m != n]), noun)


def _position(objects: list[SceneObject], rng: np.random.Generator):
    named = _unique(objects, lambda o: (o.colour, o.shape))
    if not named:
        return None
    obj = _pick(rng, named)
    wrong = _pick(rng, [cell for cell in _CELLS if not _loosely_at(cell, obj.cell)])
    return tuple(f"Is the {obj.colour} {obj.shape} {POSITION_PHRASES[cell]} of the picture?"
                 for cell in (obj.cell, wrong))


def _colour(objects: list[SceneObject], rng: np.random.Generator):
    named = _unique(objects, lambda o: o.shape)
    if not named:
        return None
    obj = _pick(rng, named)
    wrong = _pick(rng, [c for c in _COLOURS if c != obj.colour])
    return f"Is the {obj.shape} {obj.colour}?", f"Is the {obj.shape} {wrong}?"


FAMILIES = {"existence": _existence, "count": _count, "position": _position, "color": _colour}


def yes_no_pair(family: str, objects: list[SceneObject], rng: np.random.Generator):
    """((question, "Yes"), (question, "No")) of `family` about the scene, or None; questions end like MME's."""
    pair = FAMILIES[family](objects, rng)
    return None if pair is None else ((pair[0] + YES_NO, "Yes"), (pair[1] + YES_NO, "No"))


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def describe(objects: list[SceneObject], rng: np.random.Generator) -> str:
    """A description naming every object with its size, colour, shape and place, in one of five phrasings."""
    order = [objects[int(i)] for i in rng.permutation(len(objects))]
    placed, n = _join([o.placed_phrase() for o in order]), len(order)
    count = f"{COUNT_WORDS[n]} shape" + ("s" if n > 1 else "")
    return _pick(rng, (f"The picture shows {placed}.", f"In this image we can see {placed}.",
                       f"There {'is' if n == 1 else 'are'} {count} in the image: {placed}.",
                       f"A dark picture with {placed}.",
                       _cap(_join([f"{POSITION_PHRASES[o.cell]} there is {o.noun_phrase()}" for o in order])) + "."))


def open_questions(objects: list[SceneObject]) -> list[tuple[str, str]]:
    """Every open question with a short answer that the scene decides unambiguously."""
    n = len(objects)
    found = [("How many objects are in the picture?", f"There {'is' if n == 1 else 'are'} {COUNT_WORDS[n]}."),
             ("What colours do you see?", _cap(_join(sorted({o.colour for o in objects}))) + ".")]
    for o in _unique(objects, lambda o: o.shape):
        found += [(f"What colour is the {o.shape}?", f"The {o.shape} is {o.colour}."),
                  (f"Is the {o.shape} large or small?", f"It is {o.size}.")]
    for o in _unique(objects, lambda o: o.colour):
        found.append((f"Which shape is {o.colour}?", f"The {o.colour} shape is a {o.shape}."))
    for o in _unique(objects, lambda o: (o.colour, o.shape)):
        found.append((f"Where is the {o.colour} {o.shape}?", f"It is {POSITION_PHRASES[o.cell]}."))
    for o in objects:
        found.append((f"What is {POSITION_PHRASES[o.cell]} of the picture?", _cap(o.noun_phrase()) + "."))
    return found


def conversation(objects: list[SceneObject], rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """2-3 (question, answer, family) turns in random order: one open question and a yes/no pair, a yes/no
    pair, or two open questions (family "open")."""
    n_turns = 2 + int(rng.integers(2))
    with_pair = n_turns == 3 or rng.random() < 0.5
    turns = []
    if with_pair:
        for family in (list(FAMILIES)[int(i)] for i in rng.permutation(len(FAMILIES))):
            pair = yes_no_pair(family, objects, rng)
            if pair is not None:  # existence and count always are
                turns += [(q, a, family) for q, a in pair]
                break
    opens = open_questions(objects)
    turns += [(*opens[int(i)], "open") for i in rng.choice(len(opens), n_turns - len(turns), replace=False)]
    return [turns[int(i)] for i in rng.permutation(len(turns))]


def _llava_row(row_id: str, image: str, turns: list[tuple[str, str]]) -> dict:
    values = [text for pair in turns for text in pair]
    values[0] = "<image>\n" + values[0]
    return {"id": row_id, "image": image,
            "conversations": [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(values)]}


def _write_train_images(root: Path, seed: int, n_images: int, image_size: int) -> tuple[list, list, Counter, set]:
    """Render the training pictures; (detail rows, conversation rows, counts, scene keys)."""
    (root / "images").mkdir(parents=True)
    detail, talks, counts, keys = [], [], Counter(), set()
    for index in range(n_images):
        rng = np.random.default_rng([seed, CODES["train"], index])
        objects = sample_scene(rng)
        keys.add(scene_key(objects))
        name = f"train-{index}.png"
        render_scene(objects, rng, image_size).save(root / "images" / name, format="PNG", optimize=False)
        detail.append(_llava_row(f"train-{index}-detail", name, [(_pick(rng, DESCRIBE), describe(objects, rng))]))
        turns = conversation(objects, rng)
        talks.append(_llava_row(f"train-{index}-conversation", name, [(q, a) for q, a, _ in turns]))
        for _, answer, family in turns:
            counts["conversation_open" if family == "open" else "conversation_yes_no"] += 1
            if family != "open":
                counts[f"{family}:{answer}"] += 1
    counts["detail"] = n_images
    return detail, talks, counts, keys


# Text-only Alpaca items: rng -> (instruction, input, output).
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_PAIRS = (("hot", "cold"), ("big", "small"), ("fast", "slow"), ("wet", "dry"), ("day", "night"), ("up", "down"),
          ("old", "new"), ("light", "dark"), ("left", "right"), ("top", "bottom"), ("open", "closed"))
OPPOSITES = {**dict(_PAIRS), **{b: a for a, b in _PAIRS}}
SIDES = {"triangle": "three sides", "square": "four equal sides", "diamond": "four equal sides",
         "circle": "no corners", "cross": "two bars that cross"}
NAMED = {"a colour": _COLOURS, "a shape": SHAPES, "an animal": ("cat", "dog", "bird", "fish", "horse", "frog"),
         "a number": NUMBER_WORDS[1:]}
PAST = {"kicks": "kicked", "throws": "threw", "sees": "saw", "finds": "found", "holds": "held", "paints": "painted",
        "draws": "drew", "carries": "carried"}
WHO = ("The boy", "The girl", "My friend", "The teacher", "Ana", "Leo")
THINGS = ("the ball", "a red box", "the blue kite", "a small cup", "the green hat")


def _word_class(rng):
    word = _pick(rng, _COLOURS + SHAPES)
    kind = "colour" if word in COLOURS else "shape"
    if rng.random() < 0.5:
        return f"Is {word} a colour or a shape?", "", f"{_cap(word)} is a {kind}."
    return "Say whether the word is a colour or a shape.", word, f"A {kind}."


def _sum(rng):
    a, b = int(rng.integers(10)), int(rng.integers(10))
    if rng.random() < 0.5:
        return f"What is {a} plus {b}?", "", f"{a} plus {b} is {a + b}."
    return "Add the two numbers.", f"{a} and {b}", str(a + b)


def _difference(rng):
    a = int(rng.integers(1, 20))
    b = int(rng.integers(a + 1))
    if rng.random() < 0.5:
        return f"What is {a} minus {b}?", "", f"{a} minus {b} is {a - b}."
    return "Subtract the second number from the first.", f"{a} and {b}", str(a - b)


def _opposite(rng):
    word = _pick(rng, tuple(OPPOSITES))
    if rng.random() < 0.5:
        return f"What is the opposite of {word}?", "", f"The opposite of {word} is {OPPOSITES[word]}."
    return "Give the opposite of the word.", word, _cap(OPPOSITES[word]) + "."


def _name(rng):
    label = _pick(rng, tuple(NAMED))
    return f"Name {label}.", "", _cap(_pick(rng, NAMED[label])) + "."


def _past(rng):
    verb = _pick(rng, tuple(PAST))
    who, thing = _pick(rng, WHO), _pick(rng, THINGS)
    return "Rewrite the sentence in the past tense.", f"{who} {verb} {thing}.", f"{who} {PAST[verb]} {thing}."


def _sort_words(rng):
    words = [_COLOURS[int(i)] for i in rng.choice(len(_COLOURS), 2 + int(rng.integers(3)), replace=False)]
    return "Sort the words in alphabetical order.", ", ".join(words), ", ".join(sorted(words))


def _larger(rng):
    a, b = (int(x) for x in rng.choice(20, 2, replace=False))
    return f"Which number is larger, {a} or {b}?", "", f"{max(a, b)} is larger."


def _shape_fact(rng):
    shape = _pick(rng, SHAPES)
    return f"What does a {shape} look like?", "", f"A {shape} has {SIDES[shape]}."


def _number_word(rng):
    n = int(rng.integers(len(NUMBER_WORDS)))
    if rng.random() < 0.5:
        return "Write the number as a word.", str(n), NUMBER_WORDS[n]
    return f"Which number is the word {NUMBER_WORDS[n]}?", "", f"The word {NUMBER_WORDS[n]} is the number {n}."


ALPACA_KINDS = (_word_class, _sum, _difference, _opposite, _name, _past, _sort_words, _larger, _shape_fact,
                _number_word)


def alpaca_rows(seed: int, n: int) -> list[dict]:
    rows = []
    for index in range(n):
        rng = np.random.default_rng([seed, CODES["alpaca"], index])
        instruction, given, output = _pick(rng, ALPACA_KINDS)(rng)
        rows.append({"instruction": instruction, "input": given, "output": output})
    return rows


def mme_item(task: str, index: int, seed: int, avoid: set) -> tuple[list[SceneObject], tuple, np.random.Generator]:
    """A scene unlike every training scene and its (Yes, No) pair of the subtask's family."""
    for attempt in range(MAX_ATTEMPTS):
        rng = np.random.default_rng([seed, CODES[task], index, attempt])
        objects = sample_scene(rng)
        if scene_key(objects) in avoid:
            continue
        pair = yes_no_pair(task, objects, rng)
        if pair is not None:
            return objects, pair, rng
    raise EimError(f"could not draw an MME {task} scene unlike every training scene", where=f"image {index}")


def _write_mme(root: Path, seed: int, n_images: int, image_size: int, avoid: set) -> dict[str, int]:
    """Each subtask's pictures (.jpg) with their question files, and the answer templates."""
    questions = {}
    for task in MME_SUBTASKS:
        folder = root / task
        folder.mkdir(parents=True)
        template = []
        for index in range(n_images):
            objects, pair, rng = mme_item(task, index, seed, avoid)
            name = f"{task}-{index:04d}"
            render_scene(objects, rng, image_size).save(folder / f"{name}.jpg", format="JPEG", quality=95)
            (folder / f"{name}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in pair), encoding="utf-8")
            template += [f"{name}.jpg\t{q}\t{a}\n" for q, a in pair]
        write_text(root / "answer_templates" / f"{task}.txt", "".join(template))
        questions[task] = 2 * n_images
    return questions


def _train_counts(counts: Counter, n_alpaca_input: int, n_alpaca: int) -> dict:
    samples = {"detail": counts["detail"], "conversation_open": counts["conversation_open"],
               "conversation_yes_no": counts["conversation_yes_no"], "alpaca_with_input": n_alpaca_input,
               "alpaca_without_input": n_alpaca - n_alpaca_input}
    total = sum(samples.values())
    by_family = {f: {a: counts[f"{f}:{a}"] for a in ("Yes", "No")} for f in FAMILIES}
    return {"samples": samples, "total_samples": total, "text_only_share": round(n_alpaca / max(1, total), 4),
            "yes_no": {"Yes": sum(v["Yes"] for v in by_family.values()),
                       "No": sum(v["No"] for v in by_family.values()), "by_family": by_family}}


def _write_all(staging: Path, parameters: dict) -> dict:
    seed, size = parameters["seed"], parameters["image_size"]
    train = staging / "train"
    detail, talks, counts, keys = _write_train_images(train, seed, parameters["n_train_images"], size)
    n_image_samples = counts["detail"] + counts["conversation_open"] + counts["conversation_yes_no"]
    alpaca = alpaca_rows(seed, round(n_image_samples * TEXT_ONLY_SHARE / (1 - TEXT_ONLY_SHARE)))
    for kind, rows in (("alpaca", alpaca), ("detail", detail), ("conversation", talks)):
        write_text(train / TRAIN_FILES[kind], json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
    questions = _write_mme(staging / "mme", seed, parameters["n_mme_images"], size, keys)
    train_counts = _train_counts(counts, sum(1 for row in alpaca if row["input"]), len(alpaca))
    return {"generator_version": GENERATOR_VERSION, "parameters": parameters,
            "train": {"images": parameters["n_train_images"], **train_counts},
            "mme": {"images": {task: parameters["n_mme_images"] for task in MME_SUBTASKS}, "questions": questions}}


def generate_chat_demo(out: Path, *, seed: int = 0, n_train_images: int = 1500, n_mme_images: int = 30,
                       image_size: int = 64) -> dict:
    """Write the chat demo's instruction data (`out/train`) and MME-layout benchmark (`out/mme`) and return the
    summary (also `out/summary.json`, written last); a folder holding a finished set with the same parameters
    is kept."""
    out = Path(out)
    if n_train_images < 1 or n_mme_images < 1 or image_size < 8:
        raise EimError("n_train_images and n_mme_images must be >= 1 and image_size >= 8")
    parameters = {"generator_version": GENERATOR_VERSION, "seed": seed, "n_train_images": n_train_images,
                  "n_mme_images": n_mme_images, "image_size": image_size}
    def write(staging: Path) -> dict:
        summary = _write_all(staging, parameters)
        write_json(staging / SUMMARY, summary)
        return summary
    return build_set_once(out, SUMMARY, parameters, write)
