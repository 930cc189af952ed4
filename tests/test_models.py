"""Projector shapes and sizes, CLIP feature switches, and loss_base masking."""
import torch
import torch.nn.functional as F

from eimctl.config import load_config
from eimctl.models.projectors import ProjectorConfig
from eimctl.data.tokens import pad_batch, tokenize_pairs
from eimctl.models.factory import build_model
from eimctl.models.projectors import FFNProjector, MLPProjector, TransformerProjector, build_projector


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_paper_projector_sizes():
    # EIM's per-token FFN for ViT-B/32 (768, projection removed) + GPT-2 (768): 4.72M parameters.
    assert count(FFNProjector(768, 768, 3072)) == 768 * 3072 + 3072 + 3072 * 768 + 768 == 4_722_432
    # ClipCap's MLP 512 -> 3840 -> 10 x 768: 31.47M parameters.
    assert count(MLPProjector(512, 768, 10)) == 512 * 3840 + 3840 + 3840 * 7680 + 7680 == 31_468_800


def test_projector_output_shapes():
    pooled, full = torch.randn(3, 1, 16), torch.randn(3, 5, 16)
    assert MLPProjector(16, 8, 10)(pooled).shape == (3, 10, 8)
    assert FFNProjector(16, 8)(full).shape == (3, 5, 8)
    assert TransformerProjector(16, 8, 4, clip_tokens=5, layers=1, heads=2)(full).shape == (3, 4, 8)
    assert TransformerProjector(16, 8, 4, clip_tokens=1, layers=1, heads=2)(pooled).shape == (3, 4, 8)


def test_mlp_refuses_full_tokens():
    import pytest
    from eimctl.runtime.errors import EimError
    with pytest.raises(EimError, match="pooled"):
        build_projector(ProjectorConfig(type="mlp"), 16, 5, 8)


def _captioner(tiny_overrides, *extra):
    return build_model(load_config(overrides=tiny_overrides + list(extra)), groups=set(), losses=set())[0]


def test_clip_feature_switches(tiny_overrides):
    pixels = torch.randn(2, 3, 32, 32)
    kept = _captioner(tiny_overrides).clip
    assert kept.encode_images(pixels).shape == (2, 1, 24)           # pooled, projected to embed_dim
    removed = _captioner(tiny_overrides, "model.clip.remove_projection=true", "model.clip.tokens=full",
                         "model.projector.type=ffn").clip
    assert removed.encode_images(pixels).shape == (2, 1 + 16, 32)   # [CLS] + 4x4 patches, width 32
    assert removed.original_projection.shape == (32, 24)            # kept for loss_IE, frozen
    assert not any(p.requires_grad for p in removed.parameters())


def test_loss_base_counts_caption_tokens_only_and_keeps_token_zero(tiny_overrides):
    torch.manual_seed(0)
    model = _captioner(tiny_overrides)
    model.eval()
    tok = model.tokenizer
    assert tok.eos_token_id == 0  # the tiny LM's eos is token 0, like GPT-2's "!" — it must count
    tokenized, _ = tokenize_pairs(tok, [("", "a red square"), ("", "there is a big blue bar")], 40)
    sequences = [t.ids for t in tokenized]
    batch = pad_batch(tokenized, tok.pad_token_id)
    mask = batch["loss_mask"]
    features = torch.randn(2, 1, 24)
    with torch.no_grad():
        loss = model.response_loss(model.run_lm(model.project(features), batch), batch)
        # By hand: per sample, run prefix + its own tokens (no padding) and average CE over all of them.
        token_losses = []
        for row, seq in enumerate(sequences):
            prefix = model.project(features[row:row + 1])
            emb = model.lm.get_input_embeddings()(torch.tensor([seq]))
            logits = model.lm(inputs_embeds=torch.cat([prefix, emb], 1)).logits[0]
            preds = logits[prefix.shape[1] - 1:-1]
            token_losses.append(F.cross_entropy(preds, torch.tensor(seq), reduction="none"))
        expected = torch.cat(token_losses).mean()
        dropped_zero = torch.cat([l[torch.tensor(s) != 0] for l, s in zip(token_losses, sequences)]).mean()
    assert mask.sum() == sum(len(s) for s in sequences) == 4 + 7
    assert torch.allclose(loss, expected, atol=1e-5)
    assert not torch.allclose(loss, dropped_zero, atol=1e-4)  # what ignore_index=0 would have computed


def test_overlong_captions_are_cut_and_counted(tiny_overrides):
    tok = _captioner(tiny_overrides).tokenizer
    tokenized, cut = tokenize_pairs(tok, [("", "a red square"), ("", "there is a big blue bar")], 5)
    ids = [t.ids for t in tokenized]
    assert cut == 1 and len(ids[1]) == 5 and ids[0][-1] == tok.eos_token_id
