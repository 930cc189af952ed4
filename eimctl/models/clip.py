"""CLIP image encoder through open_clip, with the two EIM feature switches.

- `remove_projection`: drop `visual.proj`, so features are the encoder's width-d
  outputs after `ln_post`; the original projection is kept as a frozen buffer
  (used only inside loss_IE, never on the inference path).
- `tokens`: `pooled` ([CLS] only, shape [B, 1, d]) or `full` ([CLS] + patch tokens); for LaVIN also
  `cls_every_k` (the raw [CLS] after every k-th residual block, before ln_post and any projection:
  [B, depth // k, width]; LaVIN's 6 tokens from 24 blocks at k = 4) and `pooled_grid` (the pooled [CLS]
  followed by the patch grid adaptive-average-pooled to n x n: [B, 1 + n*n, d], `grid_tokens` = 1 + n*n).

Families with adapters inside the ViT (LaVIN) attach one module per block with `attach_block_adapters`:
it is applied to ln_1's output (`x + Attn(adapter(ln_1(x)))`) and registered as `adapters`, so
`parameters()` includes it and the feature cache keys on its values.

loss_IE's CLIP tuning module is either the prompt network of eimctl/models/clip_tuning.py
(eim.clip_tuning=network, the identity at initialisation) or shallow prompt tokens (tokens).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from eimctl.models.clip_tuning import PromptNetworkSpec, prompt_network_for, run_blocks, visual_with_offsets
from eimctl.runtime.errors import EimError
from eimctl.runtime.hub import hub_online, offline_reason, quiet_loading, short


@dataclass
class ClipConfig:
    name: str = "ViT-B-32"           # open_clip model name, `hf-hub:org/repo` or `local-dir:/path`
    pretrained: str = "openai"       # open_clip pretrained tag or a local checkpoint file ("" = random)
    remove_projection: bool = False  # drop visual.proj: features are the width-d [CLS] / tokens
    tokens: str = "pooled"           # pooled ([CLS]) | full ([CLS] + patches) | cls_every_k | pooled_grid
    cls_every: int = 4               # tokens=cls_every_k: the raw [CLS] after every k-th block
    grid_tokens: int = 50            # tokens=pooled_grid: [CLS] + an n x n pooled patch grid (1 + n*n tokens)


# Short names for the OpenAI CLIP checkpoints the paper's families use.
ALIASES = {"clip-vit-b32": ("ViT-B-32", "openai"), "clip-vit-b16": ("ViT-B-16", "openai"),
           "clip-vit-l14": ("ViT-L-14", "openai"), "clip-vit-l14-336": ("ViT-L-14-336", "openai")}


def encoder_overrides(encoder: str | None) -> list[str]:
    """Config overrides for `--encoder NAME` (an alias or an open_clip model name)."""
    if not encoder:
        return []
    if encoder.lower() in ALIASES:
        name, tag = ALIASES[encoder.lower()]
        return [f"model.clip.name={name}", f"model.clip.pretrained={tag}"]
    return [f"model.clip.name={encoder}"]


def _needs_hub(cfg: ClipConfig) -> bool:
    """Whether open_clip may fetch from the hub: an `hf-hub:` name, or a pretrained tag (not a file)."""
    if cfg.name.startswith(("hf-hub:", "local-dir:")):
        return cfg.name.startswith("hf-hub:")
    return bool(cfg.pretrained) and not Path(cfg.pretrained).is_file()


def _create_open_clip(cfg: ClipConfig):
    import open_clip

    pretrained = cfg.pretrained or None
    if cfg.name.startswith(("hf-hub:", "local-dir:")):
        pretrained = None  # open_clip reads weights from the schema source itself
    online = hub_online() if _needs_hub(cfg) else True
    try:
        with quiet_loading():
            model, _, preprocess = open_clip.create_model_and_transforms(cfg.name, pretrained=pretrained)
            tokenizer = open_clip.get_tokenizer(cfg.name)
    except RuntimeError as error:
        if "not found" in str(error).lower() and "config" in str(error).lower():
            raise EimError(f"unknown open_clip model '{cfg.name}'", where="model.clip.name",
                           hint="use a name from open_clip.list_models(), 'hf-hub:org/repo' or 'local-dir:/path'") from None
        raise _weights_error(cfg, error, online) from None
    except (OSError, ValueError) as error:
        raise _weights_error(cfg, error, online) from None
    except Exception as error:  # huggingface_hub raises its own connection errors
        if "hub" in type(error).__module__ or "connect" in str(error).lower():
            raise _weights_error(cfg, error, online) from None
        raise
    return model, preprocess, tokenizer


def _weights_error(cfg: ClipConfig, error: Exception, online: bool) -> EimError:
    source = cfg.name if not cfg.pretrained else f"{cfg.name} / {cfg.pretrained}"
    why = f"{offline_reason()} and they are not in the local cache" if not online else short(str(error))
    return EimError(f"cannot obtain CLIP weights for {source}: {why}", where="model.clip",
                    hint="supply them one of three ways: download them once with network access (into the "
                         "Hugging Face cache, ~/.cache/huggingface), or set model.clip.pretrained to a local "
                         "checkpoint file, or set model.clip.name to 'local-dir:/path' (open_clip_config.json "
                         "+ weights)")


class ClipEncoder(nn.Module):
    """open_clip model with configurable visual features. Frozen unless a stage says otherwise."""

    def __init__(self, cfg: ClipConfig, prompt_tokens: int = 0, ie_head: bool = False, prompts_active: bool = False,
                 prompt_network: PromptNetworkSpec | None = None):
        super().__init__()
        model, self.preprocess, self.tokenizer = _create_open_clip(cfg)
        self.model = model
        self.tokens = cfg.tokens
        visual = model.visual
        if not hasattr(visual, "proj") or not hasattr(visual, "output_tokens"):
            raise EimError(f"'{cfg.name}' has no ViT visual tower", where="model.clip.name",
                           hint="EIM's feature switches need a ViT CLIP (e.g. ViT-B-32, ViT-L-14)")
        projection = visual.proj.detach().clone() if visual.proj is not None else None
        self.register_buffer("original_projection", projection, persistent=False)
        if cfg.remove_projection:
            visual.proj = None
        visual.output_tokens = True
        self.width = visual.transformer.width
        self.feature_dim = self.width if visual.proj is None or cfg.tokens == "cls_every_k" else visual.proj.shape[1]
        self.cls_every, self.grid_tokens = cfg.cls_every, cfg.grid_tokens
        self.num_tokens = _token_count(cfg, visual)
        self.embed_dim = projection.shape[1] if projection is not None else self.width
        self.adapters = None  # attach_block_adapters (LaVIN): one module per block on ln_1's output
        self.requires_grad_(False)
        # Visual prompt tokens (VPT-shallow): learnable tokens inserted after [CLS], tuned by loss_IE
        # when CLIP has no adapters. Inserted only when `prompts_active` (a stage trains or inherited them).
        self.prompts = nn.Parameter(torch.randn(prompt_tokens, self.width) * 0.02) if prompt_tokens else None
        # Deep additive prompts from a network (eim.clip_tuning=network): offsets that are exactly 0 at init.
        self.prompts_network = prompt_network_for(visual, prompt_network) if prompt_network else None
        self.prompts_active = prompts_active and (self.prompts is not None or self.prompts_network is not None)
        # Optional trainable head from the [CLS] to the text space for loss_IE (eim.ie_query=linear-head),
        # initialised as CLIP's own projection.
        self.ie_head = None
        if ie_head:
            self.ie_head = nn.Linear(self.width, self.embed_dim, bias=False)
            with torch.no_grad():
                self.ie_head.weight.copy_(projection.T if projection is not None else torch.eye(self.width))

    def _visual(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        visual = self.model.visual
        if not self.prompts_active:
            return visual(pixels)
        if self.prompts_network is not None:
            return visual_with_offsets(visual, pixels, self.prompts_network.offsets())
        if getattr(visual, "pool_type", "tok") != "tok" or getattr(visual, "attn_pool", None) is not None:
            raise EimError("visual prompt tokens need a ViT that pools the [CLS] token", where="model.clip.name",
                           hint="use a standard CLIP ViT, or set eim.prompt_tokens=0")
        x = visual._embeds(pixels)
        prompts = self.prompts.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        x = visual.transformer(torch.cat([x[:, :1], prompts, x[:, 1:]], dim=1))
        pooled, tokens = visual._pool(x)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return pooled, tokens[:, self.prompts.shape[0]:]

    def attach_block_adapters(self, adapters: nn.ModuleList) -> None:
        """One adapter per visual block, applied to ln_1's output: `x + Attn(adapter(ln_1(x)))`. Each adapter
        sees batch-first tokens [B, N, width] (position 0 = each sample's [CLS]) whatever the tower's layout."""
        transformer = self.model.visual.transformer
        blocks = list(transformer.resblocks)
        if len(adapters) != len(blocks) or not all(hasattr(block, "ln_1") for block in blocks):
            raise EimError(f"cannot place {len(adapters)} adapters in a ViT of {len(blocks)} blocks",
                           where="model.clip.name", hint="use a standard open_clip ViT (blocks with ln_1)")
        self.adapters = adapters
        batch_first = getattr(transformer, "batch_first", True)
        for block, adapter in zip(blocks, adapters):
            block.ln_1.register_forward_hook(partial(_adapted, adapter, batch_first))

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, T, feature_dim]; T = 1 (pooled), 1 + patches (full), depth // k (cls_every_k)
        or grid_tokens (pooled_grid)."""
        if self.tokens == "cls_every_k":
            return self._cls_every_k(pixels)
        pooled, patches = self._visual(pixels)
        if self.tokens == "pooled":
            return pooled.unsqueeze(1)
        proj = self.model.visual.proj
        if proj is not None:
            patches = patches @ proj
        if self.tokens == "pooled_grid":
            patches = _pooled_grid(patches, self.model.visual.grid_size, self.grid_tokens)
        return torch.cat([pooled.unsqueeze(1), patches], dim=1)

    def _cls_every_k(self, pixels: torch.Tensor) -> torch.Tensor:
        """The raw [CLS] (no ln_post, no projection) after blocks k, 2k, ...: [B, depth // k, width]."""
        visual = self.model.visual
        x = visual._embeds(pixels)
        offsets = []
        if self.prompts_active and self.prompts_network is not None:
            offsets = self.prompts_network.offsets()
        elif self.prompts_active:
            prompts = self.prompts.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], prompts, x[:, 1:]], dim=1)
        taken = []

        def take(number: int, cls: torch.Tensor) -> None:
            if (number + 1) % self.cls_every == 0:
                taken.append(cls)
        run_blocks(visual, x, offsets, take)
        return torch.stack(taken, dim=1)

    def ie_query(self, features: torch.Tensor) -> torch.Tensor:
        """loss_IE's query: the [CLS] feature mapped into CLIP's joint (text) space. With cls_every_k the
        last feature is the final block's raw [CLS] (when k divides the depth): ln_post, then the projection."""
        if self.tokens == "cls_every_k":
            cls = self.model.visual.ln_post(self._final_cls(features))
            if self.ie_head is not None:
                return self.ie_head(cls)
            if self.original_projection is not None:
                return cls @ self.original_projection.to(cls.dtype)
            return cls
        cls = features[:, 0]
        if self.ie_head is not None:
            return self.ie_head(cls)
        if self.model.visual.proj is None and self.original_projection is not None:
            return cls @ self.original_projection.to(cls.dtype)  # frozen, inside the loss only
        return cls

    def _final_cls(self, features: torch.Tensor) -> torch.Tensor:
        depth = len(self.model.visual.transformer.resblocks)
        if depth % self.cls_every:
            raise EimError(f"loss_IE needs the final block's [CLS], but model.clip.cls_every={self.cls_every} does "
                           f"not divide the ViT's {depth} blocks", where="model.clip.cls_every",
                           hint=f"choose a divisor of {depth}")
        return features[:, -1]

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """CLIP.text [EOS] features in the joint space: [B, embed_dim]."""
        device = next(self.model.parameters()).device
        return self.encode_text_ids(self.tokenizer(texts).to(device))

    def encode_text_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """CLIP.text [EOS] features of already tokenised text (the tokenizer is pure Python: callers
        tokenise ahead of the encoder)."""
        return self.model.encode_text(ids)


