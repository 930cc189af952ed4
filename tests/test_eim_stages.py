"""EIM through the real CLI: build-queues -> st -> lm -> base-ie -> evaluate, and the stage rules."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from eimctl.eim.queues import queue_folder
from eimctl.cli import app
from eimctl.config import load_config
from eimctl.data.captions import read_split
from eimctl.runtime.errors import EimError
from eimctl.data.tokens import pad_batch, tokenize_pairs
from eimctl.models.factory import build_model, set_trainable
from eimctl.eim.queue_store import open_queue, read_queue_info
from eimctl.eim.schedule import resolve_schedule, schedule_uses

runner = CliRunner()


@pytest.fixture
def eim_overrides(tiny_overrides, tmp_path) -> list[str]:
    return tiny_overrides + [f"eim.queues_dir={tmp_path / 'queues'}", "model.clip.remove_projection=true",
                             "model.clip.tokens=full", "model.projector.type=ffn", "eim.prompt_tokens=2",
                             "train.epochs=1"]


def cli(*args: str):
    result = runner.invoke(app, list(args))
    return result


def test_queues_hold_the_documented_keys(eim_overrides):
    assert cli("build-queues", "-q", *eim_overrides).exit_code == 0
    config = load_config(overrides=eim_overrides)
    train = read_split(config.data, "train")
    folder = queue_folder(config, train)
    model, _ = build_model(config, groups=set(), losses=set())
    model.eval()
    tokenized, _ = tokenize_pairs(model.tokenizer, [("", s.caption) for s in train.samples[:5]], 40)
    batch = pad_batch(tokenized, model.tokenizer.pad_token_id)
    tokens, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        kt = model.clip.encode_text([s.caption for s in train.samples[:5]])
        emb = model.lm.get_input_embeddings()(tokens)
        ke = (emb * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        hidden = model.lm(input_ids=tokens, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        kb = hidden[torch.arange(5), mask.sum(1) - 1]
    for name, expected in (("kt", kt), ("ke", ke), ("kb", kb)):
        keys, info = open_queue(folder / f"{name}.parquet", expect_rows=len(train.samples))
        assert info.normalised and info.dtype == "float16" and info.data_fingerprint == train.fingerprint
        expected = torch.nn.functional.normalize(expected, dim=-1).numpy()
        np.testing.assert_allclose(np.asarray(keys[:5], dtype=np.float32), expected, atol=2e-3)
    assert read_queue_info(folder / "kt.parquet").dim == 24 and read_queue_info(folder / "kb.parquet").dim == 32
    again = cli("build-queues", *eim_overrides)
    assert again.exit_code == 0 and "skipping" in again.output


def test_segmented_eim_chain_and_gradient_truncation(tmp_path: Path, eim_overrides):
    run = str(tmp_path / "run")
    assert cli("build-queues", "-q", *eim_overrides).exit_code == 0
    refused = cli("train-stage", "lm", "--run-dir", run, *eim_overrides)
    assert refused.exit_code == 1
    assert "stage 'st' (which 'lm' starts from) has not been run" in refused.output
    assert "eimctl train-stage st" in refused.output
    for stage in ("st", "lm", "base-ie"):
        result = cli("train-stage", stage, "--run-dir", run, "-q", *eim_overrides)
        assert result.exit_code == 0, (stage, result.output)
    final = {s: load_file(tmp_path / f"run/stages/{s}/final/trainable.safetensors") for s in ("st", "lm", "base-ie")}
    assert all(k.startswith("projector.") for k in final["st"])
    # `lm` trains only the LM: the projector it carries is st's, bit for bit.
    for name, tensor in final["st"].items():
        assert torch.equal(final["lm"][name], tensor)
    assert any(k.startswith("lm.") for k in final["lm"]) and not any(k.startswith("clip.") for k in final["lm"])
    assert any(k.startswith("clip.prompts_network.") for k in final["base-ie"])   # eim.clip_tuning=network
    logged = [json.loads(l) for l in (tmp_path / "run/stages/base-ie/metrics.jsonl").read_text().splitlines()]
    assert {"loss_base", "loss_ie"} <= set(logged[-1])
    result = cli("evaluate", "coco", "--run-dir", run, "--stage", "base-ie", "eval.max_new_tokens=5",
                 "eval.fixed_caption_baseline=false")
    assert result.exit_code == 0, result.output


def test_stage_without_queues_is_refused(tmp_path: Path, eim_overrides):
    result = cli("train-stage", "st", "--run-dir", str(tmp_path / "run"), *eim_overrides)
    assert result.exit_code == 1
    assert "key queues for this data set and models have not been built" in result.output
    assert "eimctl build-queues" in result.output


@pytest.mark.parametrize("stage, expected", [
    ("st", {"projector"}), ("lm", {"lm"}), ("base", {"projector", "lm"}),
    ("base-ie", {"projector", "lm", "clip.prompts"}),
])
def test_trainable_sets(eim_overrides, stage, expected):
    config = load_config(overrides=eim_overrides)
    groups, losses = schedule_uses(resolve_schedule(config))
    spec = resolve_schedule(config)[stage]
    model, _ = build_model(config, groups=groups, losses=losses, trained_now=set(spec.trainable))
    set_trainable(model, config.model.family, spec.trainable)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    groups = {"clip.prompts" if n.startswith("clip.prompts") else n.split(".")[0] for n in names}
    assert groups == expected
    assert not any(n.startswith("clip.model.") for n in names)   # CLIP's own weights never train
    assert model.clip.prompts_active == ("clip.prompts" in expected)


def test_unknown_stage_and_bad_schedule():
    result = cli("train-stage", "nope", "--run-dir", "/tmp/x")
    assert result.exit_code == 1 and "unknown stage 'nope'" in result.output and "st, lm, base-ie" in result.output
    with pytest.raises(EimError) as caught:
        resolve_schedule(load_config(base={"stages": {"x": {"init": "y", "trainable": ["lmm"], "losses": {"foo": 1}}}}))
    text = caught.value.line()
    assert "unknown loss 'foo'" in text and "unknown module 'lmm'" in text and "'y' is neither" in text
    with pytest.raises(EimError, match="init chain loops"):
        resolve_schedule(load_config(base={"stages": {"a": {"init": "b", "trainable": ["lm"], "losses": {"base": 1}},
                                                      "b": {"init": "a", "trainable": ["lm"], "losses": {"base": 1}}}}))


def test_evaluating_a_stage_without_loss_base_is_refused_unless_forced(tmp_path: Path, eim_overrides):
    run = tmp_path / "run"
    assert cli("build-queues", "-q", *eim_overrides).exit_code == 0
    assert cli("train-stage", "st", "--run-dir", str(run), "-q", *eim_overrides).exit_code == 0
    refused = cli("evaluate", "coco", "--run-dir", str(run), "--stage", "st", "-q")
    assert refused.exit_code == 1 and "without loss_base" in refused.output
    assert "(base, base-ie)" in refused.output and "--force" in refused.output   # the stages that can be scored
    assert not (run / "eval").exists()
    forced = cli("evaluate", "coco", "--run-dir", str(run), "--stage", "st", "-q", "--force",
                 "eval.max_new_tokens=4", "eval.fixed_caption_candidates=3")
    assert forced.exit_code == 0, forced.output


def test_the_suggested_commands_run_as_printed(tmp_path: Path, eim_overrides):
    import re
    import shlex
    run = str(tmp_path / "run")
    # no queues yet: the hint names build-queues with this command line's overrides
    missing_queues = cli("train-stage", "st", "--run-dir", run, *eim_overrides)
    command = re.search(r"run `(eimctl build-queues[^`]*)` first", missing_queues.output).group(1)
    assert cli(*shlex.split(command)[1:], "-q").exit_code == 0
    # lm before st: the hint names the st stage, complete with the config, and it runs as printed
    refused = cli("train-stage", "lm", "--run-dir", run, *eim_overrides)
    command = re.search(r"run `(eimctl train-stage st[^`]*)` first", refused.output).group(1)
    assert "<same config>" not in command and "model.projector.type=ffn" in command
    assert cli(*shlex.split(command)[1:], "-q").exit_code == 0
    assert cli("train-stage", "lm", "--run-dir", run, "-q", *eim_overrides).exit_code == 0
