"""The lavin family: mixture-of-modality adapters (MMA) in every layer of a tiny GQA LLaMA and every block of a
tiny CLIP ViT, a modality token that routes them, [CLS]-every-k visual tokens. Exact checks at initialisation,
parameter counts at LaVIN-7B/13B shapes (meta device), the two-piece modality pass against the joint masked
pass, golden sequence layouts, KV-cached generation against per-sample decoding, and the CLI schedule."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import tiny
from eimctl.cli import app
from eimctl.config import load_config
from eimctl.data.features import _tuning_key
from eimctl.data.tokens import pad_batch, tokenize_pairs
from eimctl.models.clip import ClipEncoder
from eimctl.models.factory import build_model, set_trainable
from eimctl.models.lavin import LavinConfig
from eimctl.models.lavin_layout import training_rows
from eimctl.models.lavin_parts import lavin_modules, modality_routing
from eimctl.models.mma import MixtureOfModalityAdapter, adapter_parameters
from eimctl.runtime.errors import EimError

runner = CliRunner()
GROUPS = ("st", "lm_adapters", "clip_adapters", "modality")
WORDS = ["Image", ":", "N", "/", "A"]   # so that "Image: " and "Image: N/A" have real ids in the tiny vocabulary


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lavin")
    return {"clip": tiny.make_tiny_clip(root / "clip", layers=4),
            "lm": tiny.make_tiny_llama(root / "llama", words=WORDS),
            "gpt2": tiny.make_tiny_lm(root / "gpt2"), "data": tiny.make_tiny_data(root / "data")}


@pytest.fixture(scope="module")
def overrides(assets) -> list[str]:
    return [f"model.clip.name={assets['clip']}", "model.clip.pretrained=", f"model.lm.name={assets['lm']}",
            "model.family=lavin", "model.clip.tokens=cls_every_k", "model.clip.cls_every=2",
            "model.lavin.adapter_dropout=0", "model.lavin.bos=false"]


def make(overrides: list[str], *extra: str, losses=("base",)):
    model, _ = build_model(load_config(overrides=[*overrides, *extra]), groups=set(GROUPS), losses=set(losses))
    return model.eval()


def text_batch(model, has_image=None, pairs=None) -> dict:
    pairs = pairs or [("there is", "a red square"), ("", "the big blue bar of the picture"), ("a", "small green bar")]
    tokens, _ = tokenize_pairs(model.tokenizer, pairs, 40)
    batch = pad_batch(tokens, model.tokenizer.pad_token_id)
    if has_image is not None:
        batch["has_image"] = torch.tensor(has_image)
    return batch


def pixels(rows: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def perturb(model, seed: int = 1) -> None:
    """Non-zero experts everywhere, so that the adapters and their routing matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in [*model.lm_adapters, *model.clip.adapters]:
            for expert in (adapter.up_b, adapter.up_d):
                expert.weight.copy_(0.5 * torch.randn(expert.weight.shape, generator=generator))
            adapter.router.weight.mul_(20.0)   # routing weights far from uniform


def sequence(model, visual, batch, has_image):
    """The embedded sequence run_lm builds (rows, mask, labels), for the references below."""
    blocks = model._blocks(visual, has_image)
    return training_rows(blocks, model.embed_tokens(batch["input_ids"]), batch)


def test_zero_init_is_the_plain_lm_and_plain_clip(overrides, assets):
    model = make(overrides)
    plain_lm = AutoModelForCausalLM.from_pretrained(assets["lm"]).eval()
    plain_clip = ClipEncoder(load_config(overrides=overrides).model.clip).eval()
    flags = torch.tensor([True, False, True])
    batch = text_batch(model, has_image=flags.tolist())
    with torch.no_grad():
        features = model.encode_images(pixels())
        assert torch.equal(features, plain_clip.encode_images(pixels()))
        visual = model.project(features)
        embeds, mask, _, _ = sequence(model, visual, batch, flags)
        positions = torch.arange(1, embeds.shape[1] + 1).expand(3, -1)
        plain = plain_lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
        assert torch.equal(model.run_lm(visual, batch).logits, plain)
        assert torch.equal(model.text_hidden(batch["input_ids"], batch["attention_mask"]),
                           plain_lm.model(input_ids=batch["input_ids"],
                                          attention_mask=batch["attention_mask"]).last_hidden_state)
        model.lm_adapters[2].up_b.weight[0, 0] = 1.0                     # one B weight of one layer
        assert (model.run_lm(visual, batch).logits - plain).abs().max() > 1e-4
        model.clip.adapters[1].up_b.weight[0, 0] = 1.0
        assert (model.encode_images(pixels()) - features).abs().max() > 1e-4