def clip_tuning_options(config, *, groups: set[str], losses: set[str], active: set[str]) -> dict:
    """ClipEncoder's keyword arguments for loss_IE's CLIP tuning module, as a family's schedule asks for it.

    `clip_prompts` in `groups`: the prompt network (eim.clip_tuning=network) or eim.prompt_tokens shallow
    prompt tokens; `ie_head`: a linear head when eim.ie_query=linear-head and the schedule uses loss_IE.
    The module is switched on only when `clip_prompts` is active (trained now or inherited)."""
    eim = config.eim
    network = "clip_prompts" in groups and eim.clip_tuning == "network"
    if "clip_prompts" in groups and not network and eim.prompt_tokens == 0:
        raise EimError("the schedule trains clip_prompts but eim.prompt_tokens=0", where="config",
                       hint="set eim.prompt_tokens to e.g. 8, or eim.clip_tuning=network")
    if "ie_head" in groups and eim.ie_query != "linear-head":
        raise EimError("the schedule trains ie_head but eim.ie_query is not linear-head", where="config",
                       hint="set eim.ie_query=linear-head")
    return {"prompt_tokens": eim.prompt_tokens if "clip_prompts" in groups and not network else 0,
            "ie_head": eim.ie_query == "linear-head" and "ie" in losses,
            "prompts_active": "clip_prompts" in active,
            "prompt_network": PromptNetworkSpec(eim.prompt_hidden, eim.prompt_depth) if network else None}


