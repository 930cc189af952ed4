"""Task `scienceqa`: multiple-choice science questions, scored by ScienceQA's official rules.

    eimctl evaluate scienceqa --run-dir runs/sqa --stage base-ie
    eimctl evaluate scienceqa --problems problems.json --results results.json --out scores/   # score a file

Reader: the official problems.json + pid_splits.json (+ captions.json) in `data.path`, images under
`data.image_root` (tasks/scienceqa_data.py). Prompt format: config section `scienceqa`
(prompt_format, template, use_caption; tasks/scienceqa_prompts.py). Predictions: one greedy
generation per problem from its instruction tokens and the ST output of its image features (zeros
for a text-only problem, which the family is told through `has_image`), parsed into an index
(scienceqa.parse, scienceqa.parse_seed). `eval.zero_images` replaces every image by a zero pixel
tensor: the image-ablation control. Scorer: the official table (evaluate/scienceqa_scoring.py)
with its controls, always-(A) and uniformly random answers, scored the same way.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from eimctl.evaluate.scienceqa_scoring import (COLUMNS, columns, control_scores, official_scores, parse_answer,
                                               read_results, write_results)
from eimctl.runtime.errors import EimError
from eimctl.runtime.progress import StepProgress
from eimctl.tasks.scienceqa_data import load_problems, read_scienceqa
from eimctl.tasks.scienceqa_prompts import ScienceQAConfig, format_problem
from eimctl.tasks.sharding import generate_in_batches, writer_first

SECTION = ScienceQAConfig
CLIP_TEXT_CHARS = 200
CONTROL_NAMES = {"always_a": "always-A", "random": "uniform random"}


def section(config) -> ScienceQAConfig:
    """The config's `scienceqa` section (the defaults without a config)."""
    return getattr(config, "scienceqa", None) or ScienceQAConfig()


def _zero_image_features(model, device) -> torch.Tensor:
    """[T, d] features of an all-zero pixel tensor of the CLIP's input size (the image-ablation control)."""
    from PIL import Image

    height, width = model.clip.preprocess(Image.new("RGB", (8, 8))).shape[-2:]
    with torch.inference_mode():
        return model.encode_images(torch.zeros(1, 3, height, width, device=device)).float().cpu()[0]


def _features_for(model, config, split, device, cache_dir: Path, show: bool):
    """sample -> its [T, d] image features: cached frozen-CLIP features, zeros for a text-only problem,
    the zero-pixel features for every image problem under eval.zero_images."""
    from eimctl.data.features import cached_features

    if config.eval.zero_images:
        zero_pixels = _zero_image_features(model, device).numpy()
        blank = np.zeros_like(zero_pixels)
        return lambda sample: zero_pixels if sample.has_image else blank
    if not split.images():
        blank = np.zeros((model.clip.num_tokens, model.clip.feature_dim), dtype=np.float32)
        return lambda sample: blank
    features, rows = cached_features(model.clip, config.model.clip, split, config.data, cache_dir, device,
                                     show=show)
    blank = np.zeros(features.shape[1:], dtype=np.float32)
    return lambda sample: np.asarray(features[rows[sample.image_id]]) if sample.has_image else blank