def test_gradients_at_initialisation(overrides):
    model = make(overrides).train()
    set_trainable(model, "lavin", GROUPS)
    batch = text_batch(model)
    loss = model.response_loss(model.run_lm(model.project(model.encode_images(pixels())), batch), batch)
    loss.backward()
    for adapter in [*model.lm_adapters, *model.clip.adapters]:
        assert torch.count_nonzero(adapter.up_b.weight.grad) > 0 and torch.count_nonzero(adapter.up_d.weight.grad) > 0
        for param in (adapter.down.weight, adapter.down.bias, adapter.router.weight, adapter.router.bias):
            assert param.grad is not None and torch.count_nonzero(param.grad) == 0
    assert torch.count_nonzero(model.modality_embedding.weight.grad) == 0   # behind the routers
    assert all(torch.count_nonzero(p.grad) > 0 for p in model.adapter_proj.parameters())


def test_parameter_counts_tiny_and_lavin_7b_13b_shapes(overrides):
    for dim in (64, 576, 4096):
        assert sum(p.numel() for p in MixtureOfModalityAdapter(dim).parameters()) == 20 * dim + 10 == \
            adapter_parameters(dim)
    model = make(overrides)
    set_trainable(model, "lavin", GROUPS)
    tiny_count = 4 * (20 * 64 + 10) + 4 * (20 * 32 + 10) + (32 * 128 + 128 + 128 * 64 + 64) + 2 * 64
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == tiny_count
    for lm_dim, layers, total in ((4096, 32, 3_781_296), (5120, 40, 5_390_080)):
        with torch.device("meta"):
            parts = lavin_modules(LavinConfig(), lm_dim=lm_dim, lm_layers=layers, clip_width=1024, clip_blocks=24,
                                  feature_dim=1024)
        assert sum(p.numel() for p in parts.parameters()) == total
    assert sum(p.numel() for p in parts["lm_adapters"][0].parameters()) == 20 * 5120 + 10


def routing(model, has_image) -> list[torch.Tensor]:
    with torch.no_grad(), modality_routing(model.lm, model.lm_adapters, model.modality_embedding, has_image):
        return [adapter.cached.clone() for adapter in model.lm_adapters]


def test_routing_depends_on_the_modality_alone_and_equals_the_joint_masked_pass(overrides):
    model = make(overrides)
    perturb(model)
    weights = routing(model, torch.tensor([False, False, True]))
    for layer in weights:
        assert torch.equal(layer[0], layer[1]) and (layer[0] - layer[2]).abs().max() > 1e-3
    # LaVIN's own form: the modality token at position 0 of one sequence, attended by nothing else and
    # attending only to itself; every MMA routes on position 0. Same logits as the two-piece pass.
    flags = torch.tensor([True, False, True])
    batch = text_batch(model, has_image=flags.tolist())
    with torch.no_grad():
        visual = model.project(model.encode_images(pixels()))
        embeds, mask, _, _ = sequence(model, visual, batch, flags)
        joint = torch.cat([model.modality_embedding(flags.long())[:, None], embeds], dim=1)
        size = joint.shape[1]
        allowed = torch.tril(torch.ones(size, size, dtype=torch.bool))
        allowed[1:, 0] = False
        keys = torch.cat([torch.ones(3, 1, dtype=torch.bool), mask.bool()], dim=1)
        allowed = allowed[None, None] & keys[:, None, None, :]
        additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        joint_logits = model.lm(inputs_embeds=joint, attention_mask=additive,
                                position_ids=torch.arange(size).expand(3, -1)).logits[:, 1:]
        logits = model.run_lm(visual, batch).logits
        real = mask.bool()
        assert (joint_logits[real] - logits[real]).abs().max() < 1e-5
        # changing the text changes nothing in the routing; the modality does
        other = text_batch(model, pairs=[("a", "yellow bar"), ("the", "square"), ("", "big red")])
        model.run_lm(visual, other)                     # leaves no routing state behind
        assert all(adapter.cached is None for adapter in model.lm_adapters)


