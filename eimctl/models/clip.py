"""CLIP image encoder through open_clip, with the two EIM feature switches.

- `remove_projection`: drop `visual.proj`, so features are the encoder's width-d
  outputs after `ln_post`; the original projection is kept as a frozen buffer
  (used only inside loss_IE, never on the inference path).
- `tokens`: `pooled` ([CLS] only, shape [B, 1, d]) or `full` ([CLS] + patch tokens).
"""
from __future__ import annotations

import torch
from torch import nn

from eimctl.config import ClipConfig
from eimctl.errors import EimError


def _create_open_clip(cfg: ClipConfig):
    import open_clip

    pretrained = cfg.pretrained or None
    if cfg.name.startswith(("hf-hub:", "local-dir:")):
        pretrained = None  # open_clip reads weights from the schema source itself
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(cfg.name, pretrained=pretrained)
    except RuntimeError as error:
        if "not found" in str(error).lower() and "config" in str(error).lower():
            raise EimError(f"unknown open_clip model '{cfg.name}'", where="model.clip.name",
                           hint="use a name from open_clip.list_models(), 'hf-hub:org/repo' or 'local-dir:/path'") from None
        raise _weights_error(cfg, error) from None
    except (OSError, ValueError) as error:
        raise _weights_error(cfg, error) from None
    except Exception as error:  # huggingface_hub raises its own connection errors
        if "hub" in type(error).__module__ or "connect" in str(error).lower():
            raise _weights_error(cfg, error) from None
        raise
    tokenizer = open_clip.get_tokenizer(cfg.name)
    return model, preprocess, tokenizer


def _weights_error(cfg: ClipConfig, error: Exception) -> EimError:
    source = cfg.name if not cfg.pretrained else f"{cfg.name} / {cfg.pretrained}"
    return EimError(f"cannot obtain CLIP weights for {source}: {str(error).splitlines()[0][:160]}",
                    where="model.clip",
                    hint="download them once with network access (cached under ~/.cache/huggingface), "
                         "or set model.clip.pretrained to a local checkpoint file, or use 'local-dir:/path'")


class ClipEncoder(nn.Module):
    """open_clip model with configurable visual features. Frozen unless a stage says otherwise."""

    def __init__(self, cfg: ClipConfig):
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
        self.feature_dim = self.width if visual.proj is None else visual.proj.shape[1]
        grid = visual.grid_size
        self.num_tokens = 1 if cfg.tokens == "pooled" else 1 + grid[0] * grid[1]
        self.requires_grad_(False)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, T, feature_dim]; T = 1 (pooled) or 1 + patches (full)."""
        pooled, patches = self.model.visual(pixels)
        if self.tokens == "pooled":
            return pooled.unsqueeze(1)
        proj = self.model.visual.proj
        if proj is not None:
            patches = patches @ proj
        return torch.cat([pooled.unsqueeze(1), patches], dim=1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """CLIP.text [EOS] features in the joint space: [B, embed_dim]."""
        device = next(self.model.parameters()).device
        ids = self.tokenizer(texts).to(device)
        return self.model.encode_text(ids)
