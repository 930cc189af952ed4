"""loss_IE's CLIP tuning module (eimctl/models/clip_tuning.py): the prompt network is exactly the identity
at initialisation, learns from its zero layer, has the documented size, runs through the CLI with its
drift logged, and trains at eim.prompt_lr when that is set."""
import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

import tiny
from eimctl.cli import app
from eimctl.config import load_config
from eimctl.data.features import _tuning_key
from eimctl.eim.clip_tuning_drift import bypassed, sample_rows
from eimctl.models.clip import ClipConfig, ClipEncoder
from eimctl.models.clip_tuning import (PromptNetwork, PromptNetworkSpec, parameter_count, prompt_network_for,
                                       visual_with_offsets)
from eimctl.models.factory import learning_rates_by_prefix
from eimctl.runtime.errors import EimError
from eimctl.train.loop import make_optimizer

runner = CliRunner()
FEATURES = {"pooled-proj": ClipConfig(pretrained="", tokens="pooled"),
            "full-noproj": ClipConfig(pretrained="", tokens="full", remove_projection=True)}


@pytest.fixture(scope="module")
def two_layer_clip(tmp_path_factory) -> str:
    """A tiny CLIP with two visual blocks, so `deep` (an offset before each) differs from `shallow`."""
    return tiny.make_tiny_clip(tmp_path_factory.mktemp("clip2") / "clip", layers=2)


def _encoder(name: str, features: str, depth: str = "deep", active: bool = True) -> ClipEncoder:
    cfg = ClipConfig(**{**FEATURES[features].__dict__, "name": name})
    torch.manual_seed(0)
    return ClipEncoder(cfg, prompts_active=active, prompt_network=PromptNetworkSpec(depth=depth))


def _pixels() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("depth", ["deep", "shallow"])
def test_the_network_is_exactly_the_identity_at_initialisation(two_layer_clip, depth, features):
    clip = _encoder(two_layer_clip, features, depth).eval()
    plain = ClipEncoder(ClipConfig(**{**FEATURES[features].__dict__, "name": two_layer_clip})).eval()
    assert len(clip.prompts_network.generators) == (2 if depth == "deep" else 1)
    with torch.no_grad():
        tuned, reference = clip.encode_images(_pixels()), plain.encode_images(_pixels())
        with bypassed(clip):
            assert torch.equal(clip.encode_images(_pixels()), reference)
    assert torch.equal(tuned, reference)


@pytest.mark.parametrize("depth, layer", [("deep", 0), ("deep", 1), ("shallow", 0)])
def test_changing_one_generator_weight_changes_the_features(two_layer_clip, depth, layer):
    clip = _encoder(two_layer_clip, "full-noproj", depth).eval()
    with torch.no_grad():
        before = clip.encode_images(_pixels())
        clip.prompts_network.generators[layer][2].weight[0, 0] = 10.0
        after = clip.encode_images(_pixels())
    assert (after - before).abs().max() > 1e-4


def test_the_gradient_at_initialisation_reaches_the_zero_layer(two_layer_clip):
    """With the last layer at 0, dL/db2 = Σ_tokens dL/d(offset), dL/dW2 = dL/d(offset)ᵀ·GELU(W1·E + b1),
    and nothing below it learns yet (its gradient passes through W2 = 0)."""
    clip = _encoder(two_layer_clip, "full-noproj", "shallow").eval()
    network, visual = clip.prompts_network, clip.model.visual
    clip.encode_images(_pixels()).pow(2).sum().backward()
    offset = torch.zeros_like(network.seed, requires_grad=True)   # the same pass with an explicit zero offset
    pooled, patches = visual_with_offsets(visual, _pixels(), [offset])
    (pooled.pow(2).sum() + patches.pow(2).sum()).backward()
    first, last = network.generators[0][0], network.generators[0][2]
    hidden = nn.functional.gelu(network.seed @ first.weight.T + first.bias)
    assert last.bias.grad.abs().sum() > 0 and last.weight.grad.abs().sum() > 0
    torch.testing.assert_close(last.bias.grad, offset.grad.sum(0))
    torch.testing.assert_close(last.weight.grad, offset.grad.T @ hidden.detach())
    assert not network.seed.grad.any() and not first.weight.grad.any()


def test_parameter_count_matches_the_formula_and_the_papers_26_07m(two_layer_clip):
    # tiny: 17 tokens (1 + 4x4 patches), width 32, hidden 32, 2 layers: 17*32 + 2*(32*32 + 32 + 32*32 + 32)
    tiny_network = _encoder(two_layer_clip, "pooled-proj").prompts_network
    assert sum(p.numel() for p in tiny_network.parameters()) == 4768 == parameter_count(17, 32, 2, 32)
    with torch.device("meta"):   # ViT-B/32 shapes, no weights: 50 tokens, width 768, 12 blocks, hidden 1411
        vit_b32 = PromptNetwork(tokens=50, width=768, layers=12, hidden=1411)
    assert sum(p.numel() for p in vit_b32.parameters()) == parameter_count(50, 768, 12, 1411) == 26_072_100


