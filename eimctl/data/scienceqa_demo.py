"""A synthetic ScienceQA-format set for the offline embedded demo: the official files over rendered scenes.

    summary = generate_scienceqa_demo(Path("runs/sqa-demo/data"))

Written atomically (a temporary sibling folder, renamed into place), in the official layout:
problems.json ({qid: the 14 official fields}, qids "1".."N" in a seeded order that hides the
split), pid_splits.json (train, val, test, trainval, minitrain, minival, minitest),
images/<split>/<qid>/image.png (the caption demo's scene renderer) and summary.json (parameters
and counts per category, last). Each problem's answer follows only from its context type:

    IMG      a picture, empty hint: the colour, shape, count or position of the rendered objects
    TXT      a hint stating two or three facts; the question asks one, the others are distractors
    NO       no context: a rule learnable from the question (small sums, opposites, next day, word classes)
    TXT+IMG  a hint saying who owns which shape plus the picture, both needed (counted as TXT and IMG)

No shortcuts: the number of choices (2-5) and the answer's position are drawn per problem,
independently of everything else; the answer is uniform over its kind's values and distractors
are values of the same kind. Subject, topic and grade are balanced labels drawn independently of
the question kind (so category columns are comparable); category and skill name the kind. The
lecture is one per kind; the solution restates what decides the answer (for a picture, every
object in it). No train or val problem has a test problem's `problem_key` (colliding draws are
redrawn). Deterministic: one generator per (seed, split, index, attempt).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from eimctl.data.demo import (COLOURS, POSITION_PHRASES, SHAPES, SIZES, SceneObject, build_set_once,
                              render_scene)
from eimctl.runtime.atomic import write_json, write_text
from eimctl.runtime.errors import EimError

GENERATOR_VERSION = 1  # bump when the problem or rendering rules change, so an older cached set is not reused
DEFAULT_IMAGE_SIZE = 64  # the caption demo's image size, so one demo CLIP suits both
SUMMARY = "summary.json"
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
SUBJECT_TOPICS = {  # the 26 ScienceQA topics
    "natural science": ("biology", "chemistry", "earth-science", "physics", "science-and-engineering-practices",
                        "units-and-measurement"),
    "social science": ("civics", "culture", "economics", "geography", "global-studies", "us-history", "world-history"),
    "language science": ("capitalization", "figurative-language", "grammar", "literacy-in-science",
                         "phonological-awareness", "pronouns", "punctuation", "reading-comprehension",
                         "reference-skills", "verbs", "vocabulary", "word-study", "writing-strategies"),
}
SUBJECT_CODES = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
GRADE_BANDS = {"G1-6": tuple(f"grade{g}" for g in range(1, 7)), "G7-12": tuple(f"grade{g}" for g in range(7, 13))}
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NAMES = ("Ana", "Ben", "Mia", "Leo", "Sam", "Eva")
THINGS = ("kite", "box", "ball", "cup", "hat", "bag")
COUNTABLES = ("apples", "books", "shells", "coins")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
ACTIVITIES = ("swims", "reads", "paints", "runs")
MATERIALS = ("wood", "glass", "metal", "paper", "stone", "rubber")
MADE_THINGS = ("spoon", "chair", "bottle", "door", "bowl", "toy")
_PAIRS = (("hot", "cold"), ("big", "small"), ("fast", "slow"), ("wet", "dry"), ("day", "night"), ("up", "down"),
          ("old", "new"))
OPPOSITES = {**dict(_PAIRS), **{b: a for a, b in _PAIRS}}
WORD_CLASSES = {"an animal": ("cat", "dog", "fish", "bird", "frog", "horse"), "a colour": tuple(COLOURS),
                "a material": MATERIALS, "a shape": SHAPES}
_COLOURS, _PLACES = tuple(COLOURS), tuple(POSITION_PHRASES.values())

# kind -> (category, skill, lecture); the lecture states the kind's general rule, as ScienceQA's do.
_BOTH = "Some questions need a text and a picture.\nUse the text to find the shape to look at, then look at it."
KIND_INFO = {
    "img-colour": ("Colours in pictures", "Identify the colour of a shape in a picture",
                   "Shapes in a picture can have different colours.\nFind the shape and look at its colour."),
    "img-shape": ("Shapes in pictures", "Identify a shape in a picture by its colour",
                  "Shapes have names such as circle, square and triangle.\nFind the shape and look at its outline."),
    "img-count": ("Counting in pictures", "Count the shapes in a picture",
                  "To count shapes, look at each shape once.\nThe last number you say is how many there are."),
    "img-position": ("Positions in pictures", "Find where a shape is in a picture",
                     "A picture has a top, a bottom, two sides and a centre.\nFind the shape and see where it is."),
    "txt-colour": ("Reading for details", "Find the colour of a thing in a text",
                   "A text can tell you facts.\nFind the sentence about the person in the question."),
    "txt-count": ("Reading for details", "Find a number in a text",
                  "A text can tell you how many things someone has.\nFind the sentence about the person."),
    "txt-day": ("Reading for details", "Find a day in a text",
                "A text can tell you when people do things.\nFind the sentence about the person."),
    "txt-material": ("Materials", "Find what a thing is made of in a text",
                     "Things are made of materials such as wood, glass and metal.\nFind the sentence about the thing."),
    "no-sum": ("Adding numbers", "Add two small numbers", "To add, start at the first number and count on."),
    "no-opposite": ("Opposites", "Find the opposite of a word",
                    "Opposites are words with very different meanings.\nFor example, hot and cold are opposites."),
    "no-next-day": ("Days of the week", "Find the day that comes next",
                    "The days go from Monday to Sunday.\nAfter Sunday comes Monday again."),
    "no-word-class": ("Word classes", "Find the word that names a kind of thing",
                      "Words can name animals, colours, materials or shapes.\nFor example, cat names an animal."),
    "both-shape": ("Pictures and texts", "Use a text and a picture to name a shape", _BOTH),
    "both-colour": ("Pictures and texts", "Use a text and a picture to find a colour", _BOTH),
}
# TXT kinds: (subjects, values, extra words, fact, question); a hint states two or three facts.
_TXT = {
    "txt-colour": (NAMES, _COLOURS, THINGS, "{who} has a {value} {extra}.", "What colour is {who}'s {extra}?"),
    "txt-count": (NAMES, NUMBERS[1:], COUNTABLES, "{who} has {value} {extra}.", "How many {extra} does {who} have?"),
    "txt-day": (NAMES, DAYS, ACTIVITIES, "{who} {extra} on {value}.", "On which day does {who} {verb}?"),
    "txt-material": (MADE_THINGS, MATERIALS, ("",), "the {who} is made of {value}.", "What is the {who} made of?"),
}
# NO kinds answered by a lookup: (table, question, statement of the answer)
_LOOKUPS = {"no-opposite": (OPPOSITES, "What is the opposite of {}?", "The opposite of {}"),
            "no-next-day": ({d: DAYS[(i + 1) % 7] for i, d in enumerate(DAYS)}, "Which day comes after {}?",
                            "The day after {}")}


@dataclass
class Draft:
    """One problem before its choices are drawn."""
    kind: str
    question: str
    answer: str
    pool: tuple[str, ...]        # the kind's values; the distractors come from here
    solution: str
    hint: str = ""
    forced: tuple[str, ...] = ()  # distractors to offer first (the hint's other facts)
    objects: list[SceneObject] | None = None


def _pick(rng: np.random.Generator, values) -> str:
    return values[int(rng.integers(len(values)))]


def _objects(rng: np.random.Generator, n: int, fixed: list[tuple[str, str]], avoid=lambda colour, shape: False,
             first_cell: int | None = None) -> list[SceneObject]:
    """`n` objects in distinct random cells: `fixed` (colour, shape) pairs first, then random ones that never
    satisfy `avoid`; `first_cell` places the first object."""
    cells = [int(c) for c in rng.permutation(9) if int(c) != first_cell]
    cells = ([first_cell] if first_cell is not None else []) + cells
    objects = []
    for i in range(n):
        if i < len(fixed):
            colour, shape = fixed[i]
        else:
            colour, shape = _pick(rng, _COLOURS), _pick(rng, SHAPES)
            while avoid(colour, shape):
                colour, shape = _pick(rng, _COLOURS), _pick(rng, SHAPES)
        objects.append(SceneObject(shape=shape, colour=colour, size=_pick(rng, SIZES), cell=divmod(cells[i], 3)))
    return objects


def _shows(objects: list[SceneObject]) -> str:
    """Every object in reading order (by cell): "The picture shows a small red circle at the top left and ..."."""
    phrases = [obj.placed_phrase() for obj in sorted(objects, key=lambda obj: obj.cell)]
    return "The picture shows " + (phrases[0] if len(phrases) == 1 else
                                   ", ".join(phrases[:-1]) + " and " + phrases[-1]) + "."


def _img_colour(rng: np.random.Generator) -> Draft:
    colour, shape = _pick(rng, _COLOURS), _pick(rng, SHAPES)
    objects = _objects(rng, 1 + int(rng.integers(3)), [(colour, shape)], lambda c, s: s == shape)
    return Draft("img-colour", f"What colour is the {shape}?", colour, _COLOURS,
                 f"{_shows(objects)} The {shape} is {colour}, so the answer is {colour}.", objects=objects)


def _img_shape(rng: np.random.Generator) -> Draft:
    colour, shape = _pick(rng, _COLOURS), _pick(rng, SHAPES)
    objects = _objects(rng, 1 + int(rng.integers(3)), [(colour, shape)], lambda c, s: c == colour)
    return Draft("img-shape", f"Which shape is {colour}?", shape, SHAPES,
                 f"{_shows(objects)} The {colour} shape is a {shape}, so the answer is {shape}.", objects=objects)


def _img_count(rng: np.random.Generator) -> Draft:
    n = 1 + int(rng.integers(5))
    objects, word = _objects(rng, n, []), NUMBERS[n - 1]
    noun = "shape" if n == 1 else "shapes"
    return Draft("img-count", "How many shapes are in the picture?", word, NUMBERS[:5],
                 f"{_shows(objects)} That is {word} {noun}, so the answer is {word}.", objects=objects)


def _img_position(rng: np.random.Generator) -> Draft:
    colour, shape, cell = _pick(rng, _COLOURS), _pick(rng, SHAPES), int(rng.integers(9))
    objects = _objects(rng, 1 + int(rng.integers(3)), [(colour, shape)], lambda c, s: (c, s) == (colour, shape),
                       first_cell=cell)
    place = POSITION_PHRASES[divmod(cell, 3)]
    return Draft("img-position", f"Where is the {colour} {shape}?", place, _PLACES,
                 f"{_shows(objects)} The {colour} {shape} is {place}, so the answer is {place}.", objects=objects)


def _facts(rng: np.random.Generator, subjects, values) -> tuple[list[str], list[str], int, tuple[str, ...]]:
    """Two or three (subject, value) facts with distinct subjects and values, the asked one and the others'
    values."""
    m = 2 + int(rng.integers(2))
    who = [subjects[int(i)] for i in rng.choice(len(subjects), m, replace=False)]
    what = [values[int(i)] for i in rng.choice(len(values), m, replace=False)]
    asked = int(rng.integers(m))
    return who, what, asked, tuple(v for i, v in enumerate(what) if i != asked)


def _txt(kind: str, rng: np.random.Generator) -> Draft:
    subjects, values, extras, fact, question = _TXT[kind]
    extra = _pick(rng, extras)
    who, what, k, others = _facts(rng, subjects, values)
    facts = [fact.format(who=w, value=v, extra=extra) for w, v in zip(who, what)]
    return Draft(kind, question.format(who=who[k], extra=extra, verb=extra[:-1]), what[k], values,
                 f"The text says that {facts[k][:-1]}, so the answer is {what[k]}.",
                 hint=" ".join(f[0].upper() + f[1:] for f in facts), forced=others)


def _no_sum(rng: np.random.Generator) -> Draft:
    total = 2 + int(rng.integers(8))
    first = 1 + int(rng.integers(total - 1))
    a, b, s = NUMBERS[first - 1], NUMBERS[total - first - 1], NUMBERS[total - 1]
    return Draft("no-sum", f"What is {a} plus {b}?", s, NUMBERS[1:],
                 f"{a.capitalize()} plus {b} is {s}, so the answer is {s}.")


def _lookup(kind: str, rng: np.random.Generator) -> Draft:
    table, question, statement = _LOOKUPS[kind]
    word = _pick(rng, tuple(table))
    answer = table[word]
    return Draft(kind, question.format(word), answer, tuple(v for v in table.values() if v != word),
                 f"{statement.format(word)} is {answer}, so the answer is {answer}.")


def _no_word_class(rng: np.random.Generator) -> Draft:
    label = _pick(rng, tuple(WORD_CLASSES))
    answer = _pick(rng, WORD_CLASSES[label])
    pool = (answer,) + tuple(w for other, words in WORD_CLASSES.items() if other != label for w in words)
    return Draft("no-word-class", f"Which word names {label}?", answer, pool,
                 f"The word {answer} names {label}, so the answer is {answer}.")


def _both(kind: str, rng: np.random.Generator) -> Draft:
    """Two owners: the hint names each one's shape by its colour (both-shape) or by its shape (both-colour)."""
    names = [NAMES[int(i)] for i in rng.choice(len(NAMES), 2, replace=False)]
    colours = [_COLOURS[int(i)] for i in rng.choice(len(_COLOURS), 2, replace=False)]
    shapes = [SHAPES[int(i)] for i in rng.choice(len(SHAPES), 2, replace=False)]
    k, by_colour = int(rng.integers(2)), kind == "both-shape"
    objects = _objects(rng, 2 + int(rng.integers(2)), list(zip(colours, shapes)),
                       (lambda c, s: c in colours) if by_colour else (lambda c, s: s in shapes))
    named = [f"{c} shape" for c in colours] if by_colour else shapes
    answer, pool, other = (shapes[k], SHAPES, shapes[1 - k]) if by_colour else (colours[k], _COLOURS, colours[1 - k])
    question = f"Which shape does {names[k]} own?" if by_colour else f"What colour is the shape that {names[k]} owns?"
    fact = f"The {named[k]} is a {shapes[k]}" if by_colour else f"The {shapes[k]} is {colours[k]}"
    return Draft(kind, question, answer, pool,
                 f"The text says that {names[k]} owns the {named[k]}. {_shows(objects)} {fact}, so the answer is "
                 f"{answer}.", hint=" ".join(f"{n} owns the {o}." for n, o in zip(names, named)), forced=(other,),
                 objects=objects)


