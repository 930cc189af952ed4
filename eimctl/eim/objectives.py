"""The four training objectives of EIM on a batch, sharing forward passes where they can.

    base  autoregressive cross-entropy on the response given the ST output   (loss_base)
    st    InfoNCE: mean of the ST output tokens  vs  Ke                         (loss_ST)
    lm    InfoNCE: tuned LM's last-token hidden state  vs  Kb                   (loss_LM)
    ie    InfoNCE: CLIP [CLS] in the joint space  vs  Kt                        (loss_IE)

The model is any family (eimctl.models.protocol.VisionLanguageModel); the queries
and keys are defined together in eimctl.eim.queue_kinds.
"""
from __future__ import annotations

import torch

from eimctl.eim.losses import queue_infonce, queue_infonce_related
from eimctl.eim.queue_kinds import KIND_OF_LOSS, ForwardState


def image_features(model, batch: dict) -> torch.Tensor:
    """Cached features when the batch carries them; else CLIP runs, with gradients only if it trains."""
    if "features" in batch:
        return batch["features"]
    if any(p.requires_grad for p in model.clip.parameters()):
        return model.encode_images(batch["pixels"])
    with torch.no_grad():
        return model.encode_images(batch["pixels"])


def compute_losses(model, batch: dict, losses: dict, queues: dict, eim, related=None) -> dict:
    """Named, unweighted losses for the objectives in `losses` (a stage's {name: weight}).

    `queues` maps a queue kind's name (kt, ke, kb) to its keys; `eim` is the config's eim section;
    `related` (eimctl.eim.related, None unless eim.same_image / eim.same_text ask for it) turns the
    contrastive losses into their multi-positive / masked variant."""
    out: dict[str, torch.Tensor] = {}
    state = ForwardState(features=image_features(model, batch))
    related_batch = related.for_batch(batch["indices"]) if related is not None else None

    def contrastive(loss: str) -> torch.Tensor:
        kind = KIND_OF_LOSS[loss]
        if related_batch is not None:
            return queue_infonce_related(kind.query(model, state), queues[kind.name], batch["indices"],
                                         *related_batch, temperature=eim.temperature,
                                         chunk_rows=eim.chunk_rows or None)
        return queue_infonce(kind.query(model, state), queues[kind.name], batch["indices"],
                             temperature=eim.temperature, chunk_rows=eim.chunk_rows or None)

    if "ie" in losses:
        out["loss_ie"] = contrastive("ie")
    multimodal_lm = "lm" in losses and eim.lm_query == "multimodal"
    if "base" in losses or "st" in losses or multimodal_lm:
        state.visual = model.project(state.features)
    if "st" in losses:
        out["loss_st"] = contrastive("st")
    if "base" in losses or "lm" in losses:
        lm_visual = state.visual if ("base" in losses or multimodal_lm) else None
        state.lm = model.run_lm(lm_visual, batch, logits="base" in losses)
        if "base" in losses:
            out["loss_base"] = model.response_loss(state.lm, batch)
        if "lm" in losses:
            if not multimodal_lm and lm_visual is not None:  # base needs the ST output; this query must not
                state.lm = model.run_lm(None, batch, logits=False)
            out["loss_lm"] = contrastive("lm")
    return out
