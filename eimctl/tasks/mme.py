"""Task `mme`: MME's yes/no questions (perception, cognition), scored by MME's official calculation.py.

    eimctl evaluate mme --run-dir runs/lavin --stage base-ie --mme-root MME_Benchmark_release_version/
    eimctl evaluate mme --answers answers/ --out scores/        # score answer files (all 14 subtasks)

Reader: the MME release, or answer templates plus an image root (tasks/mme_data.py). `--mme-root`
(the `mme_root` option) replaces data.path and data.image_root for the evaluation only: the stage's
own config names its training data (`eval_data`). MME is evaluation-only; `format` still gives
(instruction, gt) so a stage could train or be diagnosed on it.

Prompt, by model.family (PROMPTS; any other family gets LaVIN's):
- lavin (LaVIN's eval_mme.py): ("Instruction: " + q + "\\n" + "Response: ").replace("  ", " ").strip(),
  i.e. "Instruction: {q}\\nResponse:".
- llama-adapter (its util/evaluate_mme.py): the Alpaca no-input template asking for "a single word or
  phrase".
Generation: greedy, one beam, every question with its image; max_new_tokens is the family's MME
length (MME_LENGTH: LaVIN 20, LLaMA-Adapter 30, others 20) unless eval.max_new_tokens was changed from
its default 40, which is then used as given. The prediction is what LaVIN's published answer files
hold: the generated text after "Response:", lower-cased, newlines removed (a tab becomes a space so the
line keeps 4 fields), stripped. `eval.zero_images` answers with every image replaced by a zero pixel
tensor (the image-ablation control).
Output: one `<subtask>.txt` answer file per subtask (`image\\tquestion\\tgt\\tprediction`, pairs in the
files' order), scored as the official script scores them; the always-yes control (every answer "yes":
acc 50, acc+ 0, so 50 per subtask) is scored the same way.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from eimctl.evaluate.mme_scoring import SUBTASKS, always_yes, answer_line, read_answer_dir, score_tables, summary_lines
from eimctl.runtime.atomic import write_text
from eimctl.runtime.errors import EimError
from eimctl.runtime.progress import StepProgress
from eimctl.tasks.mme_data import read_mme
from eimctl.tasks.sharding import generate_in_batches, writer_first

ALPACA_SHORT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                "request using a single word or phrase.\n\n### Instruction:\n{question}\n\n### Response:")
PROMPTS = {
    "lavin": lambda question: ("Instruction: " + question + "\n" + "Response: ").replace("  ", " ").strip(),
    "llama-adapter": lambda question: ALPACA_SHORT.format(question=question),
}
DEFAULT_FAMILY = "lavin"
MME_LENGTH = {"lavin": 20, "llama-adapter": 30}
DEFAULT_LENGTH = 20
EVAL_DEFAULT_TOKENS = 40   # EvalConfig.max_new_tokens' default: left there, the family's MME length applies
SUBTASK_FILES = tuple(f"{task}.txt" for task in SUBTASKS)


def family_of(config) -> str:
    return getattr(getattr(config, "model", None), "family", DEFAULT_FAMILY) if config is not None else DEFAULT_FAMILY


def prompt(question: str, family: str = DEFAULT_FAMILY) -> str:
    """The family's MME instruction for `question`."""
    return PROMPTS.get(family, PROMPTS[DEFAULT_FAMILY])(question)


def mme_length(config) -> int:
    """max_new_tokens for MME: the family's, unless eval.max_new_tokens was changed from its default."""
    if config.eval.max_new_tokens != EVAL_DEFAULT_TOKENS:
        return config.eval.max_new_tokens
    return MME_LENGTH.get(family_of(config), DEFAULT_LENGTH)


def clean_prediction(text: str) -> str:
    """The answer-file prediction of a generated text: lower-cased, on one line, stripped."""
    return text.lower().replace("\r", "").replace("\n", "").replace("\t", " ").strip()


def _zero_image_features(model, device) -> np.ndarray:
    """[T, d] features of an all-zero pixel tensor of the CLIP's input size (the image-ablation control)."""
    from PIL import Image

    height, width = model.clip.preprocess(Image.new("RGB", (8, 8))).shape[-2:]
    with torch.inference_mode():
        return model.encode_images(torch.zeros(1, 3, height, width, device=device)).float().cpu().numpy()[0]


def _features_for(model, config, split, device, cache_dir: Path, show: bool):
    """sample -> its [T, d] image features (the frozen-CLIP cache), or the zero-pixel features throughout."""
    from eimctl.data.features import cached_features

    if config.eval.zero_images:
        zero_pixels = _zero_image_features(model, device)
        return lambda sample: zero_pixels
    features, rows = cached_features(model.clip, config.model.clip, split, config.data, cache_dir, device,
                                     show=show)
    return lambda sample: np.asarray(features[rows[sample.image_id]])


