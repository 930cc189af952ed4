"""The ClipCap family: CLIP -> ST (projector) -> causal LM, the ST output as a prefix before the text.

    CLIP features [B, T, d] --projector--> prefix [B, P, D] ++ text embeddings --LM--> next-token logits

Trainable groups: `projector`, `lm`, `clip_prompts` (loss_IE's CLIP tuning module, as
CLIP has no adapters of its own: the prompt network or prompt tokens, eim.clip_tuning) and `ie_head` (loss_IE's optional
linear head). loss_base is the cross-entropy on the response tokens only; padding
is excluded by the loss mask, never by a token id (GPT-2's token 0, "!", is real).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eimctl.models.clip import ClipEncoder, clip_tuning_options
from eimctl.models.clip_tuning import PromptNetworkSpec
from eimctl.models.generate import generate_captions
from eimctl.models.lm import enable_checkpointing, final_hidden, load_lm
from eimctl.models.projectors import build_projector
from eimctl.models.protocol import LMOutput
from eimctl.runtime.errors import EimError

SECTION = None  # ClipCap's options are the shared model.clip / model.projector / model.lm sections
TRAINABLE_GROUPS = {"projector": "projector.", "lm": "lm.", "clip_prompts": "clip.prompts",
                    "ie_head": "clip.ie_head."}
CLIP_TUNING_GROUPS = ("clip_prompts", "ie_head")
# The paper's segmented order for ClipCap (Table 1): st -> lm -> base-ie, plus the plain baseline `base`.
DEFAULT_STAGES = {
    "base": {"init": "pretrained", "trainable": ["projector", "lm"], "losses": {"base": 1.0}},
    "st": {"init": "pretrained", "trainable": ["projector"], "losses": {"st": 1.0}},
    "lm": {"init": "st", "trainable": ["lm"], "losses": {"lm": 1.0}},
    "base-ie": {"init": "lm", "trainable": ["projector", "lm", "clip_prompts"], "losses": {"base": 1.0, "ie": 1.0}},
}


class ClipCap(nn.Module):
    def __init__(self, model_cfg, *, prompt_tokens: int = 0, ie_head: bool = False, prompts_active: bool = False,
                 prompt_network: PromptNetworkSpec | None = None):
        super().__init__()
        self.clip = ClipEncoder(model_cfg.clip, prompt_tokens, ie_head, prompts_active, prompt_network)
        self.lm, self.tokenizer = load_lm(model_cfg.lm)
        self.lm_dim = self.lm.get_input_embeddings().embedding_dim
        self.projector = build_projector(model_cfg.projector, self.clip.feature_dim, self.clip.num_tokens,
                                         self.lm_dim)

    def compile_for_training(self) -> None:
        """torch.compile the projector and the LM in place (train.compile); parameter names stay the same.

        dynamic=True: caption lengths change from batch to batch, and one graph for all of them
        beats recompiling for each new length."""
        self.projector.compile(dynamic=True)
        self.lm.compile(dynamic=True)

    def enable_gradient_checkpointing(self) -> None:
        """train.grad_checkpointing: recompute the LM's layers in the backward pass."""
        enable_checkpointing(self.lm)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_images(pixels)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Image features [B, T, d] -> LM prefix embeddings [B, P, D]."""
        return self.projector(features)

    def run_lm(self, visual: torch.Tensor | None, batch: dict, *, logits: bool = True) -> LMOutput:
        """The LM over [prefix +] text embeddings."""
        tokens = self.lm.get_input_embeddings()(batch["input_ids"])
        mask = batch["attention_mask"]
        inputs = tokens
        if visual is not None:
            inputs = torch.cat([visual, tokens.to(visual.dtype)], dim=1)
            mask = torch.cat([mask.new_ones(visual.shape[:2]), mask], dim=1)
        hidden = final_hidden(self.lm, inputs_embeds=inputs)
        out_logits = self.lm.get_output_embeddings()(hidden) if logits else None
        return LMOutput(hidden=hidden, mask=mask, logits=out_logits, offset=0 if visual is None else visual.shape[1])

    def response_loss(self, out: LMOutput, batch: dict) -> torch.Tensor:
        """Mean cross-entropy over the tokens marked in `loss_mask` ([B, L], 1 = scored)."""
        if out.offset < 1:
            raise EimError("loss_base needs the ST output before the text", hint="the base loss runs multimodal")
        # The logit at position t predicts token t+1: the prefix's last position predicts text token 0.
        text_logits = out.logits[:, out.offset - 1:-1]
        losses = F.cross_entropy(text_logits.reshape(-1, text_logits.shape[-1]).float(),
                                 batch["input_ids"].reshape(-1), reduction="none")
        mask = batch["loss_mask"].reshape(-1).to(losses.dtype)
        return (losses * mask).sum() / mask.sum().clamp_min(1)

    def ie_query(self, features: torch.Tensor) -> torch.Tensor:
        return self.clip.ie_query(features)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids)

    def text_hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return final_hidden(self.lm, input_ids=ids, attention_mask=mask)

    def generate(self, visual: torch.Tensor, prompts: list[list[int]] | None, *, max_new_tokens: int,
                 beam_size: int) -> list[list[int]]:
        if prompts and any(prompts):
            raise EimError("ClipCap generates from the image prefix alone; this task gives an instruction",
                           where="model.family", hint="use a family that takes instructions")
        return generate_captions(self.lm, visual, eos_token_id=self.tokenizer.eos_token_id,
                                 max_new_tokens=max_new_tokens, beam_size=beam_size)


def build(config, *, groups: set[str], losses: set[str], active: set[str]) -> ClipCap:
    return ClipCap(config.model, **clip_tuning_options(config, groups=groups, losses=losses, active=active))
