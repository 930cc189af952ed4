"""Diagnostics that say why a configuration wins or loses, beyond BLEU/CIDEr (README: "Diagnostics").

    val_nll              teacher-forced loss_base per response token on a fixed validation subset
    image_use_gap        the same NLL when each sample is given another image's visual input, minus
                         val_nll: > 0 means the captions depend on the image, about 0 that it is ignored
    text_only_nll        the LM alone (no visual input) on the same responses; the sequence's first token
                         has nothing before it to be predicted from, so it is not scored
    query_key_cosine     per contrastive loss: mean cos(query, the sample's own key) over training
                         samples (the key queues hold training rows only)

Everything runs through the model protocol (any family), in eval mode, without gradients and with
torch's RNG forked, so computing a figure never changes what a stage trains (tests/test_golden.py).
"""
from __future__ import annotations

import copy
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from eimctl.data.tokens import tokenize_pairs
from eimctl.eim.objectives import image_features
from eimctl.eim.queue_kinds import KIND_OF_LOSS, ForwardState
from eimctl.runtime.errors import EimError
from eimctl.tasks import formatter
from eimctl.train.batches import image_inputs, make_collate

TEXT_ONLY_NOTE = "the sequence's first token has no prediction without a visual input and is not scored"


@dataclass
class Subset:
    """A fixed subset of one split and how to batch it.

    `positions` are what `texts` and `images_for` take (for the training split: queue rows);
    `image_ids[k]` is the image of `positions[k]`. `texts(positions)` gives the token tensors and
    `indices` (and, for the training split, the image inputs too); `images_for(positions)` gives
    image inputs alone ({"features": ...} or {"pixels": ...})."""
    positions: list[int]
    image_ids: list[str]
    texts: Callable[[list[int]], dict]
    images_for: Callable[[list[int]], dict] | None = None


def fixed_subset(size: int, limit: int) -> list[int]:
    """Up to `limit` of the positions 0..size-1, spread evenly over the split; always the same ones."""
    if size <= limit:
        return list(range(size))
    return [k * size // limit for k in range(limit)]


def derangement(image_ids: list[str]) -> list[int]:
    """partner[k] != k for every k, and image_ids[partner[k]] != image_ids[k] whenever that is possible.

    The samples are ordered by image, so each image's samples sit together, and each is paired with
    the sample `largest` places further on (cyclically), `largest` being the most samples any one
    image has: no image spans that many places, so the partner shows another image unless one image
    holds more than half of the samples (then no pairing could avoid it)."""
    count = len(image_ids)
    if count < 2:
        return list(range(count))
    order = sorted(range(count), key=lambda k: image_ids[k])
    largest = max(Counter(image_ids).values())
    shift = largest if largest < count else 1
    partner = [0] * count
    for place, sample in enumerate(order):
        partner[sample] = order[(place + shift) % count]
    return partner


@contextmanager
def quiet_eval(model, device: torch.device):
    """Eval mode and no gradients with torch's RNG forked; afterwards every module's mode and the RNG
    state are what they were, so training continues bit for bit as if nothing had run."""
    modes = [(module, module.training) for module in model.modules()]
    device = torch.device(device)
    cuda = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        model.eval()
        try:
            yield
        finally:
            for module, training in modes:
                module.training = training


def _batches(subset: Subset, batch_size: int):
    """Runs of up to `batch_size` places k in the subset (index into positions and image_ids)."""
    for start in range(0, len(subset.positions), batch_size):
        yield list(range(start, min(start + batch_size, len(subset.positions))))


def _on_device(batch: dict, device) -> dict:
    return {name: value.to(device) if torch.is_tensor(value) else value for name, value in batch.items()}


def _texts_and_images(subset: Subset, places: list[int], device) -> dict:
    positions = [subset.positions[k] for k in places]
    batch = subset.texts(positions)
    if subset.images_for is not None:
        batch = {**batch, **subset.images_for(positions)}
    return _on_device(batch, device)


def response_nll(model, subset: Subset, device, batch_size: int) -> dict:
    """Token-weighted loss_base over the subset with each sample's own image, and with another image's
    (`derangement`); their difference is the image-use gap (None with fewer than two samples)."""
    partner = derangement(subset.image_ids)
    sums, tokens = {"own": 0.0, "other": 0.0}, 0
    with quiet_eval(model, device):
        for places in _batches(subset, batch_size):
            batch = _texts_and_images(subset, places, device)
            others = _on_device(subset.images_for([subset.positions[partner[k]] for k in places]), device)
            scored = int(batch["loss_mask"].sum())
            for name, images in (("own", batch), ("other", others)):
                out = model.run_lm(model.project(image_features(model, images)), batch)
                sums[name] += float(model.response_loss(out, batch)) * scored
            tokens += scored
    own, other = sums["own"] / max(tokens, 1), sums["other"] / max(tokens, 1)
    return {"samples": len(subset.positions), "tokens": tokens, "val_nll": own, "val_nll_other_image": other,
            "image_use_gap": other - own if len(subset.positions) > 1 else None}


def text_only_nll(model, subset: Subset, device, batch_size: int) -> dict:
    """Mean next-token cross-entropy of the response tokens with no visual input: the logit at text
    position t predicts token t+1, so the sequence's first token is not scored (TEXT_ONLY_NOTE)."""
    total, tokens = 0.0, 0
    with quiet_eval(model, device):
        for places in _batches(subset, batch_size):
            batch = _on_device(subset.texts([subset.positions[k] for k in places]), device)
            out = model.run_lm(None, batch, logits=True)
            targets = batch["input_ids"][:, 1:]
            logits = out.logits[:, out.offset:out.offset + targets.shape[1]]
            losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                     reduction="none")
            scored = batch["loss_mask"][:, 1:].reshape(-1).to(losses.dtype)
            total += float((losses * scored).sum())
            tokens += int(scored.sum())
    return {"nll": total / max(tokens, 1), "tokens": tokens}