KINDS = {"IMG": (_img_colour, _img_shape, _img_count, _img_position),
         "TXT": tuple(partial(_txt, kind) for kind in _TXT),
         "NO": (_no_sum, *(partial(_lookup, kind) for kind in _LOOKUPS), _no_word_class),
         "TXT+IMG": (partial(_both, "both-shape"), partial(_both, "both-colour"))}


def _choices(draft: Draft, rng: np.random.Generator) -> tuple[list[str], int]:
    """2-5 choices (fewer only if the pool is smaller): the forced distractors first, then random ones of the
    same kind, in random order with the answer at a uniform position."""
    k = min(2 + int(rng.integers(4)), len(draft.pool))
    forced = [draft.forced[int(i)] for i in rng.permutation(len(draft.forced))][:k - 1]
    rest = [v for v in draft.pool if v != draft.answer and v not in forced]
    distractors = forced + [rest[int(i)] for i in rng.choice(len(rest), k - 1 - len(forced), replace=False)]
    distractors = [distractors[int(i)] for i in rng.permutation(k - 1)]
    position = int(rng.integers(k))
    return distractors[:position] + [draft.answer] + distractors[position:], position


def problem_key(problem: dict) -> tuple:
    """What makes two problems the same: (question, hint, solution) with a picture — the solution describes
    the whole scene — and (question, hint, set of choices) without."""
    if problem["image"]:
        return (problem["question"], problem["hint"], problem["solution"])
    return (problem["question"], problem["hint"], tuple(sorted(problem["choices"])))


