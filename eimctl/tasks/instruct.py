"""Task `instruct`: instruction tuning on Alpaca-52k and LLaVA-Instruct-158k (LaVIN-lite's chatbot data).

    eimctl train-stage base --run-dir runs/chat data.task=instruct data.path=data/instruct \\
        data.image_root=data/coco model.family=lavin

Reader: Alpaca and LLaVA-Instruct JSON files from `data.path`, COCO images under `data.image_root`
(tasks/instruct_data.py); Alpaca rows are text-only samples (no image: zero features, `has_image`
False), LLaVA rows image samples, both in one run. Prompt format: config section `instruct`
(`instruct.template`: family | lavin | alpaca; tasks/instruct_prompts.py), the response is the output or
the gpt turn, and loss_base scores the response and the eos only. Kt's text (`clip_text`): the first 200
characters of the response for an image sample, of the instruction (and input) for a text-only one.

The task is for training and the key queues: it has no benchmark, so `eimctl evaluate instruct` is
refused with a pointer to `mme`.
"""
from __future__ import annotations

from pathlib import Path

from eimctl.runtime.errors import EimError
from eimctl.tasks.instruct_data import NO_BENCHMARK, read_instruct
from eimctl.tasks.instruct_prompts import InstructConfig, format_instruct, resolve_template

SECTION = InstructConfig
CLIP_TEXT_CHARS = 200


def section(config) -> InstructConfig:
    """The config's `instruct` section (the defaults without a config)."""
    return getattr(config, "instruct", None) or InstructConfig()


def template_for(config) -> str:
    """`lavin` or `alpaca`: instruct.template, with `family` resolved by model.family."""
    family = config.model.family if config is not None else ""
    return resolve_template(section(config).template, family)


def _no_benchmark(where: str) -> EimError:
    return EimError(NO_BENCHMARK, where=where, hint="eimctl evaluate mme --run-dir RUN --stage STAGE")


class Instruct:
    name = "instruct"
    label = "Alpaca + LLaVA-Instruct"
    outputs = ()

    def read(self, data, split: str):
        return read_instruct(data, split)

    def format(self, sample, config=None) -> tuple[str, str]:
        """(instruction, response) under the config's template; without a config, `family` resolves as for a
        family other than lavin (`alpaca`)."""
        return format_instruct(sample, template_for(config))

    def configured(self, config):
        """`sample -> (instruction, response)` under `instruct.template` and `model.family`."""
        template = template_for(config)
        return lambda sample: format_instruct(sample, template)

    def clip_text(self, sample) -> str:
        """The response for an image sample (loss_IE's key), the instruction and input for a text-only one."""
        if sample.has_image:
            return sample.response[:CLIP_TEXT_CHARS]
        return " ".join(part for part in (sample.instruction, sample.input) if part)[:CLIP_TEXT_CHARS]

    def predict(self, model, config, split, device, cache_dir: Path, show: bool) -> dict:
        raise _no_benchmark("eimctl evaluate instruct")

    def score(self, predictions: dict, split, config, options: dict) -> dict:
        raise _no_benchmark("eimctl evaluate instruct")

    def write(self, out: Path, predictions: dict) -> None:
        raise _no_benchmark("eimctl evaluate instruct")

    def summary(self, result: dict) -> list[str]:
        metrics = result.get("metrics", {})
        return [f"{result.get('stage', 'results')} on {result.get('split', '?')}: "
                + ("  ".join(f"{name} {value}" for name, value in metrics.items()) or "no metrics")]


TASK = Instruct()