def _query_state(model, batch: dict, losses: set[str], eim) -> ForwardState:
    """The forward pass the queries of `losses` read, made as compute_losses makes it (loss_LM's query
    sees the ST output only with eim.lm_query=multimodal)."""
    state = ForwardState(features=image_features(model, batch))
    multimodal = "lm" in losses and eim.lm_query == "multimodal"
    if "st" in losses or multimodal:
        state.visual = model.project(state.features)
    if "lm" in losses:
        state.lm = model.run_lm(state.visual if multimodal else None, batch, logits=False)
    return state


def _queue_rows(keys, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Rows `rows` of a queue (a memory-mapped array or a Tensor on any device) as `like`'s device/dtype."""
    if not isinstance(keys, torch.Tensor):
        keys = torch.from_numpy(np.asarray(keys[rows.cpu().numpy()], dtype=np.float32))
        rows = torch.arange(len(keys))
    return keys[rows.to(keys.device)].to(device=like.device, dtype=like.dtype)


def query_key_cosine(model, subset: Subset, losses, queues: dict, eim, device, batch_size: int) -> dict:
    """For each contrastive loss among `losses`: mean cos(query, own key) over the subset, whose
    batches carry `indices` (queue rows) and image inputs."""
    kinds = [KIND_OF_LOSS[loss] for loss in losses if loss in KIND_OF_LOSS]
    sums = {kind.loss: 0.0 for kind in kinds}
    with quiet_eval(model, device):
        for places in _batches(subset, batch_size):
            batch = _texts_and_images(subset, places, device)
            state = _query_state(model, batch, {kind.loss for kind in kinds}, eim)
            for kind in kinds:
                query = kind.query(model, state).float()
                own_keys = _queue_rows(queues[kind.name], batch["indices"], query)
                sums[kind.loss] += float(F.cosine_similarity(query, own_keys, dim=-1).sum())
    return {kind.loss: {"queue": kind.name, "mean_cos": sums[kind.loss] / max(len(subset.positions), 1),
                        "samples": len(subset.positions)} for kind in kinds}


def validation_subset(model, config, task, split, cache_dir: Path, device) -> Subset:
    """Up to eval.diagnostic_samples samples of `split` (the task's validation split), tokenised as in
    training, with their image inputs: the frozen-CLIP feature cache (of this subset only), or the
    model's own CLIP when it trains or train.feature_cache is off."""
    chosen = [split.samples[k] for k in fixed_subset(len(split.samples), config.eval.diagnostic_samples)]
    part = copy.copy(split)  # the split's own type, holding only the chosen samples
    part.samples, part.fingerprint = chosen, f"{split.fingerprint}:diagnostics-{len(chosen)}"
    pairs = list(map(formatter(task, config), chosen))
    tokens, _ = tokenize_pairs(model.tokenizer, pairs, config.data.max_caption_tokens)
    with quiet_eval(model, device):
        images_for = image_inputs(model, config, part, cache_dir, device, show=False)
    return Subset(list(range(len(chosen))), [s.image_id for s in chosen],
                  make_collate(tokens, model.tokenizer.pad_token_id, lambda _: {}), images_for)


def _validation_or_reason(model, config, task, cache_dir: Path, device) -> tuple[Subset | None, str]:
    """The validation subset, or None and why the data set has no usable validation split (then the
    stage's other figures are still worth having; a failure after reading it, such as a full disk, is not
    caught here)."""
    try:
        split = task.read(config.data, "val")
    except EimError as error:
        return None, error.what
    return validation_subset(model, config, task, split, cache_dir, device), ""


def validation_diagnostics(model, config, task, cache_dir: Path, device) -> dict:
    """What `eimctl evaluate` records: val NLL and image-use gap (or why they are missing)."""
    subset, reason = _validation_or_reason(model, config, task, cache_dir, device)
    if subset is None:
        return {"split": "val", "skipped": reason}
    return {"split": "val", **response_nll(model, subset, device, config.eval.batch_size)}


class StageDiagnostics:
    """What `train-stage` writes to diagnostics.json: val NLL and image-use gap after training; for a
    stage whose losses include `lm`, the text-only NLL before (the model at init) and after; and
    cos(query, own key) for each contrastive loss the stage trains."""

    def __init__(self, model, config, task, losses: dict, cache_dir: Path, device: torch.device):
        self.model, self.config, self.task, self.losses = model, config, task, dict(losses)
        self.cache_dir, self.device = cache_dir, device
        self.text_only_before: float | None = None
        self._validation: tuple[Subset | None, str] | None = None

    def validation(self) -> tuple[Subset | None, str]:
        if self._validation is None:
            self._validation = _validation_or_reason(self.model, self.config, self.task, self.cache_dir,
                                                     self.device)
        return self._validation

    def before_training(self) -> None:
        """The text-only NLL of the weights the stage starts from (a stage that trains loss_LM only)."""
        if "lm" not in self.losses:
            return
        subset, _ = self.validation()
        if subset is not None:
            self.model.to(self.device)  # where fit() puts it next; moving it first changes nothing
            self.text_only_before = text_only_nll(self.model, subset, self.device, self.config.eval.batch_size)["nll"]

    def after_training(self, train_split, train_batches: Callable[[list[int]], dict], queues: dict) -> dict:
        """The record for diagnostics.json; `train_batches` is the stage's collate (queue rows -> batch)."""
        batch_size, record = self.config.eval.batch_size, {"split": "val"}
        subset, reason = self.validation()
        if subset is None:
            record["skipped"] = reason
        else:
            record.update(response_nll(self.model, subset, self.device, batch_size))
            if "lm" in self.losses:
                after = text_only_nll(self.model, subset, self.device, batch_size)
                record["text_only_nll"] = {"before": self.text_only_before, "after": after["nll"],
                                           "tokens": after["tokens"], "note": TEXT_ONLY_NOTE}
        if any(loss in KIND_OF_LOSS for loss in self.losses):
            rows = fixed_subset(len(train_split.samples), self.config.eval.diagnostic_samples)
            train_subset = Subset(rows, [train_split.samples[r].image_id for r in rows], train_batches)
            record["query_key_cosine"] = query_key_cosine(self.model, train_subset, self.losses, queues,
                                                          self.config.eim, self.device, batch_size)
        return record


def summary_line(record: dict) -> str:
    """One line for the terminal: the figures of a diagnostics record."""
    parts = []
    if record.get("skipped"):
        parts.append(f"val figures skipped ({record['skipped']})")
    elif "val_nll" in record:
        gap = record.get("image_use_gap")
        parts.append(f"val NLL {record['val_nll']:.3f} ({record['samples']} samples), image-use gap "
                     + ("n/a" if gap is None else f"{gap:+.3f}"))
    text = record.get("text_only_nll")
    if text:
        before = "n/a" if text["before"] is None else f"{text['before']:.3f}"
        parts.append(f"text-only NLL {before} -> {text['after']:.3f}")
    for loss, entry in record.get("query_key_cosine", {}).items():
        parts.append(f"cos(query, own key) loss_{loss} {entry['mean_cos']:.3f}")
    return "diagnostics: " + "; ".join(parts)