def category_flags(problem: dict) -> list[str]:
    """The official categories a problem counts in (NAT/SOC/LAN, TXT, IMG, NO, G1-6/G7-12)."""
    flags = [SUBJECT_CODES[problem["subject"]]]
    flags += (["TXT"] if problem["hint"] else []) + (["IMG"] if problem["image"] else [])
    flags += [] if problem["hint"] or problem["image"] else ["NO"]
    return flags + ["G1-6" if problem["grade"] in GRADE_BANDS["G1-6"] else "G7-12"]


def _balanced(values: tuple, weights: tuple, n: int, rng: np.random.Generator) -> list:
    """`n` values in the given proportions (largest remainders rounded up), in random order."""
    exact = [w * n for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(values)), key=lambda i: (counts[i] - exact[i], i))[:n - sum(counts)]:
        counts[i] += 1
    items = [v for v, c in zip(values, counts) for _ in range(c)]
    return [items[int(i)] for i in rng.permutation(n)]


def _attributes(split: str, n: int, seed: int, text_image_share: float) -> list[tuple[str, str, str, str]]:
    """(context type, subject, topic, grade) per problem: each balanced, drawn independently of the others."""
    rng = np.random.default_rng([seed, SPLIT_CODES[split], 1 << 20])
    third = (1 - text_image_share) / 3
    contexts = _balanced(tuple(KINDS), (third, third, third, text_image_share), n, rng)
    subjects = _balanced(tuple(SUBJECT_TOPICS), (1 / 3,) * 3, n, rng)
    bands = _balanced(tuple(GRADE_BANDS), (0.5, 0.5), n, rng)
    topic_orders = {s: [t[int(i)] for i in rng.permutation(len(t))] for s, t in SUBJECT_TOPICS.items()}
    used: Counter = Counter()
    rows = []
    for context, subject, band in zip(contexts, subjects, bands):
        topic = topic_orders[subject][used[subject] % len(topic_orders[subject])]
        used[subject] += 1
        rows.append((context, subject, topic, GRADE_BANDS[band][int(rng.integers(6))]))
    return rows