class MME:
    name = "mme"
    label = "MME"
    outputs = SUBTASK_FILES   # `write` returns the files it wrote: fewer for a data set with fewer subtasks

    def read(self, data, split: str):
        return read_mme(data, split)

    def eval_data(self, data, options: dict):
        """The data `eimctl evaluate mme` reads: the stage's own, or the `mme_root` option's folder."""
        root = (options or {}).get("mme_root")
        return dataclasses.replace(data, path=str(root), image_root="") if root else data

    def format(self, sample, config=None) -> tuple[str, str]:
        return prompt(sample.question, family_of(config)), sample.gt

    def configured(self, config):
        family = family_of(config)
        return lambda sample: (prompt(sample.question, family), sample.gt)

    def clip_text(self, sample) -> str:
        return sample.question

    def _generate(self, model, config, split, features_for, device, show: bool) -> list[str]:
        samples, batch_size, length = split.samples, config.eval.batch_size, mme_length(config)
        family = family_of(config)
        prompts = model.tokenizer([prompt(s.question, family) for s in samples], add_special_tokens=False)["input_ids"]
        progress = StepProgress("answer MME questions", len(samples), log_every=max(1, len(samples) // 5),
                                enabled=show)

        def answer(start: int, stop: int) -> list[str]:
            chunk = samples[start:stop]
            batch = torch.from_numpy(np.stack([features_for(s) for s in chunk]).astype(np.float32)).to(device)
            with torch.inference_mode():  # every question has its image: has_image is left at None (all)
                ids = model.generate(model.project(batch), [list(p) for p in prompts[start:stop]],
                                     max_new_tokens=length, beam_size=1)
            progress.update(stop)
            return [model.tokenizer.decode(row, skip_special_tokens=True) for row in ids]

        texts = generate_in_batches(len(samples), batch_size, answer)
        progress.close()
        return texts

    def predict(self, model, config, split, device, cache_dir: Path, show: bool) -> dict:
        """{sample id: {"subtask", "image", "question", "gt", "text", "prediction"}} in split order."""
        features_for = writer_first(lambda: _features_for(model, config, split, device, cache_dir, show))
        texts = self._generate(model, config, split, features_for, device, show)
        return {s.sample_id: {"subtask": s.subtask, "image": s.image_name, "question": s.question, "gt": s.gt,
                              "text": text, "prediction": clean_prediction(text)}
                for s, text in zip(split.samples, texts)}

    @staticmethod
    def _lines(predictions: dict) -> dict[str, list[str]]:
        """{subtask: answer lines} in the predictions' (the split's) order."""
        lines: dict[str, list[str]] = {}
        for entry in predictions.values():
            lines.setdefault(entry["subtask"], []).append(
                answer_line(entry["image"], entry["question"], entry["gt"], clean_prediction(entry["prediction"])))
        return lines

    def score(self, predictions: dict, split, config, options: dict) -> dict:
        lacking = [s.sample_id for s in split.samples if s.sample_id not in predictions]
        if lacking:
            raise EimError(f"no prediction for MME question {lacking[0]} ({len(lacking)} lack one)",
                           where=f"{split.source} predictions", hint="predict every question of the split")
        tables = {task: (lines, f"{task}.txt predictions") for task, lines in self._lines(predictions).items()}
        result = self._scored(tables)
        return {"benchmark": self.name, "dataset": split.source, "split": split.name, "n": len(split.samples),
                "images": len(split.images()), **result, "family": family_of(config),
                "max_new_tokens": mme_length(config), "zero_images": bool(config.eval.zero_images)}

    @staticmethod
    def _scored(tables: dict) -> dict:
        scored = score_tables(tables)
        control = score_tables(always_yes(tables))
        return {**scored, "controls": {"always_yes": {"metrics": control["metrics"], "printed": control["printed"]}}}

    def score_file(self, answers: Path, tasks=None) -> dict:
        """Score a folder of answer files written elsewhere: all 14 subtasks, or the subset `tasks`."""
        tables = read_answer_dir(Path(answers), tasks)
        return {"benchmark": self.name, "answers": str(answers), "split": "mme", **self._scored(tables)}

    def write(self, out: Path, predictions: dict) -> list[str]:
        """One `<subtask>.txt` answer file per subtask; returns their names."""
        names = []
        for task, lines in self._lines(predictions).items():
            write_text(Path(out) / f"{task}.txt", "".join(lines))
            names.append(f"{task}.txt")
        return names

    def summary(self, result: dict) -> list[str]:
        count = len(result["subtasks"])
        first = f"{result.get('stage', 'answers')} on MME ({count} subtask{'s' * (count != 1)})"
        lines = [first, *summary_lines(result)]
        control = result.get("controls", {}).get("always_yes")
        if control:
            shown = "  ".join(f"{group} {control['printed'][group]}" for group in ("perception", "cognition")
                              if group in control["printed"])
            lines.append(f"always-yes control: {shown}")
        return lines


TASK = MME()