class ScienceQA:
    name = "scienceqa"
    label = "ScienceQA"
    outputs = ("results.json",)

    def read(self, data, split: str):
        return read_scienceqa(data, split)

    def format(self, sample, config=None) -> tuple[str, str]:
        options = section(config)
        return format_problem(sample, options.prompt_format, options.template, options.use_caption)

    def configured(self, config):
        """`sample -> (instruction, response)` under the config's `scienceqa` section."""
        options = section(config)
        return lambda sample: format_problem(sample, options.prompt_format, options.template, options.use_caption)

    def clip_text(self, sample) -> str:
        """The caption when captions.json has one, else the solution (else the question), cut to ~200 chars."""
        return (sample.caption or sample.solution or sample.question)[:CLIP_TEXT_CHARS]

    def _generate(self, model, config, split, features_for, device, show: bool) -> list[str]:
        ev, samples = config.eval, split.samples
        instructions = [pair[0] for pair in map(self.configured(config), samples)]
        prompts = model.tokenizer(instructions, add_special_tokens=False)["input_ids"]
        progress = StepProgress(f"answer {split.name} problems", len(samples), log_every=max(1, len(samples) // 5),
                                enabled=show)

        def answer(start: int, stop: int) -> list[str]:
            chunk = samples[start:stop]
            batch = torch.from_numpy(np.stack([features_for(s) for s in chunk]).astype(np.float32)).to(device)
            has_image = torch.tensor([s.has_image for s in chunk], dtype=torch.bool, device=device)
            with torch.inference_mode():
                visual = model.project(batch)
                ids = model.generate(visual, [list(p) for p in prompts[start:stop]],
                                     max_new_tokens=ev.max_new_tokens, beam_size=1, has_image=has_image)
            progress.update(stop)
            return [model.tokenizer.decode(row, skip_special_tokens=True) for row in ids]

        texts = generate_in_batches(len(samples), ev.batch_size, answer)
        progress.close()
        return texts

    def predict(self, model, config, split, device, cache_dir: Path, show: bool) -> dict:
        """{qid: {"index", "text", "failed", "answer"}} in split order; `failed`: a random index was given."""
        options = section(config)
        features_for = writer_first(lambda: _features_for(model, config, split, device, cache_dir, show))
        texts = self._generate(model, config, split, features_for, device, show)
        rng = random.Random(options.parse_seed)
        predictions = {}
        for sample, text in zip(split.samples, texts):
            index, failed = parse_answer(text, len(sample.choices), options.parse, rng)
            predictions[sample.sample_id] = {"index": index, "text": text, "failed": failed, "answer": sample.answer}
        return predictions

    def score(self, predictions: dict, split, config, options: dict) -> dict:
        rows = {sample.sample_id: sample.row() for sample in split.samples}
        results = {qid: prediction["index"] for qid, prediction in predictions.items()}
        sqa = section(config)
        scored = self._scored(rows, results, sqa.parse_seed, where=f"{split.name} predictions")
        return {"benchmark": self.name, "dataset": config.data.path, "split": split.name, **scored,
                "parse_failures": sum(bool(p.get("failed")) for p in predictions.values()),
                "prompt_format": sqa.prompt_format, "template": sqa.template, "parse": sqa.parse,
                "parse_seed": sqa.parse_seed, "use_caption": sqa.use_caption,
                "zero_images": bool(config.eval.zero_images)}

    @staticmethod
    def _scored(rows: dict, results: dict, seed: int, where: str) -> dict:
        scores = official_scores(rows, results, where=where)
        controls = control_scores(rows, seed)
        return {"n": len(rows), "metrics": columns(scores), "official": scores,
                "controls": {name: {"metrics": columns(table), "official": table} for name, table in controls.items()}}

    def score_file(self, problems: Path, results: Path, split: str = "test", seed: int = 10) -> dict:
        """Score a results file as the official script does: the problems whose `split` field is `split`."""
        table = load_problems(Path(problems))
        rows = {qid: row for qid, row in table.items() if row["split"] == split}
        if not rows:
            raise EimError(f"no problem has split '{split}'", where=str(problems),
                           hint="pass --split with a value of the problems' split field (train, val, test)")
        predicted = read_results(Path(results))
        result = {"benchmark": self.name, "problems": str(problems), "results_file": str(results), "split": split,
                  **self._scored(rows, predicted, seed, where=str(results))}
        if len(predicted) != 4241:
            result["note"] = (f"{len(predicted)} results: the official tools/evaluate_acc.py asserts 4241 (the full "
                              "test split) and would refuse this file; the table is otherwise the same")
        return result

    def write(self, out: Path, predictions: dict) -> None:
        write_results(Path(out) / "results.json", {qid: p["index"] for qid, p in predictions.items()},
                      {qid: p["text"] for qid, p in predictions.items()},
                      {qid: p["answer"] for qid, p in predictions.items()})

    def summary(self, result: dict) -> list[str]:
        table, controls = result["official"], result.get("controls", {})
        shown = {name: table[key] for key, name in COLUMNS.items()}
        control = "  ".join(f"{CONTROL_NAMES.get(name, name)} {entry['official']['acc_average']}"
                            for name, entry in controls.items())
        first = f"{result.get('stage', 'results')} on {result['split']}: Avg {shown.pop('Avg')}"
        if "parse_failures" in result:
            first += f"  ({result['parse_failures']} of {result['n']} answers unparsed, given a random index)"
        lines = [first, "  ".join(f"{name} {'-' if value == -1 else value}" for name, value in shown.items())]
        if control:
            lines.append(f"controls: {control}")
        return lines


TASK = ScienceQA()