def _draw(split: str, index: int, row: tuple, seed: int, forbidden: set) -> tuple[dict, Draft, np.random.Generator]:
    context, subject, topic, grade = row
    for attempt in range(1000):
        rng = np.random.default_rng([seed, SPLIT_CODES[split], index, attempt])
        kinds = KINDS[context]
        draft = kinds[int(rng.integers(len(kinds)))](rng)
        choices, answer = _choices(draft, rng)
        category, skill, lecture = KIND_INFO[draft.kind]
        problem = {"question": draft.question, "choices": choices, "answer": answer, "hint": draft.hint,
                   "image": "image.png" if draft.objects else None, "task": "closed choice", "grade": grade,
                   "subject": subject, "topic": topic, "category": category, "skill": skill, "lecture": lecture,
                   "solution": draft.solution, "split": split}
        if problem_key(problem) not in forbidden:
            return problem, draft, rng
    raise EimError(f"could not draw a {split} problem unlike every test problem", where=f"index {index}")


def draw_text_problems(n: int, seed: int, forbidden: set) -> list[dict]:
    """`n` problems drawn as the train split's are, from another `seed`, none with a key in `forbidden`, and
    nothing rendered: a text pool apart from the set (the demo LM's formatted pretraining documents)."""
    rows = _attributes("train", n, seed, 0.0)
    return [_draw("train", index, row, seed, forbidden)[0] for index, row in enumerate(rows)]


