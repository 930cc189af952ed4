"""Instruction-data prompt templates: an Alpaca or LLaVA-Instruct sample as (instruction, response).

    format_instruct(sample, "lavin")
    -> ("Instruction: Give three tips. \\nResponse:", "1. Eat well ...")

The response is always the Alpaca `output` or the gpt turn's text; the LM reads instruction + response
with no separator (loss on the response tokens and the eos only, eimctl/data/tokens.py).

- `lavin` (LaVIN's tools/data_processing.py, what LaVIN-lite's chatbot trains on):
  Alpaca  ("Instruction: " + instruction + " " + input + "\\n" + "Response: "), every double space replaced
          once by one space, stripped; an empty input therefore leaves "Instruction: X \\nResponse:" (a space
          before the newline), as LaVIN has it.
  LLaVA   ("Instruction: " + human text + "\\n" + "Response: "), double spaces replaced once, stripped.
- `alpaca` (Stanford Alpaca's two templates, which LLaMA-Adapter trains on): the "with input" template when
  the input is non-empty, else the "no input" one; a LLaVA sample uses the no-input template with the human
  text as the instruction (LLaMA-Adapter's multimodal fine-tuning).
- `family` (the default): `lavin` for model.family=lavin, `alpaca` for any other family.

The human text has LLaVA's "<image>" marker removed first, as LaVIN does: "<image>\\n" as a prefix and
"\\n<image>" as a suffix (a marker without its newline stays).

This module declares the config section `instruct` (eimctl/config.py imports it, so it does not import
eimctl.config).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from eimctl.runtime.errors import EimError

TEMPLATES = ("family", "lavin", "alpaca")
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:")


@dataclass
class InstructConfig:
    """Config section `instruct`: how instruction samples become text (the files come from data.path)."""
    template: str = "family"   # family (lavin for model.family=lavin, else alpaca) | lavin | alpaca

    CHOICES: ClassVar[dict] = {"template": set(TEMPLATES)}


SECTION = InstructConfig


def strip_image_marker(text: str) -> str:
    """LLaVA's human text without its "<image>" marker (prefix "<image>\\n" or suffix "\\n<image>")."""
    return text.replace("<image>\n", "").replace("\n<image>", "")


def resolve_template(template: str, family: str) -> str:
    """`lavin` or `alpaca`: the template `template` names for the model family `family`."""
    if template not in TEMPLATES:
        raise EimError(f"unknown instruction template '{template}'", where="instruct.template",
                       hint=f"one of {', '.join(TEMPLATES)}")
    if template == "family":
        return "lavin" if family == "lavin" else "alpaca"
    return template


def lavin_alpaca(instruction: str, input_text: str) -> str:
    return ("Instruction: " + instruction + " " + input_text + "\n" + "Response: ").replace("  ", " ").strip()


def lavin_llava(human: str) -> str:
    return ("Instruction: " + human + "\n" + "Response: ").replace("  ", " ").strip()


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    if input_text:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def format_instruct(sample, template: str) -> tuple[str, str]:
    """(instruction, response) of an instruction sample under `template` (`lavin` or `alpaca`; resolve
    `family` first with resolve_template). A LLaVA sample's `instruction` is its human text, marker removed."""
    if template == "lavin":
        prompt = lavin_llava(sample.instruction) if sample.kind == "llava" else \
            lavin_alpaca(sample.instruction, sample.input)
    elif template == "alpaca":
        prompt = alpaca_prompt(sample.instruction, sample.input if sample.kind == "alpaca" else "")
    else:
        raise EimError(f"unknown instruction template '{template}'", where="instruct.template",
                       hint="lavin or alpaca (resolve 'family' with resolve_template)")
    return prompt, sample.response
