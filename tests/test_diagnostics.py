"""Diagnostics (eimctl/eim/diagnostics.py): val NLL, image-use gap, text-only NLL and cos(query, own key)
against plain per-sample loops, and through the CLI: diagnostics.json, metrics.json, unchanged weights."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

from eimctl.cli import app
from eimctl.config import load_config
from eimctl.data.tokens import tokenize_pairs
from eimctl.eim.diagnostics import (Subset, derangement, fixed_subset, query_key_cosine, response_nll,
                                    summary_line, text_only_nll)
from eimctl.models.factory import build_model
from eimctl.train.batches import make_collate

runner = CliRunner()
PAIRS = [("", "a red square"), ("", "there is a big blue bar"), ("", "the green bar"), ("", "a small yellow square"),
         ("picture of", "a red bar")]     # the last one has an instruction: its response starts at token 2
IMAGE_IDS = ["i0", "i0", "i1", "i2", "i3"]


@pytest.fixture
def tiny(tiny_overrides):
    """(model in train mode, its tokenised PAIRS, random CLIP features [5, 1, 24], a Subset over them)."""
    torch.manual_seed(0)
    model = build_model(load_config(overrides=tiny_overrides), groups=set(), losses=set())[0]
    tokens, _ = tokenize_pairs(model.tokenizer, PAIRS, 40)
    features = torch.randn(len(PAIRS), 1, 24)
    subset = Subset(list(range(len(PAIRS))), IMAGE_IDS,
                    make_collate(tokens, model.tokenizer.pad_token_id, lambda rows: {"features": features[rows]}),
                    images_for=lambda rows: {"features": features[rows]})
    return model, tokens, features, subset


def test_fixed_subset_is_spread_evenly_and_always_the_same():
    assert fixed_subset(10, 4) == [0, 2, 5, 7]
    assert fixed_subset(3, 5) == [0, 1, 2]
    assert fixed_subset(1000, 500) == list(range(0, 1000, 2))


@pytest.mark.parametrize("image_ids", [
    ["a", "a", "a", "b", "b", "c", "c", "c", "d"],
    ["x", "y"],
    ["c", "a", "b", "a", "c", "b", "a", "c", "b", "d", "a"],     # unsorted, uneven groups
    [f"img{k // 5}" for k in range(25)],                            # COCO-like: 5 captions per image
])
def test_derangement_never_pairs_a_sample_with_its_own_image(image_ids):
    partner = derangement(image_ids)
    assert sorted(partner) == list(range(len(image_ids)))          # a permutation: every image used once
    assert all(image_ids[partner[k]] != image_ids[k] for k in range(len(image_ids)))


def test_derangement_when_one_image_holds_most_samples():
    image_ids = ["a"] * 5 + ["b"]           # unavoidable: some "a" must meet "a", but never itself
    partner = derangement(image_ids)
    assert sorted(partner) == list(range(6)) and all(partner[k] != k for k in range(6))
    assert derangement(["only"]) == [0]


def _per_sample_response_ce(model, ids: list[int], start: int, features: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each response token, prefix + this sample's tokens alone (no padding)."""
    prefix = model.project(features[None])
    embedded = model.lm.get_input_embeddings()(torch.tensor([ids]))
    logits = model.lm(inputs_embeds=torch.cat([prefix, embedded], 1)).logits[0]
    predictions = logits[prefix.shape[1] - 1:-1]
    return F.cross_entropy(predictions, torch.tensor(ids), reduction="none")[start:]


def test_val_nll_and_image_use_gap_equal_a_per_sample_loop(tiny):
    model, tokens, features, subset = tiny
    found = response_nll(model, subset, torch.device("cpu"), batch_size=3)   # two batches: 3 + 2
    assert model.training                                                    # its mode is given back
    partner = derangement(IMAGE_IDS)
    model.eval()
    with torch.no_grad():
        own = torch.cat([_per_sample_response_ce(model, t.ids, t.response_start, features[k])
                         for k, t in enumerate(tokens)])
        other = torch.cat([_per_sample_response_ce(model, t.ids, t.response_start, features[partner[k]])
                           for k, t in enumerate(tokens)])
    assert found["tokens"] == len(own) == 4 + 7 + 4 + 5 + 4
    assert found["samples"] == 5
    assert found["val_nll"] == pytest.approx(float(own.mean()), abs=1e-5)
    assert found["val_nll_other_image"] == pytest.approx(float(other.mean()), abs=1e-5)
    assert found["image_use_gap"] == pytest.approx(float(other.mean() - own.mean()), abs=1e-5)
    assert abs(found["image_use_gap"]) > 1e-4      # another image does change the NLL of this random model