def _write_problems(root: Path, sizes: dict[str, int], seed: int, image_size: int,
                    text_image_share: float) -> dict[str, dict]:
    """Draw and render every split (test first, so train and val can avoid its problems); qids are a seeded
    permutation of 1..N, so a qid does not tell its split."""
    offsets = {"train": 0, "val": sizes["train"], "test": sizes["train"] + sizes["val"]}
    qids = np.random.default_rng([seed, 1 << 21]).permutation(sum(sizes.values())) + 1
    problems: dict[str, dict] = {}
    forbidden: set = set()
    for split in ("test", "val", "train"):
        for index, row in enumerate(_attributes(split, sizes[split], seed, text_image_share)):
            problem, draft, rng = _draw(split, index, row, seed, forbidden)
            qid = str(int(qids[offsets[split] + index]))
            if draft.objects:
                folder = root / "images" / split / qid
                folder.mkdir(parents=True)
                render_scene(draft.objects, rng, image_size).save(folder / "image.png", format="PNG", optimize=False)
            problems[qid] = problem
        if split == "test":
            forbidden = {problem_key(p) for p in problems.values()}
    return {qid: problems[qid] for qid in sorted(problems, key=int)}


def _pid_splits(problems: dict[str, dict], seed: int) -> dict[str, list[str]]:
    splits = {s: [q for q, p in problems.items() if p["split"] == s] for s in SPLIT_CODES}
    rng = np.random.default_rng([seed, 1 << 22])
    for split in list(splits):
        size = -(-len(splits[split]) // 10)
        splits[f"mini{split}"] = sorted((splits[split][int(i)] for i in rng.choice(len(splits[split]), size,
                                                                                     replace=False)), key=int)
    splits["trainval"] = sorted(splits["train"] + splits["val"], key=int)
    return splits


def _summary(problems: dict[str, dict], parameters: dict) -> dict:
    tallies: dict = {what: {s: Counter() for s in SPLIT_CODES} for what in ("counts", "topics", "choices")}
    for p in problems.values():
        extra = ["TXT+IMG"] * bool(p["hint"] and p["image"]) + ["always_a_correct"] * (p["answer"] == 0)
        tallies["counts"][p["split"]].update(["problems", *category_flags(p), *extra])
        tallies["topics"][p["split"]][p["topic"]] += 1
        tallies["choices"][p["split"]][str(len(p["choices"]))] += 1
    return {"generator_version": GENERATOR_VERSION, "parameters": parameters,
            **{what: {s: dict(sorted(c.items())) for s, c in by_split.items()} for what, by_split in tallies.items()}}


def generate_scienceqa_demo(out: Path, *, seed: int = 0, n_train: int = 2000, n_val: int = 300, n_test: int = 600,
                            image_size: int = DEFAULT_IMAGE_SIZE, text_image_share: float = 0.06) -> dict:
    """Write the ScienceQA-format demo set to `out` and return its summary (also `out/summary.json`); a folder
    holding a finished set with the same parameters is kept. `text_image_share`: the share of TXT+IMG problems
    (the rest is split equally between IMG, TXT and NO); they count as TXT, so zeroing the images lowers TXT
    accuracy too (summary counts["TXT+IMG"] says by how many problems); 0 gives a pure TXT column."""
    out = Path(out)
    if min(n_train, n_val, n_test) < 0 or not 0 <= text_image_share < 1:
        raise EimError("split sizes must be >= 0 and text_image_share in [0, 1)")
    parameters = {"generator_version": GENERATOR_VERSION, "seed": seed, "n_train": n_train, "n_val": n_val,
                  "n_test": n_test, "image_size": image_size, "text_image_share": text_image_share}
    def write(staging: Path) -> dict:
        problems = _write_problems(staging, {"train": n_train, "val": n_val, "test": n_test}, seed, image_size,
                                   text_image_share)
        write_text(staging / "problems.json", json.dumps(problems, indent=2) + "\n")
        write_json(staging / "pid_splits.json", _pid_splits(problems, seed))
        summary = _summary(problems, parameters)
        write_json(staging / SUMMARY, summary)
        return summary
    return build_set_once(out, SUMMARY, parameters, write)