def test_sequence_layout_and_labels_by_golden_ids(overrides):
    model = make(overrides)
    assert model.image_prefix_ids == [21, 19] and model.no_image_ids == [21, 19, 22, 18, 20]  # Image : / Image : N / A
    flags = torch.tensor([True, False, True])
    batch = text_batch(model, has_image=flags.tolist())
    ids = batch["input_ids"]
    assert ids[0].tolist()[:6] == [16, 9, 4, 12, 14, 3]   # "there is" + "a red square" + </s>
    with torch.no_grad():
        visual = model.project(model.encode_images(pixels()))
        out = model.run_lm(visual, batch)
        embeds, mask, labels, offset = sequence(model, visual, batch, flags)
    x = -100
    assert out.labels[0].tolist() == [x, x, x, x, x, x, 4, 12, 14, 3, x, x, x]        # block 2 + 2 visual, prompt 2
    assert out.labels[1].tolist() == [x, x, x, x, x, 15, 6, 7, 5, 10, 15, 11, 3]      # "Image: N/A", no prompt
    assert out.labels[2].tolist() == [x, x, x, x, x, 13, 8, 5, 3, x, x, x, x]
    assert out.mask.sum(dim=1).tolist() == [10, 13, 9] and torch.equal(out.mask, mask) and out.offset == 0
    embed = model.embed_tokens
    assert torch.equal(embeds[0, :2], embed(torch.tensor([21, 19]))) and torch.equal(embeds[0, 2:4], visual[0])
    assert torch.equal(embeds[0, 4:10], embed(ids[0, :6]))
    assert torch.equal(embeds[1, :5], embed(torch.tensor([21, 19, 22, 18, 20])))
    assert torch.equal(embeds[1, 5:13], embed(ids[1, :8]))
    # a batch of one modality has one offset; run_lm(None, ...) makes every sample text-only
    text_only = model.run_lm(None, batch)
    assert text_only.offset == 5 and text_only.labels[0].tolist()[:11] == [x] * 7 + [4, 12, 14, 3]
    assert model.run_lm(visual, text_batch(model)).offset == 4          # no has_image: all images


def test_cls_every_k_and_pooled_grid_tokens(overrides):
    model = make(overrides)
    image = pixels(2)
    with torch.no_grad():
        features = model.encode_images(image)
        visual = model.clip.model.visual
        x, by_hand = visual._embeds(image), []
        for number, block in enumerate(visual.transformer.resblocks):
            x = block(x)
            if number in (1, 3):
                by_hand.append(x[:, 0])
        assert features.shape == (2, 2, 32) and torch.equal(features, torch.stack(by_hand, dim=1))
        # loss_IE's query: the last block's [CLS] through ln_post and the projection = CLIP's image embedding
        assert torch.allclose(model.ie_query(features), model.clip.model.encode_image(image)[0], atol=1e-6)
    grid = make(overrides, "model.clip.tokens=pooled_grid", "model.clip.grid_tokens=5")
    with torch.no_grad():
        pooled = grid.encode_images(image)
        full_clip = ClipEncoder(load_config(overrides=[*overrides, "model.clip.tokens=full"]).model.clip)
        full = full_clip.eval().encode_images(image)
    patches = full[:, 1:].view(2, 4, 4, -1)                                     # the 4 x 4 grid
    assert pooled.shape == (2, 5, 24) and torch.equal(pooled[:, 0], full[:, 0])
    assert torch.allclose(pooled[:, 1], patches[:, :2, :2].mean(dim=(1, 2)), atol=1e-6)
    assert torch.allclose(pooled[:, 4], patches[:, 2:, 2:].mean(dim=(1, 2)), atol=1e-6)


def test_the_feature_cache_key_covers_the_clip_adapters(overrides):
    torch.manual_seed(0)
    model = make(overrides)
    before = _tuning_key(model.clip)
    torch.manual_seed(0)                  # the stages seed before building: same initial adapters, same key
    assert before.startswith("adapters-") and _tuning_key(make(overrides).clip) == before
    with torch.no_grad():
        model.clip.adapters[3].up_d.bias[0] = 1e-3
    assert _tuning_key(model.clip) != before


def test_generation_batched_left_padded_equals_each_alone(overrides):
    model = make(overrides)
    perturb(model)
    prompts = [model.tokenizer(text, add_special_tokens=False)["input_ids"]
               for text in ("there is a", "the", "a small picture of the")]
    flags = torch.tensor([True, False, True])
    with torch.no_grad():
        visual = model.project(model.encode_images(pixels()))

    def alone(eos: int) -> list[list[int]]:
        model.tokenizer = SimpleNamespace(eos_token_id=eos)
        return [model.generate(visual[i:i + 1], [prompts[i]], max_new_tokens=6, beam_size=1,
                               has_image=flags[i:i + 1])[0] for i in range(3)]

    tokenizer, free = model.tokenizer, None
    try:
        free = alone(-1)
        assert all(len(row) == 6 for row in free)
        assert model.generate(visual, prompts, max_new_tokens=6, beam_size=1, has_image=flags) == free
        # rows that stop early leave the batch, and their routing weights with them
        eos = free[0][2]
        singles = alone(eos)
        assert len({len(row) for row in singles}) > 1
        assert model.generate(visual, prompts, max_new_tokens=6, beam_size=1, has_image=flags) == singles
    finally:
        model.tokenizer = tokenizer
    with pytest.raises(EimError, match="not beam_size=3"):
        model.generate(visual, prompts, max_new_tokens=4, beam_size=3)
    sampled = model.generate(visual, None, max_new_tokens=4, beam_size=1,
                             sampling={"temperature": 1.0, "top_p": 0.9, "generator": torch.Generator().manual_seed(0)})
    assert len(sampled) == 3


