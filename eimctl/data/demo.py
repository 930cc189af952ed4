"""Synthetic captioning data for the offline embedded demo: a broad world and a small captioning task.

Each image is a 64x64 scene with one to three coloured shapes placed in distinct
cells of a 3x3 grid, so every object has a nameable position ("at the top left",
"in the centre", ...) and objects never overlap. Captions name size, colour,
shape and position of each object through nine sentence templates, so the five
references of an evaluation image are phrased differently and no single fixed
sentence scores well.

The demo tests EIM's premise — alignment learnt by CLIP and the LM on far more
data than the captioning set transfers into the captioner — so the splits play
different parts:

    world  the pretraining corpus of the demo's CLIP and LM (every composition)
    train  the captioner's small training set (a low-data regime, as COCO is small next to
           CLIP's and GPT-2's corpora); it never shows HELD_OUT colour-shape pairs
    val    evaluation-style scenes, each with at least one held-out pair (diagnostics)
    test   the same: every test image holds a composition the captioner never saw

    from eimctl.data.demo import generate_demo_data
    generate_demo_data(Path("demo/data"))

Layout written (atomically, via a temporary sibling folder):

    <out_dir>/images/<split>-<n>.png
    <out_dir>/{world,train,val,test}.jsonl   one line per (image, caption)
    <out_dir>/demo.json                      parameters, counts and duplicate rates, written last
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from eimctl.runtime.atomic import write_json
from eimctl.runtime.errors import EimError

# Bump when the rendering or caption rules change, so a cached folder made by an
# older generator is not mistaken for a current one.
GENERATOR_VERSION = 2

SPLIT_CODES = {"train": 0, "val": 1, "test": 2, "world": 3}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
# Hues far apart from each other and from the dark grey background.
COLOURS = {
    "red": (220, 30, 30),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 50, 200),
    "white": (245, 245, 245),
}
SIZES = ("small", "large")
# 3x3 grid cells, (row, column), with the phrase that places an object there.
POSITION_PHRASES = {
    (0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
    (1, 0): "on the left", (1, 1): "in the centre", (1, 2): "on the right",
    (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right",
}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
TEMPLATES = ("list", "there", "count", "picture", "position_first", "relation", "scene", "image_shows",
             "we_see")
# One colour-shape pair per colour that the captioner's training split never shows (the world does).
HELD_OUT = frozenset({("red", "circle"), ("green", "square"), ("blue", "triangle"), ("yellow", "diamond"),
                      ("purple", "cross"), ("white", "triangle")})
# Scenes with more objects have more distinct captions: fewer one-object scenes, fewer exact duplicates.
OBJECT_COUNT_WEIGHTS = (0.2, 0.4, 0.4)
# Shapes are drawn this many times larger, then downsampled, for smooth edges.
SUPERSAMPLE = 4


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    cell: tuple[int, int]

    def noun_phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"

    def placed_phrase(self) -> str:
        return f"{self.noun_phrase()} {POSITION_PHRASES[self.cell]}"


def _sample_object(rng: np.random.Generator, cell: int) -> SceneObject:
    return SceneObject(shape=SHAPES[int(rng.integers(len(SHAPES)))],
                       colour=list(COLOURS)[int(rng.integers(len(COLOURS)))],
                       size=SIZES[int(rng.integers(len(SIZES)))], cell=(int(cell) // 3, int(cell) % 3))


def _sample_scene(rng: np.random.Generator, held_out: str = "any") -> list[SceneObject]:
    """A scene; `held_out`: "any" (the world), "never" (captioner training: no HELD_OUT pair) or
    "some" (evaluation: at least one object shows a HELD_OUT pair)."""
    n_objects = int(rng.choice(3, p=OBJECT_COUNT_WEIGHTS)) + 1
    cells = rng.choice(len(POSITION_PHRASES), size=n_objects, replace=False)
    objects = []
    for cell in cells:
        obj = _sample_object(rng, cell)
        while held_out == "never" and (obj.colour, obj.shape) in HELD_OUT:
            obj = _sample_object(rng, cell)
        objects.append(obj)
    if held_out == "some" and not any((o.colour, o.shape) in HELD_OUT for o in objects):
        colour, shape = sorted(HELD_OUT)[int(rng.integers(len(HELD_OUT)))]
        which = int(rng.integers(n_objects))
        objects[which] = SceneObject(shape=shape, colour=colour, size=objects[which].size, cell=objects[which].cell)
    return objects


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.85  # a square of half-width r looks bigger than a circle of radius r
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "cross":
        t = r * 0.35
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
                (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
                (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t)]
    raise ValueError(f"unknown shape {shape!r}")


def _render_scene(objects: list[SceneObject], rng: np.random.Generator, image_size: int) -> Image.Image:
    big = image_size * SUPERSAMPLE
    background = int(rng.integers(25, 70))
    canvas = Image.new("RGB", (big, big), (background,) * 3)
    draw = ImageDraw.Draw(canvas)
    cell_size = big / 3
    for obj in objects:
        # Radius as a fraction of the cell: large objects nearly fill it, small
        # ones leave room for a positional jitter that keeps them in their cell.
        radius = cell_size * (0.42 if obj.size == "large" else 0.24)
        slack = cell_size / 2 - radius
        cx = (obj.cell[1] + 0.5) * cell_size + rng.uniform(-slack, slack) * 0.8
        cy = (obj.cell[0] + 0.5) * cell_size + rng.uniform(-slack, slack) * 0.8
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
        else:
            draw.polygon(_shape_polygon(obj.shape, cx, cy, radius), fill=fill)
    image = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    if rng.random() < 0.5:
        # Half of the scenes get light pixel noise, so the encoder cannot rely
        # on perfectly flat backgrounds.
        pixels = np.asarray(image, dtype=np.int16)
        noise = rng.integers(-12, 13, size=pixels.shape[:2] + (1,), dtype=np.int16)
        image = Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))
    return image


def render_scene(objects: list[SceneObject], rng: np.random.Generator, image_size: int) -> Image.Image:
    """The demo's renderer for a given list of objects (in distinct cells), for other synthetic sets
    built on the same scenes (data/scienceqa_demo.py); it draws background, jitter and noise from `rng`."""
    return _render_scene(objects, rng, image_size)


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _relation_phrase(first: SceneObject, second: SceneObject) -> str:
    (row_a, col_a), (row_b, col_b) = first.cell, second.cell
    if row_a != row_b:
        relation = "above" if row_a < row_b else "below"
    else:
        relation = "to the left of" if col_a < col_b else "to the right of"
    return f"{first.noun_phrase()} {relation} {second.noun_phrase()}"


def _caption(objects: list[SceneObject], template: str, rng: np.random.Generator) -> str:
    # A fresh object order per caption: the same scene is described in
    # several orders, which is part of the phrasing variety.
    order = [objects[i] for i in rng.permutation(len(objects))]
    placed = [obj.placed_phrase() for obj in order]
    n = len(order)
    if template == "list":
        return _join(placed)
    if template == "there":
        return "there is " + _join(placed)
    if template == "count":
        noun = "shape" if n == 1 else "shapes"
        return f"{COUNT_WORDS[n]} {noun}, " + _join(placed)
    if template == "picture":
        return "a picture of " + _join(placed)
    if template == "position_first":
        return _join([f"{POSITION_PHRASES[obj.cell]} {obj.noun_phrase()}" for obj in order])
    if template == "relation":
        if n == 1:
            return f"only {placed[0]}"
        rest = [obj.placed_phrase() for obj in order[2:]]
        return _join([_relation_phrase(order[0], order[1])] + rest)
    if template == "scene":
        return "a scene with " + _join(placed)
    if template == "image_shows":
        return "the image shows " + _join(placed)
    if template == "we_see":
        return f"we see {COUNT_WORDS[n]}: " + _join(placed)
    raise ValueError(f"unknown template {template!r}")


def _captions_for(objects: list[SceneObject], count: int, rng: np.random.Generator) -> list[str]:
    # Distinct templates per image, so the references differ in phrasing and
    # not only in object order.
    templates = rng.choice(len(TEMPLATES), size=min(count, len(TEMPLATES)), replace=False)
    chosen = [TEMPLATES[int(t)] for t in templates]
    while len(chosen) < count:  # more captions than templates: reuse, new object order
        chosen.append(TEMPLATES[int(rng.integers(len(TEMPLATES)))])
    return [_caption(objects, template, rng) for template in chosen]


SPLIT_HELD_OUT = {"world": "any", "train": "never", "val": "some", "test": "some"}


def _write_split(root: Path, split: str, n_images: int, captions_per_image: int,
                 seed: int, image_size: int) -> dict:
    lines, captions_of_image = [], []
    for index in range(n_images):
        # One generator per image, keyed by (seed, split, index): a split's images
        # do not change when another split's size changes.
        rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
        objects = _sample_scene(rng, SPLIT_HELD_OUT[split])
        image_name = f"images/{split}-{index}.png"
        _render_scene(objects, rng, image_size).save(root / image_name, format="PNG", optimize=False)
        captions = _captions_for(objects, captions_per_image, rng)
        captions_of_image.append(captions)
        for k, caption in enumerate(captions):
            lines.append(json.dumps({"sample_id": f"{split}-{index}-{k}", "image": image_name,
                                     "caption": caption}))
    (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"images": n_images, "captions": len(lines),
            "duplicate_rate": round(duplicate_caption_rate(captions_of_image), 4)}


def duplicate_caption_rate(captions_of_image: list[list[str]]) -> float:
    """Fraction of captions that are exactly another image's caption."""
    images_of: dict[str, set[int]] = {}
    for image, captions in enumerate(captions_of_image):
        for caption in captions:
            images_of.setdefault(caption, set()).add(image)
    total = sum(len(captions) for captions in captions_of_image)
    shared = sum(1 for captions in captions_of_image for caption in captions if len(images_of[caption]) > 1)
    return shared / max(1, total)


