"""What the rest of eimctl needs from a model family, and nothing more.

The objectives, the key-queue builder, the training loop and the tasks talk to
a model only through `VisionLanguageModel`; the factory finds a family only
through `FamilyModule`. A family (ClipCap: a prefix before the text; LLaMA-
Adapter: visual tokens added to per-layer adaption prompts; LaVIN: visual tokens
inserted after BOS behind a modality token) decides how the ST output enters its
LM inside `run_lm`; the objectives never see the difference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor, nn


@dataclass
class LMOutput:
    """One LM pass over a (possibly multimodal) sequence.

    hidden  [B, S, D] final block output after the final norm (loss_LM's query reads it)
    mask    [B, S]    1 at every real position of that sequence (visual positions included)
    logits  [B, S, V] or None when not asked for
    offset  positions before the first text token (0 when the family injects no tokens)
    labels  [B, S] next-token targets aligned with `logits` (IGNORE_INDEX where unscored), for families
            whose injected tokens differ in length between samples (LaVIN); None otherwise
    """
    hidden: Tensor
    mask: Tensor
    logits: Tensor | None = None
    offset: int = 0
    labels: Tensor | None = None


class VisionLanguageModel(Protocol):
    """CLIP + ST + LM as the objectives, queue builder, trainer and tasks use it.

    A batch holds `input_ids`, `attention_mask` (1 = real token) and `loss_mask`
    (1 = response token that loss_base scores), all [B, L] and right-padded, and `has_image`
    [B] (bool; False for a text-only sample, whose image features are zeros).
    """
    clip: nn.Module            # eimctl.models.clip.ClipEncoder: features, text keys, ie query
    tokenizer: object          # the LM's tokenizer (has eos and pad ids)
    lm_dim: int                # width of the LM's embeddings and hidden states

    def encode_images(self, pixels: Tensor) -> Tensor: ...            # [B, T, d] CLIP features
    def project(self, features: Tensor) -> Tensor: ...                # [B, Q, D] ST output tokens
    def run_lm(self, visual: Tensor | None, batch: dict, *, logits: bool = True) -> LMOutput: ...
    def response_loss(self, out: LMOutput, batch: dict) -> Tensor: ...  # loss_base
    def ie_query(self, features: Tensor) -> Tensor: ...               # [B, E] in CLIP's text space
    def embed_tokens(self, ids: Tensor) -> Tensor: ...                # LM embedding-layer output
    def text_hidden(self, ids: Tensor, mask: Tensor) -> Tensor: ...   # frozen LM over text only
    def generate(self, visual: Tensor, prompts: list[list[int]] | None, *, max_new_tokens: int,
                 beam_size: int, has_image: Tensor | None = None, sampling: dict | None = None
                 ) -> list[list[int]]: ...
    def compile_for_training(self) -> None: ...


class FamilyModule(Protocol):
    """A module in eimctl/models/ registered in registry.FAMILIES."""
    SECTION: type | None               # dataclass of the family's own options (config `model.<name>`)
    TRAINABLE_GROUPS: dict[str, str]   # group name -> parameter-name prefix (what `trainable:` may list)
    CLIP_TUNING_GROUPS: tuple[str, ...]  # groups through which loss_IE tunes the CLIP side
    DEFAULT_STAGES: dict               # the family's schedule when a config gives none

    def build(self, config, *, groups: set[str], losses: set[str], active: set[str]) -> VisionLanguageModel:
        """The model for `config` (the whole Config); `groups`/`losses`: every trainable group and loss the
        schedule uses (so optional modules exist); `active`: groups trained now or inherited."""
