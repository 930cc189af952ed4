"""The four training objectives of EIM on a batch, sharing forward passes where they can.

    base  autoregressive cross-entropy on the caption given the ST prefix  (loss_base)
    st    InfoNCE: mean of the ST output tokens  vs  Ke (mean LM token embeddings)   (loss_ST)
    lm    InfoNCE: tuned LM's last-token hidden state  vs  Kb (frozen LM's)           (loss_LM)
    ie    InfoNCE: CLIP [CLS] in the joint space  vs  Kt (CLIP text [EOS])           (loss_IE)
"""
from __future__ import annotations

import torch

from eimctl.config import EIMConfig
from eimctl.losses import queue_infonce
from eimctl.models.captioner import Captioner


def image_features(model: Captioner, batch: dict) -> torch.Tensor:
    if "features" in batch:
        return batch["features"]
    if any(p.requires_grad for p in model.clip.parameters()):
        return model.clip.encode_images(batch["pixels"])
    with torch.no_grad():
        return model.clip.encode_images(batch["pixels"])


def compute_losses(model: Captioner, batch: dict, losses: dict, queues: dict, eim: EIMConfig) -> dict:
    """Named, unweighted losses for the objectives in `losses` (a stage's {name: weight})."""
    out: dict[str, torch.Tensor] = {}
    ids, mask, index = batch["caption_ids"], batch["caption_mask"], batch["indices"]

    def infonce(query: torch.Tensor, queue: str) -> torch.Tensor:
        return queue_infonce(query, queues[queue], index, temperature=eim.temperature, chunk_rows=eim.chunk_rows or None)

    features = image_features(model, batch)
    if "ie" in losses:
        out["loss_ie"] = infonce(model.clip.ie_query(features), "kt")
    needs_prefix = "base" in losses or "st" in losses or ("lm" in losses and eim.lm_query == "multimodal")
    prefix = model.prefix(features) if needs_prefix else None
    if "st" in losses:
        out["loss_st"] = infonce(prefix.mean(dim=1), "ke")
    if "base" in losses or "lm" in losses:
        lm_prefix = prefix if ("base" in losses or eim.lm_query == "multimodal") else None
        logits, last = model.run_lm(lm_prefix, ids, mask, hidden="lm" in losses)
        if "base" in losses:
            out["loss_base"] = model.caption_cross_entropy(logits, prefix.shape[1], ids, mask)
        if "lm" in losses:
            if eim.lm_query == "text" and lm_prefix is not None:  # base needs the prefix; LM query must not
                _, last = model.run_lm(None, ids, mask, hidden=True)
            out["loss_lm"] = infonce(last, "kb")
    return out
