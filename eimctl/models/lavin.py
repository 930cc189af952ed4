"""The LaVIN family: mixture-of-modality adaptation (MMA) of a frozen CLIP ViT and a frozen LLaMA-like LM.

    CLIP (an MMA in every block) --visual tokens--> adapter_proj (the ST) --> [image block] ++ text --> LM
                                                                                 (an MMA in every layer)

- Visual tokens come from CLIP itself (`model.clip.tokens`): `cls_every_k` (LaVIN's raw [CLS] after every
  k-th block, `model.clip.cls_every`) or `pooled_grid` (EIM's 50 = [CLS] + 7x7 pooled patches).
- Sequence (eimctl/models/lavin_layout.py): `[image_prefix][visual tokens] + text`, or `[no_image_text] +
  text` for a text-only sample (`has_image` False; a batch without `has_image` is all images and
  `run_lm(None, ...)` all text-only). Labels are per row (LMOutput.labels).
- Modality token at position 0, seen by nothing else: it runs first, alone, and fixes each layer's
  per-sample routing weights (eimctl/models/lavin_parts.py says why that equals LaVIN's masked pass).
- Routing inside CLIP (`model.lavin.clip_router`): `cls` routes each sample on its own [CLS] (our deviation:
  open_clip is batch-first); `first_sample` reproduces the original sequence-first quirk (sample 0's
  tokens route every sample, position by position).
- loss_IE tunes the CLIP adapters (no new parameters); its query is the final block's [CLS] through ln_post
  and CLIP's projection (`ClipEncoder.ie_query`; with cls_every_k, k must divide the depth).
- Every adapter exists in every stage and starts as the identity, so an untrained group changes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from eimctl.models.clip import ClipEncoder
from eimctl.models.generate import generate_from_embeds
from eimctl.models.lavin_layout import prefix_ids, prompt_rows, row_blocks, training_rows
from eimctl.models.lavin_parts import (CLIP_ROUTES, Switch, attach_lm_adapters, decoder_layers, lavin_modules,
                                       modality_routing, reindex_routing)
from eimctl.models.lm import enable_checkpointing, final_hidden, load_lm, plain_text_hidden, shifted_cross_entropy
from eimctl.models.protocol import LMOutput
from eimctl.runtime.errors import EimError


@dataclass
class LavinConfig:
    adapter_dim: int = 8              # MMA hidden width h
    adapter_groups: int = 2           # groups of the two up-projections (B, D)
    adapter_scale: float = 1.0        # s in x + s·w0·B(z) + s·w1·D(z)
    temperature: float = 10.0         # router softmax temperature: 10 for 7B, 5 for 13B and the chatbot
    adapter_dropout: float = 0.1      # dropout on A(x) while training
    hidden_proj: int = 128            # adapter_proj's hidden width
    clip_router: str = "cls"          # cls (each sample's [CLS]) | first_sample (the original CLIP quirk)
    image_prefix: str = "Image: "     # text before an image sample's visual tokens
    no_image_text: str = "Image: N/A"  # the block of a text-only sample
    bos: bool = True                  # the tokenizer's BOS first, before the block (LaVIN's [BOS] "Image: " ...);
                                      # no effect when the tokenizer has none


SECTION = LavinConfig
TRAINABLE_GROUPS = {"st": "adapter_proj.", "lm_adapters": "lm_adapters.", "clip_adapters": "clip.adapters.",
                    "modality": "modality_embedding."}
CLIP_TUNING_GROUPS = ("clip_adapters",)
_ALL = ["st", "lm_adapters", "clip_adapters", "modality"]
# EIM on LaVIN (EIM:L202): lossST -> lossLM -> Adapter (loss_base only) -> loss_base + lossIE; `base` = plain LaVIN.
DEFAULT_STAGES = {
    "base": {"init": "pretrained", "trainable": _ALL, "losses": {"base": 1.0}},
    "st": {"init": "pretrained", "trainable": ["st"], "losses": {"st": 1.0}},
    "lm": {"init": "st", "trainable": ["lm_adapters", "modality"], "losses": {"lm": 1.0}},
    "adapter": {"init": "lm", "trainable": _ALL, "losses": {"base": 1.0}},
    "base-ie": {"init": "adapter", "trainable": _ALL, "losses": {"base": 1.0, "ie": 1.0}},
}
VISUAL_TOKENS = ("cls_every_k", "pooled_grid")


class Lavin(nn.Module):
    def __init__(self, model_cfg, options: LavinConfig):
        super().__init__()
        self.options = options
        self.clip = ClipEncoder(model_cfg.clip)
        self.lm, self.tokenizer = load_lm(model_cfg.lm)
        layers = decoder_layers(self.lm, model_cfg.lm.name)
        self.lm_dim = self.lm.get_input_embeddings().embedding_dim
        _check_divisible(options, self.lm_dim, self.clip.width)
        parts = lavin_modules(options, lm_dim=self.lm_dim, lm_layers=len(layers), clip_width=self.clip.width,
                              clip_blocks=len(self.clip.model.visual.transformer.resblocks),
                              feature_dim=self.clip.feature_dim)
        self.adapter_proj = parts["adapter_proj"]
        self.lm_adapters = parts["lm_adapters"]
        self.modality_embedding = parts["modality_embedding"]
        self.clip.attach_block_adapters(parts["clip_adapters"])
        self.switch = Switch()
        attach_lm_adapters(layers, self.lm_adapters, self.switch)
        self.bos_id = self.tokenizer.bos_token_id if options.bos else None
        bos = [] if self.bos_id is None else [self.bos_id]
        self.image_prefix_ids = bos + prefix_ids(self.tokenizer, options.image_prefix)
        self.no_image_ids = bos + prefix_ids(self.tokenizer, options.no_image_text)

    def compile_for_training(self) -> None:
        """torch.compile the ST only: the LM's adapters keep per-sample routing state in Python attributes
        (set by the modality pass), which a compiled LM graph would guard on and recompile for."""
        self.adapter_proj.compile(dynamic=True)

    def enable_gradient_checkpointing(self) -> None:
        """train.grad_checkpointing: recompute the LM's layers in the backward pass, with the routing state
        (the switch, each adapter's captured weights) they ran with."""
        enable_checkpointing(self.lm, lambda: [(self.switch, "on"), *[(adapter, name) for adapter in self.lm_adapters
                                                                       for name in ("capture", "cached")]])

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_images(pixels)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """CLIP visual tokens [B, T, d] -> LM-width visual tokens [B, T, D]."""
        return self.adapter_proj(features)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids)

    def _blocks(self, visual: torch.Tensor | None, has_image: torch.Tensor) -> list[torch.Tensor]:
        device = self.lm.get_input_embeddings().weight.device
        image = self.embed_tokens(torch.tensor(self.image_prefix_ids, dtype=torch.long, device=device))
        text = self.embed_tokens(torch.tensor(self.no_image_ids, dtype=torch.long, device=device))
        return row_blocks(image, text, visual, has_image)

    def _has_image(self, visual: torch.Tensor | None, given: torch.Tensor | None, rows: int) -> torch.Tensor:
        device = self.lm.get_input_embeddings().weight.device
        if visual is None:
            return torch.zeros(rows, dtype=torch.bool, device=device)
        if given is None:
            return torch.ones(rows, dtype=torch.bool, device=device)
        return given.to(device=device, dtype=torch.bool)

    def run_lm(self, visual: torch.Tensor | None, batch: dict, *, logits: bool = True) -> LMOutput:
        """The adapted LM over each row's block + text (right-padded), the modality token routing it."""
        ids = batch["input_ids"]
        has_image = self._has_image(visual, batch.get("has_image"), ids.shape[0])
        embeds, mask, labels, offset = training_rows(self._blocks(visual, has_image), self.embed_tokens(ids), batch)
        positions = torch.arange(1, embeds.shape[1] + 1, device=embeds.device).expand(embeds.shape[0], -1)
        with modality_routing(self.lm, self.lm_adapters, self.modality_embedding, has_image):
            hidden = final_hidden(self.lm, inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                  use_cache=False)
        out_logits = self.lm.get_output_embeddings()(hidden) if logits else None
        return LMOutput(hidden=hidden, mask=mask, logits=out_logits, offset=offset, labels=labels)

    def response_loss(self, out: LMOutput, batch: dict) -> torch.Tensor:
        """loss_base: next-token cross-entropy on the scored response tokens (and eos) of each row."""
        return shifted_cross_entropy(out.logits, out.labels)

    def ie_query(self, features: torch.Tensor) -> torch.Tensor:
        return self.clip.ie_query(features)

    def text_hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The plain frozen LM (adapters bypassed) over text: the Kb keys."""
        self.switch.on = False
        try:
            return plain_text_hidden(self.lm, ids, mask, self.bos_id)
        finally:
            self.switch.on = True

    def generate(self, visual: torch.Tensor | None, prompts: list[list[int]] | None, *, max_new_tokens: int,
                 beam_size: int, has_image: torch.Tensor | None = None, sampling: dict | None = None
                 ) -> list[list[int]]:
        """Continue `[block] + prompt` per sample (left-padded, KV-cached): greedy, or top-p sampling with
        sampling = {"temperature", "top_p", "generator"} (and "on_token", a per-token callback); routing weights
        fixed per sample by the modality token. Returns the new token ids of each sample, without eos."""
        if beam_size != 1:
            raise EimError(f"LaVIN decodes one beam (greedy or sampling), not beam_size={beam_size}",
                           where="eval.beam_size", hint="set eval.beam_size=1")
        rows = visual.shape[0] if visual is not None else len(prompts or [])
        prompts = prompts or [[] for _ in range(rows)]
        if len(prompts) != rows:
            raise EimError(f"{len(prompts)} prompts for {rows} images", where="generate")
        if rows == 0:
            return []
        sampling = sampling or {}
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                flags = self._has_image(visual, has_image, rows)
                device = flags.device
                embedded = [self.embed_tokens(torch.tensor(p, dtype=torch.long, device=device)) for p in prompts]
                embeds, mask = prompt_rows(self._blocks(visual, flags), embedded)
                with modality_routing(self.lm, self.lm_adapters, self.modality_embedding, flags):
                    return generate_from_embeds(
                        self.lm, embeds, mask, eos_token_id=self.tokenizer.eos_token_id,
                        max_new_tokens=max_new_tokens, position_offset=1,
                        on_keep=lambda keep: reindex_routing(self.lm_adapters, keep),
                        temperature=sampling.get("temperature", 0.0), top_p=sampling.get("top_p", 1.0),
                        generator=sampling.get("generator"), on_token=sampling.get("on_token"))
        finally:
            self.train(was_training)


def _check_divisible(options: LavinConfig, lm_dim: int, clip_width: int) -> None:
    groups = options.adapter_groups
    for width, where in ((lm_dim, "the LM's width"), (clip_width, "CLIP's width"), (options.adapter_dim,
                                                                                     "model.lavin.adapter_dim")):
        if width % groups:
            raise EimError(f"{where} ({width}) does not split into model.lavin.adapter_groups={groups} groups",
                           where="model.lavin.adapter_groups", hint="choose a common divisor, e.g. 2")


def _check_options(config) -> None:
    options, problems = config.model.lavin, []
    for key in ("adapter_dim", "adapter_groups", "hidden_proj"):
        if getattr(options, key) < 1:
            problems.append(f"model.lavin.{key} must be >= 1")
    if options.temperature <= 0:
        problems.append("model.lavin.temperature must be > 0")
    if not 0 <= options.adapter_dropout < 1:
        problems.append("model.lavin.adapter_dropout must be in [0, 1)")
    if options.clip_router not in CLIP_ROUTES:
        problems.append(f"model.lavin.clip_router must be one of {', '.join(CLIP_ROUTES)}")
    if problems:
        raise EimError("invalid LaVIN options: " + "; ".join(problems), where="model.lavin",
                       hint="see eimctl/models/lavin.py LavinConfig")


def build(config, *, groups: set[str], losses: set[str], active: set[str]) -> Lavin:
    """LaVIN for `config`; every adapter exists whatever the schedule (identity until trained)."""
    _check_options(config)
    if config.model.clip.tokens not in VISUAL_TOKENS:
        raise EimError(f"LaVIN takes its visual tokens from CLIP's blocks, not model.clip.tokens="
                       f"{config.model.clip.tokens}", where="model.clip.tokens",
                       hint="set model.clip.tokens=cls_every_k (LaVIN) or pooled_grid (EIM's 50 tokens)")
    if "ie" in losses and config.eim.ie_query != "frozen-projection":
        raise EimError("LaVIN's loss_IE tunes its CLIP adapters and queries through CLIP's own projection",
                       where="eim.ie_query", hint="set eim.ie_query=frozen-projection")
    model = Lavin(config.model, config.model.lavin)
    depth, every = len(model.clip.model.visual.transformer.resblocks), config.model.clip.cls_every
    if "ie" in losses and config.model.clip.tokens == "cls_every_k" and depth % every:
        raise EimError(f"loss_IE queries the final block's [CLS], but model.clip.cls_every={every} does not "
                       f"divide CLIP's {depth} blocks", where="model.clip.cls_every",
                       hint=f"choose a divisor of {depth}")
    return model