def _token_count(cfg: ClipConfig, visual) -> int:
    """Tokens per image of `cfg.tokens`, checked against the tower."""
    grid = visual.grid_size
    if cfg.tokens == "cls_every_k":
        depth = len(visual.transformer.resblocks)
        if not 1 <= cfg.cls_every <= depth:
            raise EimError(f"model.clip.cls_every={cfg.cls_every} does not fit a ViT of {depth} blocks",
                           where="model.clip.cls_every", hint=f"choose 1..{depth} (a divisor, for loss_IE)")
        if getattr(visual, "pool_type", "tok") != "tok" or getattr(visual, "attn_pool", None) is not None:
            raise EimError("tokens=cls_every_k needs a ViT that pools the [CLS] token", where="model.clip.tokens",
                           hint="use a standard CLIP ViT")
        return depth // cfg.cls_every
    if cfg.tokens == "pooled_grid":
        return cfg.grid_tokens
    return 1 if cfg.tokens == "pooled" else 1 + grid[0] * grid[1]


def _pooled_grid(patches: torch.Tensor, grid: tuple[int, int], grid_tokens: int) -> torch.Tensor:
    """[B, g0*g1, d] patch tokens -> [B, n*n, d], adaptive-average-pooled to n x n (grid_tokens = 1 + n*n)."""
    side = math.isqrt(grid_tokens - 1)
    image = patches.transpose(1, 2).unflatten(2, tuple(grid))          # [B, d, g0, g1]
    return F.adaptive_avg_pool2d(image, side).flatten(2).transpose(1, 2)


def _adapted(adapter, batch_first: bool, module, args, output):
    """Forward hook on a block's ln_1: the adapter applied to its (batch-first) output."""
    if batch_first:
        return adapter(output)
    return adapter(output.transpose(0, 1)).transpose(0, 1)