@pytest.mark.parametrize("extra, where", [
    (("model.clip.tokens=full",), "model.clip.tokens"),
    (("model.lavin.clip_router=sequence",), "model.lavin"),
    (("model.lavin.adapter_groups=3",), "model.lavin.adapter_groups"),
    (("model.clip.cls_every=3",), "model.clip.cls_every"),     # loss_IE needs k to divide the 4 blocks
])
def test_bad_options_are_refused_clearly(overrides, extra, where):
    with pytest.raises(EimError) as error:
        make(overrides, *extra, losses=("base", "ie"))
    assert error.value.where == where


def test_a_non_llama_lm_and_a_bad_grid_are_refused(overrides, assets):
    with pytest.raises(EimError, match="LLaMA-like") as error:
        make(overrides, f"model.lm.name={assets['gpt2']}")
    assert error.value.where == "model.lm.name"
    with pytest.raises(EimError, match="model.clip.grid_tokens: must be 1 \\+ n\\*n"):
        load_config(overrides=[*overrides, "model.clip.grid_tokens=49"])


def test_the_first_sample_router_routes_every_sample_by_sample_zero():
    adapter = MixtureOfModalityAdapter(8, hidden=4, route="first_sample", dropout=0)
    with torch.no_grad():
        adapter.up_b.weight.normal_()
        adapter.up_d.weight.normal_()
    x = torch.randn(3, 5, 8)
    changed = x.clone()
    changed[1:] = torch.randn(2, 5, 8)
    # sample 0's output depends on sample 0 alone; the other samples follow sample 0's routing
    assert torch.equal(adapter(x)[0], adapter(changed)[0])
    assert adapter.routing_weights(x).shape == (5, 2)


def metrics(run: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (run / f"stages/{stage}/metrics.jsonl").read_text().splitlines()]


def test_the_eim_schedule_runs_through_the_cli(overrides, assets, tmp_path):
    common = [*overrides, "model.lavin.adapter_dropout=0.1", f"data.path={assets['data']}",
              f"eim.queues_dir={tmp_path / 'queues'}", "train.epochs=2", "train.batch_size=8", "train.warmup_steps=0",
              "train.lr=1e-2", "train.log_every=1", "train.checkpoint_every=100", "eval.max_new_tokens=4",
              "eval.fixed_caption_baseline=false", "eval.diagnostics=false"]
    run = tmp_path / "run"
    base = runner.invoke(app, ["train-stage", "base", "--run-dir", str(run), "-q", *common])
    assert base.exit_code == 0, base.output
    losses = [m["loss"] for m in metrics(run, "base")]
    assert sum(losses[-3:]) < sum(losses[:3])                              # it learns
    assert {name.split(".")[0] for name in load_file(run / "stages/base/final/trainable.safetensors")} == \
        {"adapter_proj", "lm_adapters", "clip", "modality_embedding"}
    assert runner.invoke(app, ["build-queues", "-q", *common]).exit_code == 0
    short = [*common, "train.max_steps=2"]
    for stage in ("st", "lm", "adapter"):
        result = runner.invoke(app, ["train-stage", stage, "--run-dir", str(run), "-q", *short])
        assert result.exit_code == 0, (stage, result.output)
    saved = {stage: set(load_file(run / f"stages/{stage}/final/trainable.safetensors")) for stage in ("st", "lm")}
    assert {name.split(".")[0] for name in saved["st"]} == {"adapter_proj"}
    assert {name.split(".")[0] for name in saved["lm"]} == {"adapter_proj", "lm_adapters", "modality_embedding"}
    trained = load_file(run / "stages/adapter/final/trainable.safetensors")
    assert any(name.startswith("clip.adapters.") for name in trained)
    assert {"loss_lm"} <= set(metrics(run, "lm")[-1])
    result = runner.invoke(app, ["evaluate", "coco", "--run-dir", str(run), "--stage", "adapter", "-q"])
    assert result.exit_code == 0, result.output


def test_bos_comes_before_the_image_block(overrides):
    model = make(overrides, "model.lavin.bos=true")
    bos = model.tokenizer.bos_token_id
    assert model.image_prefix_ids[0] == bos and model.no_image_ids[0] == bos
    assert model.image_prefix_ids[1:] == make(overrides).image_prefix_ids
