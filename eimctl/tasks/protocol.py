"""What a task provides. A task module in eimctl/tasks/ exposes one object `TASK` with these members."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Task(Protocol):
    name: str           # `eimctl evaluate <name>`, `data.task=<name>`
    label: str          # the benchmark's real name, for reports
    outputs: tuple[str, ...]  # files `write` puts into the evaluation folder, besides metrics.json

    def read(self, data, split: str):
        """The split's samples in data-set order (a sample's position is its queue index); the split
        has `samples`, `fingerprint`, `image_root` and `images()` (unique (image_id, path) pairs)."""

    def format(self, sample) -> tuple[str, str]:
        """(instruction, response): the text the LM reads and the text loss_base scores."""

    def clip_text(self, sample) -> str:
        """The text whose CLIP [EOS] feature is the sample's Kt key."""

    def predict(self, model, config, split, device, cache_dir: Path, show: bool) -> dict:
        """Generate with `model` for every evaluation item of `split`; {item id: prediction}."""

    def score(self, predictions: dict, split, config, options: dict) -> dict:
        """The task's metrics for `predictions` (written as metrics.json)."""

    def write(self, out: Path, predictions: dict) -> None:
        """Write the predictions in the benchmark's own format into `out`."""

    def summary(self, result: dict) -> list[str]:
        """Lines for the terminal after an evaluation."""

    # Optional members:
    # configured(config) -> (sample -> (instruction, response))   a task with a config section (tasks/__init__.py)
    # score_file(problems, results, split) -> dict                `eimctl evaluate <task> --results F` (no run)
    # A result may carry "controls": {name: {"metrics": {...}}} (e.g. always-A, chance), which the report shows as
    # rows of their own, and "zero_images" (eval.zero_images: the image-ablation control).