def test_building_the_network_leaves_the_global_random_state_alone(two_layer_clip):
    plain = ClipEncoder(ClipConfig(pretrained="", name=two_layer_clip))
    torch.manual_seed(5)
    state = torch.get_rng_state()
    first = prompt_network_for(plain.model.visual, PromptNetworkSpec(hidden=8))
    assert torch.equal(torch.get_rng_state(), state)
    again = prompt_network_for(plain.model.visual, PromptNetworkSpec(hidden=8))   # its own stream, from the seed
    assert torch.equal(first.seed, again.seed) and first.seed.abs().max() > 0


def test_the_feature_cache_key_follows_the_network_values(two_layer_clip):
    clip = _encoder(two_layer_clip, "pooled-proj")
    key = _tuning_key(clip)
    with torch.no_grad():
        clip.prompts_network.generators[1][2].bias[3] = 0.5
    assert key and _tuning_key(clip) != key
    assert _tuning_key(_encoder(two_layer_clip, "pooled-proj", active=False)) == ""


def test_prompt_lr_gives_the_clip_tuning_parameters_a_group_of_their_own():
    model = nn.ModuleDict({"projector": nn.Linear(2, 2), "clip": nn.ModuleDict({"prompts_network": nn.Linear(2, 2)})})
    params = list(model.parameters())
    cfg = load_config(overrides=["train.lr=1e-3", "train.weight_decay=0.1"]).train
    single = make_optimizer(model, params, cfg)
    assert [(len(g["params"]), g["lr"]) for g in single.param_groups] == [(4, 1e-3)]
    grouped = make_optimizer(model, params, cfg, {"clip.prompts": 0.05})
    assert [(g["params"], g["lr"], g["weight_decay"]) for g in grouped.param_groups] == [
        (list(model["projector"].parameters()), 1e-3, 0.1), (list(model["clip"].parameters()), 0.05, 0.1)]
    config = load_config(overrides=["eim.prompt_lr=0.05"])
    assert learning_rates_by_prefix(config, ("projector", "clip_prompts")) == {"clip.prompts": 0.05}
    assert learning_rates_by_prefix(config, ("projector",)) == {}
    assert learning_rates_by_prefix(load_config(), ("clip_prompts",)) == {}


def test_new_keys_are_validated_in_one_error():
    assert (load_config().eim.clip_tuning, load_config().eim.prompt_depth) == ("network", "deep")
    with pytest.raises(EimError) as caught:
        load_config(overrides=["eim.clip_tuning=adapter", "eim.prompt_depth=middle", "eim.prompt_lr=-1",
                               "eim.prompt_hidden=-2"])
    text = caught.value.line()
    assert all(key in text for key in ("eim.clip_tuning", "eim.prompt_depth", "eim.prompt_lr", "eim.prompt_hidden"))


def test_a_stage_that_trains_the_network_logs_zero_drift_before_training(tiny_overrides, tmp_path: Path):
    schedule = tmp_path / "ie.yaml"
    schedule.write_text(yaml.safe_dump({"stages": {"ie": {"init": "pretrained", "trainable": ["clip_prompts"],
                                                          "losses": {"ie": 1.0}}}}))
    overrides = tiny_overrides + [f"eim.queues_dir={tmp_path / 'queues'}", "train.max_steps=3",
                                  "eim.prompt_lr=0.01", "eim.prompt_hidden=8"]
    assert runner.invoke(app, ["build-queues", "-q", "-c", str(schedule), *overrides]).exit_code == 0
    result = runner.invoke(app, ["train-stage", "ie", "--run-dir", str(tmp_path / "run"), "-c", str(schedule),
                                 *overrides])
    assert result.exit_code == 0, result.output
    assert "CLIP tuning module before training: features moved 0.0000% (relative L2), [CLS] cosine 1.0" \
        in result.output
    stage = tmp_path / "run/stages/ie"
    drift = json.loads((stage / "manifest.json").read_text())["clip_tuning"]
    assert drift["before"]["features_rel_l2"] == 0.0 and drift["before"]["images"] == 24
    assert drift["before"]["loss_ie_on"] == drift["before"]["loss_ie_off"]
    assert drift["after"]["features_rel_l2"] > 0 and drift["after"]["loss_ie_on"] != drift["after"]["loss_ie_off"]
    first = json.loads((stage / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["lr"] == pytest.approx(0.01)   # prompt_lr, not train.lr=1e-3


def test_sample_rows_take_the_first_sample_of_each_image():
    class Split:
        samples = [type("S", (), {"image_id": i, "image": f"{i}.png" if i else None})()
                   for i in ("a", "a", "b", "", "c", "b", "d")]   # "": a text-only sample, skipped
    assert sample_rows(Split, limit=3) == [0, 2, 4]
    assert sample_rows(Split) == [0, 2, 4, 6]
