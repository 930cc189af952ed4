"""The LLaMA-Adapter family: frozen CLIP -> Transformer ST -> visual tokens added to adaption prompts.

    CLIP features [B, T, d] --ST--> visual [B, K, D]
    top L decoder layers of a frozen LLaMA-architecture LM: prompts_l (K x D) + visual, attended through
    the layer's frozen k/v projections and a zero-init tanh gate per head (eimctl/models/adaption_prompts.py)

The text runs through the LM as it is (no prefix, no extra positions), so at initialisation (all gates 0)
the model is exactly the frozen LM. The ST is the released multimodal LLaMA-Adapter's (K learnable queries
in front of CLIP's tokens through ViT blocks, eimctl/models/vit_st.py), the form the EIM paper uses with
CLIP's projection removed and the full token set (model.clip.remove_projection=true, model.clip.tokens=full;
with pooled features the ST reads the [CLS] alone).

Trainable groups: `prompts`, `gates`, `st`, and on the CLIP side for loss_IE `clip_prompts` (eimctl's CLIP
tuning module, eim.clip_tuning) and `ie_head`. CLIP and the LM never train. loss_base is the next-token
cross-entropy on the response tokens (labels IGNORE_INDEX elsewhere; id 0 is a real token in many
vocabularies). The default schedule is EIM's for these families: st -> lm -> adapter (loss_base only)
-> base-ie, plus the plain baseline `base`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from eimctl.models.adaption_prompts import AdaptionPrompts
from eimctl.models.clip import ClipEncoder, clip_tuning_options
from eimctl.models.generate import generate_from_embeds
from eimctl.models.lm import (IGNORE_INDEX, enable_checkpointing, final_hidden, load_lm, plain_text_hidden,
                              response_labels, shifted_cross_entropy, with_bos)
from eimctl.models.protocol import LMOutput
from eimctl.models.vit_st import build_st
from eimctl.runtime.errors import EimError


@dataclass
class LlamaAdapterConfig:
    """Config `model.llama_adapter.*`.

    layers           adaption prompts go into the top `layers` of the LM's N decoder layers (v1: 30 of 32)
    prompt_len       K prompts per adapted layer (v1: 10); also the number of ST output tokens (Q = K)
    st_depth         ViT blocks of the `tokens` ST (released multimodal code: 8)
    st_heads         attention heads of those blocks (16); must divide the ST width
    st_width         the ST's width; 0 = CLIP's feature width (features are mapped to it by clip_proj)
    visual_fusion    tokens: K queries read CLIP's tokens through ViT blocks, K visual tokens added to every
                     adapted layer's prompts (released code, EIM) | global_mlp: the [CLS] feature through an
                     MLP to one token repeated K times and added (v1 paper, with one CLIP layer's [CLS])
    prompt_init_std  standard deviation of the prompts' normal initialisation (v1: an Embedding, N(0, 1))
    bos              put the tokenizer's BOS token first in every sequence, as LLaMA-Adapter does (a LLaMA-style
                     LM is pretrained on sequences that begin with it); no effect when the tokenizer has none
    """
    layers: int = 30
    prompt_len: int = 10
    st_depth: int = 8
    st_heads: int = 16
    st_width: int = 0
    visual_fusion: str = "tokens"
    prompt_init_std: float = 1.0
    bos: bool = True


SECTION = LlamaAdapterConfig
TRAINABLE_GROUPS = {"prompts": "adapter.prompts", "gates": "adapter.gates", "st": "st.",
                    "clip_prompts": "clip.prompts", "ie_head": "clip.ie_head."}
CLIP_TUNING_GROUPS = ("clip_prompts", "ie_head")
# EIM for LLaMA-Adapter: lossST -> lossLM -> Adapter (loss_base only) -> loss_base + lossIE; `base` is the
# plain LLaMA-Adapter training (ST, prompts and gates with loss_base).
DEFAULT_STAGES = {
    "base": {"init": "pretrained", "trainable": ["st", "prompts", "gates"], "losses": {"base": 1.0}},
    "st": {"init": "pretrained", "trainable": ["st"], "losses": {"st": 1.0}},
    "lm": {"init": "st", "trainable": ["prompts", "gates"], "losses": {"lm": 1.0}},
    "adapter": {"init": "lm", "trainable": ["st", "prompts", "gates"], "losses": {"base": 1.0}},
    "base-ie": {"init": "adapter", "trainable": ["st", "prompts", "gates", "clip_prompts"],
                "losses": {"base": 1.0, "ie": 1.0}},
}
FUSIONS = ("tokens", "global_mlp")


def check_section(cfg: LlamaAdapterConfig, feature_dim: int) -> int:
    """Every problem of `model.llama_adapter` in one error; returns the ST width."""
    problems = [f"{key}={getattr(cfg, key)} must be >= 1" for key in ("layers", "prompt_len", "st_heads")
                if getattr(cfg, key) < 1]
    problems += [f"{key}={getattr(cfg, key)} must be >= 0" for key in ("st_depth", "st_width")
                 if getattr(cfg, key) < 0]
    if cfg.visual_fusion not in FUSIONS:
        problems.append(f"visual_fusion='{cfg.visual_fusion}' is not one of {list(FUSIONS)}")
    if not cfg.prompt_init_std > 0:
        problems.append(f"prompt_init_std={cfg.prompt_init_std} must be > 0")
    width = cfg.st_width or feature_dim
    if cfg.visual_fusion == "tokens" and cfg.st_heads >= 1 and width % cfg.st_heads:
        problems.append(f"st_heads={cfg.st_heads} does not divide the ST width {width}"
                        + (" (CLIP's feature width)" if not cfg.st_width else ""))
    if problems:
        raise EimError("invalid llama-adapter options: " + "; ".join(problems), where="model.llama_adapter",
                       hint="see the LlamaAdapterConfig docstring in eimctl/models/llama_adapter.py")
    return width


class LlamaAdapter(nn.Module):
    def __init__(self, model_cfg, clip_options: dict):
        super().__init__()
        cfg = model_cfg.llama_adapter
        self.clip = ClipEncoder(model_cfg.clip, **clip_options)
        width = check_section(cfg, self.clip.feature_dim)
        self.lm, self.tokenizer = load_lm(model_cfg.lm)
        self.bos_id = self.tokenizer.bos_token_id if cfg.bos else None
        # without a BOS before it, the text's first token is never predicted (what loss_base counts)
        self.scores_first_text_token = self.bos_id is not None
        self.lm.requires_grad_(False)
        self.lm_dim = self.lm.get_input_embeddings().embedding_dim
        self.adapter = AdaptionPrompts(self.lm, layers=cfg.layers, prompt_len=cfg.prompt_len,
                                       init_std=cfg.prompt_init_std, lm_name=model_cfg.lm.name)
        self.st = build_st(cfg.visual_fusion, feature_dim=self.clip.feature_dim, width=width, lm_dim=self.lm_dim,
                           queries=cfg.prompt_len, depth=cfg.st_depth, heads=cfg.st_heads)

    def compile_for_training(self) -> None:
        """torch.compile the ST in place (train.compile); the LM runs with hooks and stays eager."""
        self.st.compile()

    def enable_gradient_checkpointing(self) -> None:
        """train.grad_checkpointing: recompute the LM's layers in the backward pass, with the prompts' state."""
        enable_checkpointing(self.lm, lambda: [(self.adapter, name) for name in ("enabled", "visual", "_cache")])

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_images(pixels)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """CLIP features [B, T, d] -> visual tokens [B, K, D] (added to every adapted layer's prompts)."""
        return self.st(features)

    def _visual_prompts(self, visual: torch.Tensor | None, has_image) -> torch.Tensor | None:
        """The visual tokens with text-only samples' rows zeroed (`has_image` [B] bool; None = all)."""
        if visual is None or has_image is None:
            return visual
        return visual * has_image.to(device=visual.device, dtype=visual.dtype).view(-1, 1, 1)

    def run_lm(self, visual: torch.Tensor | None, batch: dict, *, logits: bool = True) -> LMOutput:
        """The LM over the text with the adaption prompts (+ `visual`) active; no positions are added."""
        ids, mask = with_bos(batch["input_ids"], batch["attention_mask"], self.bos_id)
        labels = response_labels(batch["input_ids"], batch["loss_mask"])
        offset = 0 if self.bos_id is None else 1
        labels = torch.cat([labels.new_full((labels.shape[0], offset), IGNORE_INDEX), labels], dim=1)
        with self.adapter.active(self._visual_prompts(visual, batch.get("has_image"))):
            hidden = final_hidden(self.lm, input_ids=ids, attention_mask=mask, use_cache=False)
        out_logits = self.lm.get_output_embeddings()(hidden) if logits else None
        return LMOutput(hidden=hidden, mask=mask, logits=out_logits, offset=offset, labels=labels)

    def response_loss(self, out: LMOutput, batch: dict) -> torch.Tensor:
        """Mean next-token cross-entropy over the response tokens (logits at t predict token t+1)."""
        return shifted_cross_entropy(out.logits, out.labels)

    def ie_query(self, features: torch.Tensor) -> torch.Tensor:
        return self.clip.ie_query(features)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids)

    def text_hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The plain frozen LM over text (the prompts bypassed), as the key queues see it."""
        with self.adapter.bypassed():
            return plain_text_hidden(self.lm, ids, mask, self.bos_id)

    def _start_tokens(self, prompts: list[list[int]] | None, batch: int) -> list[list[int]]:
        """Each row's prompt ids; an empty prompt (or none at all) starts from the tokenizer's BOS."""
        rows = [list(p) for p in prompts] if prompts is not None else [[] for _ in range(batch)]
        if len(rows) != batch:
            raise EimError(f"{len(rows)} prompts for {batch} images", where="generate")
        if any(not row for row in rows):
            bos = self.tokenizer.bos_token_id
            if bos is None:
                raise EimError("generation without an instruction needs a BOS token, and this tokenizer has "
                               "none", where="model.lm.name", hint="use a task that gives instructions")
            rows = [row or [bos] for row in rows]
        if self.bos_id is not None:
            rows = [row if row[:1] == [self.bos_id] else [self.bos_id, *row] for row in rows]
        return rows

    def generate(self, visual: torch.Tensor | None, prompts: list[list[int]] | None, *, max_new_tokens: int,
                 beam_size: int, has_image: torch.Tensor | None = None, sampling: dict | None = None
                 ) -> list[list[int]]:
        """Continue each prompt (left-padded, KV-cached) with the visual prompts active; greedy unless
        `sampling` = {"temperature", "top_p", "generator"} (and "on_token", a per-token callback)."""
        if beam_size > 1:
            raise EimError("beam search is not available for llama-adapter", where="eval.beam_size",
                           hint="use eval.beam_size=1")
        rows = self._start_tokens(prompts, visual.shape[0] if visual is not None else len(prompts or []))
        device = self.lm.get_input_embeddings().weight.device
        length = max(len(row) for row in rows)
        ids = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for number, row in enumerate(rows):
            ids[number, length - len(row):] = torch.tensor(row, dtype=torch.long, device=device)
            mask[number, length - len(row):] = 1
        sampling = sampling or {}
        with torch.inference_mode(), self.adapter.active(self._visual_prompts(visual, has_image), cache=True):
            return generate_from_embeds(self.lm, self.embed_tokens(ids), mask,
                                        eos_token_id=self.tokenizer.eos_token_id,
                                        max_new_tokens=max_new_tokens, on_keep=self.adapter.keep,
                                        temperature=sampling.get("temperature", 0.0),
                                        top_p=sampling.get("top_p", 1.0), generator=sampling.get("generator"),
                                        on_token=sampling.get("on_token"))


def build(config, *, groups: set[str], losses: set[str], active: set[str]) -> LlamaAdapter:
    return LlamaAdapter(config.model, clip_tuning_options(config, groups=groups, losses=losses, active=active))