def test_text_only_nll_equals_hand_computed_next_token_cross_entropy(tiny):
    model, tokens, _, subset = tiny
    found = text_only_nll(model, subset, torch.device("cpu"), batch_size=2)
    model.eval()
    losses = []
    with torch.no_grad():
        for t in tokens:
            logits = model.lm(input_ids=torch.tensor([t.ids])).logits[0]
            per_token = F.cross_entropy(logits[:-1], torch.tensor(t.ids[1:]), reduction="none")  # predicts 1..
            losses.append(per_token[max(t.response_start, 1) - 1:])   # response tokens, but never token 0
    expected = torch.cat(losses)
    assert found["tokens"] == len(expected) == 3 + 6 + 3 + 4 + 4   # captions lose their first token only
    assert found["nll"] == pytest.approx(float(expected.mean()), abs=1e-5)


@pytest.mark.parametrize("queue_type", ["memmap-like array", "tensor"])
def test_cos_query_own_key_for_loss_st(tiny, tiny_overrides, queue_type):
    model, _, features, subset = tiny
    rows = [7, 2, 9, 0, 4]                       # the samples' queue rows, as the training split's collate gives
    keys = np.random.default_rng(0).standard_normal((10, model.lm_dim)).astype(np.float16)
    queue = keys if queue_type != "tensor" else torch.from_numpy(keys)
    by_row = dict(zip(rows, range(len(rows))))

    def batch_for(positions: list[int]) -> dict:
        places = [by_row[p] for p in positions]
        return {**subset.texts(places), "indices": torch.tensor(positions), "features": features[places]}

    train_subset = Subset(rows, IMAGE_IDS, batch_for)
    eim = load_config(overrides=tiny_overrides).eim
    found = query_key_cosine(model, train_subset, {"st": 1.0, "base": 1.0}, {"ke": queue}, eim,
                             torch.device("cpu"), batch_size=2)
    model.eval()
    with torch.no_grad():
        cosines = []
        for k, row in enumerate(rows):
            query = model.project(features[k:k + 1])[0].mean(dim=0)
            key = torch.from_numpy(keys[row].astype(np.float32))
            cosines.append(float(query @ key / (query.norm() * key.norm())))
    assert set(found) == {"st"} and found["st"]["queue"] == "ke" and found["st"]["samples"] == 5
    assert found["st"]["mean_cos"] == pytest.approx(sum(cosines) / len(cosines), abs=1e-5)


def test_diagnostics_leave_the_rng_and_module_modes_as_they_were(tiny):
    model, _, _, subset = tiny
    model.train()
    model.clip.eval()                           # a part kept in eval mode stays so
    modes = [module.training for module in model.modules()]
    torch.manual_seed(123)
    response_nll(model, subset, torch.device("cpu"), batch_size=4)
    text_only_nll(model, subset, torch.device("cpu"), batch_size=4)
    drawn = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(drawn, torch.rand(3))
    assert [module.training for module in model.modules()] == modes
    assert model.training and model.lm.training and not model.clip.training


def test_summary_line_says_every_figure():
    line = summary_line({"val_nll": 2.5, "samples": 18, "image_use_gap": 0.25,
                         "text_only_nll": {"before": 3.0, "after": 3.125},
                         "query_key_cosine": {"lm": {"queue": "kb", "mean_cos": 0.5}}})
    assert line == ("diagnostics: val NLL 2.500 (18 samples), image-use gap +0.250; text-only NLL 3.000 -> 3.125; "
                    "cos(query, own key) loss_lm 0.500")


def _train(run: Path, overrides: list[str], stage: str = "base"):
    result = runner.invoke(app, ["train-stage", stage, "--run-dir", str(run), "-q", *overrides])
    assert result.exit_code == 0, result.output
    return run / "stages" / stage


