"""Task `coco`: image captioning on COCO's Karpathy split or a JSONL caption set.

    eimctl evaluate coco --run-dir runs/demo --stage base

Reader: `data.format` coco-karpathy (`dataset_coco.json`) or jsonl (eimctl/data/captions.py).
Prompt format: the instruction is empty (the paper's captioning setting) unless a JSONL row
gives one; the response is the caption. Predictions: batched, KV-cached generation (greedy or
beam) from the ST output, one caption per test image, in the COCO results format. Scorer:
BLEU-1..4, METEOR, ROUGE_L, CIDEr (and SPICE when CoreNLP jars are given) from pycocoevalcap,
and the best single fixed caption as a floor to beat.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from eimctl.data.captions import read_split
from eimctl.data.features import cached_features
from eimctl.evaluate.caption_metrics import best_fixed_caption, score_captions, write_coco_results
from eimctl.runtime.progress import StepProgress
from eimctl.tasks.sharding import generate_in_batches, writer_first


def fixed_caption_floor(train_captions: list[str], references: dict, count: int) -> dict:
    """The single most-scoring caption among the `count` most frequent training captions."""
    candidates = [c for c, _ in Counter(c.strip().lower() for c in train_captions).most_common(count)]
    floor = {}
    for metric in ("Bleu_4", "CIDEr"):
        caption, score = best_fixed_caption(candidates, references, metric)
        floor[metric] = {"caption": caption, "score": score}
    return floor


class CocoCaptioning:
    name = "coco"
    label = "COCO captioning"
    outputs = ("predictions.json",)

    def read(self, data, split: str):
        return read_split(data, split)

    def format(self, sample) -> tuple[str, str]:
        return sample.instruction, sample.caption

    def clip_text(self, sample) -> str:
        return sample.caption

    def predict(self, model, config, split, device, cache_dir: Path, show: bool) -> dict[str, str]:
        ev = config.eval
        features, rows = writer_first(lambda: cached_features(model.clip, config.model.clip, split, config.data,
                                                              cache_dir, device, show=show))
        images = split.images()
        progress = StepProgress(f"caption {ev.split} images", len(images), log_every=max(1, len(images) // 5),
                                enabled=show)

        def caption(start: int, stop: int) -> list[tuple[str, str]]:
            chunk = images[start:stop]
            batch = torch.from_numpy(features[[rows[i] for i, _ in chunk]].copy()).to(device)
            with torch.inference_mode():
                visual = model.project(batch)
            tokens = model.generate(visual, None, max_new_tokens=ev.max_new_tokens, beam_size=ev.beam_size)
            progress.update(stop)
            return [(image_id, model.tokenizer.decode(ids, skip_special_tokens=True).strip())
                    for (image_id, _), ids in zip(chunk, tokens)]

        predictions = dict(generate_in_batches(len(images), ev.batch_size, caption))
        progress.close()
        return predictions

    def score(self, predictions: dict, split, config, options: dict) -> dict:
        references = split.references()
        scores = score_captions(predictions, references, spice_jars=options.get("spice_jars"))
        result = {"benchmark": self.name, "dataset": config.data.path, "split": split.name,
                  "beam_size": config.eval.beam_size,
                  "metrics": scores["metrics"], "unavailable": scores.get("unavailable", {}),
                  "n_images": len(split.images())}
        if config.eval.fixed_caption_baseline:
            train = read_split(config.data, "train")
            result["fixed_caption_baseline"] = fixed_caption_floor([s.caption for s in train.samples], references,
                                                                   config.eval.fixed_caption_candidates)
        return result

    def write(self, out: Path, predictions: dict) -> None:
        write_coco_results(out / "predictions.json", predictions)

    def summary(self, result: dict) -> list[str]:
        metrics = result["metrics"]
        lines = [f"{result['stage']} on {result['split']}: BLEU-4 {100 * metrics['Bleu_4']:.2f}  "
                 f"CIDEr {100 * metrics['CIDEr']:.2f}"]
        floor = result.get("fixed_caption_baseline")
        if floor:
            lines.append(f"best single fixed caption: BLEU-4 {100 * floor['Bleu_4']['score']:.2f} "
                         f"(\"{floor['Bleu_4']['caption']}\")  CIDEr {100 * floor['CIDEr']['score']:.2f} "
                         f"(\"{floor['CIDEr']['caption']}\")")
        return lines


TASK = CocoCaptioning()