def generate_demo_data(
    out_dir: Path,
    *,
    seed: int = 0,
    n_world_images: int = 6000,
    n_train_images: int = 520,
    n_val_images: int = 200,
    n_test_images: int = 300,
    image_size: int = 64,
    train_captions_per_image: int = 2,
    eval_captions_per_image: int = 5,
) -> dict:
    """Write the demo captioning dataset to `out_dir` and return per-split counts.

    Deterministic: the same arguments give byte-identical files. If `out_dir`
    already holds a finished dataset with the same parameters, it is kept.
    """
    out_dir = Path(out_dir)
    parameters = {
        "generator_version": GENERATOR_VERSION, "seed": seed, "image_size": image_size,
        "n_world_images": n_world_images, "n_train_images": n_train_images, "n_val_images": n_val_images,
        "n_test_images": n_test_images, "train_captions_per_image": train_captions_per_image,
        "eval_captions_per_image": eval_captions_per_image,
    }
    marker = out_dir / "demo.json"
    if marker.is_file():
        existing = json.loads(marker.read_text(encoding="utf-8"))
        if existing.get("parameters") == parameters:
            return existing["counts"]

    ensure_replaceable(out_dir, "demo.json")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        (staging / "images").mkdir()
        counts = {}
        for split, n_images, per_image in (
            ("world", n_world_images, train_captions_per_image),
            ("train", n_train_images, train_captions_per_image),
            ("val", n_val_images, eval_captions_per_image),
            ("test", n_test_images, eval_captions_per_image),
        ):
            counts[split] = _write_split(staging, split, n_images, per_image, seed, image_size)
        write_json(staging / "demo.json", {"parameters": parameters, "counts": counts})
        publish_dir(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return counts


def build_set_once(out: Path, marker_name: str, parameters: dict, write) -> dict:
    """A generated set in `out`, built once: a folder whose marker (a summary JSON, written last by
    `write(staging) -> summary`) holds the same parameters is kept; otherwise the set is written into a
    staging sibling and published atomically."""
    out = Path(out)
    marker = out / marker_name
    if marker.is_file():
        existing = json.loads(marker.read_text(encoding="utf-8"))
        if existing.get("parameters") == parameters:
            return existing
    ensure_replaceable(out, marker_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        summary = write(staging)
        publish_dir(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return summary


def ensure_replaceable(target: Path, marker_name: str) -> None:
    """Refuse to overwrite a non-empty folder that this code did not make.

    Builds are published atomically, so a folder made here always has its
    marker file; one without it holds someone else's files.
    """
    if target.is_dir() and any(target.iterdir()) and not (target / marker_name).is_file():
        raise EimError(f"{target} exists and is not a folder made by eimctl's demo (no {marker_name})",
                       hint="choose another output folder or remove this one")


def publish_dir(new: Path, target: Path) -> None:
    """Move the finished folder `new` to `target`, discarding a stale `target`."""
    new.chmod(0o755)  # mkdtemp makes it owner-only; the result is an ordinary folder
    if target.exists():
        # Rename the stale folder away first so `target` is never half-deleted.
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        trash.rmdir()
        target.rename(trash)
        new.rename(target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        new.rename(target)