def test_base_stage_writes_diagnostics_and_evaluate_records_them(tmp_path: Path, tiny_overrides):
    stage = _train(tmp_path / "run", tiny_overrides)
    record = json.loads((stage / "diagnostics.json").read_text())
    assert record["split"] == "val" and record["samples"] == 18            # 6 val images x 3 captions
    for name in ("val_nll", "val_nll_other_image", "image_use_gap"):
        assert math.isfinite(record[name]), name
    assert "text_only_nll" not in record and "query_key_cosine" not in record   # base trains no lm / queue
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["outputs"]["diagnostics.json"] == (stage / "diagnostics.json").stat().st_size

    result = runner.invoke(app, ["evaluate", "coco", "--run-dir", str(tmp_path / "run"), "eval.max_new_tokens=4"])
    assert result.exit_code == 0, result.output
    assert "image-use gap" in result.output
    metrics = json.loads((tmp_path / "run/eval/base-coco/metrics.json").read_text())
    diagnostics = metrics["diagnostics"]
    assert diagnostics["split"] == "val" and diagnostics["samples"] == 18
    # The same weights and the same (cached) validation features: the same figures as the stage's.
    for name in ("val_nll", "image_use_gap"):
        assert diagnostics[name] == pytest.approx(record[name], abs=1e-5)


def test_diagnostic_samples_limits_the_subset(tmp_path: Path, tiny_overrides):
    stage = _train(tmp_path / "run", tiny_overrides + ["eval.diagnostic_samples=4", "train.epochs=1"])
    assert json.loads((stage / "diagnostics.json").read_text())["samples"] == 4


def test_diagnostics_do_not_change_the_trained_weights(tmp_path: Path, tiny_overrides):
    off = _train(tmp_path / "off", tiny_overrides + ["eval.diagnostics=false"])
    on = _train(tmp_path / "on", tiny_overrides + ["eval.diagnostics=true"])
    assert not (off / "diagnostics.json").exists() and (on / "diagnostics.json").is_file()
    assert "diagnostics.json" not in json.loads((off / "manifest.json").read_text())["outputs"]
    first, second = load_file(off / "final/trainable.safetensors"), load_file(on / "final/trainable.safetensors")
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)


def test_lm_stage_records_text_only_nll_before_and_after_and_query_key_cosine(tmp_path: Path, tiny_overrides):
    eim = tiny_overrides + [f"eim.queues_dir={tmp_path / 'queues'}", "model.clip.remove_projection=true",
                            "model.clip.tokens=full", "model.projector.type=ffn", "eim.prompt_tokens=2",
                            "train.epochs=1"]
    assert runner.invoke(app, ["build-queues", "-q", *eim]).exit_code == 0
    weights = {}
    for switch in ("false", "true"):
        run = tmp_path / switch
        _train(run, eim + [f"eval.diagnostics={switch}"], "st")
        weights[switch] = load_file(_train(run, eim + [f"eval.diagnostics={switch}"], "lm")
                                    / "final/trainable.safetensors")
    assert all(torch.equal(weights["false"][k], weights["true"][k]) for k in weights["false"])
    st = json.loads((tmp_path / "true/stages/st/diagnostics.json").read_text())
    assert set(st["query_key_cosine"]) == {"st"} and -1 <= st["query_key_cosine"]["st"]["mean_cos"] <= 1
    lm = json.loads((tmp_path / "true/stages/lm/diagnostics.json").read_text())
    text = lm["text_only_nll"]
    assert math.isfinite(text["before"]) and math.isfinite(text["after"]) and text["before"] != text["after"]
    assert lm["query_key_cosine"]["lm"]["queue"] == "kb" and lm["query_key_cosine"]["lm"]["samples"] == 48


def test_a_data_set_without_validation_split_still_trains_and_says_why(tmp_path: Path, tiny_assets, tiny_overrides):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(tiny_assets["data"], data)
    (data / "val.jsonl").unlink()
    stage = _train(tmp_path / "run", tiny_overrides + [f"data.path={data}", "train.epochs=1"])
    record = json.loads((stage / "diagnostics.json").read_text())
    assert "val.jsonl" in record["skipped"] and "val_nll" not in record
