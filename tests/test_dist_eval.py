"""`eimctl evaluate` under torchrun (2 ranks, gloo on CPU) writes byte for byte what one process writes.

Batch k of the evaluation goes to rank k mod W (eimctl/tasks/sharding.py); with an odd number of batches the ranks
get uneven shares. The unit test checks the split and the reassembly for many sizes without launching anything.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tiny
from eimctl.cli import app
from eimctl.data.scienceqa_demo import generate_scienceqa_demo
from eimctl.runtime.distributed import World
from eimctl.tasks import sharding

pytestmark = pytest.mark.distributed
runner = CliRunner()
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _evaluate(launch: list[str], args: list[str]) -> None:
    done = subprocess.run([*launch, "-m", "eimctl.cli", "evaluate", *args], env=ENV, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _plain_and_two_ranks(trained: Path, tmp_path: Path, args: list[str]) -> tuple[Path, Path]:
    """Copies of the trained run directory, evaluated by one process and by two ranks."""
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(trained, one)
    shutil.copytree(trained, two)
    _evaluate([sys.executable], [*args, "--run-dir", str(one)])
    _evaluate(TORCHRUN, [*args, "--run-dir", str(two)])
    return one, two


def _assert_same(one: Path, two: Path, files: list[str]) -> None:
    for name in files:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    metrics = [json.loads((folder / "metrics.json").read_text()) for folder in (one, two)]
    for entry in metrics:
        entry.pop("wall_seconds")
    assert metrics[0] == metrics[1]
    manifests = [json.loads((folder / "manifest.json").read_text()) for folder in (one, two)]
    assert manifests[0]["status"] == manifests[1]["status"] == "complete"
    # metrics.json holds wall_seconds, so only its name is compared; the other outputs byte for byte
    assert manifests[0]["outputs"].keys() == manifests[1]["outputs"].keys()
    assert all(manifests[0]["outputs"][name] == manifests[1]["outputs"][name] for name in files)
    assert manifests[0]["fingerprints"] == manifests[1]["fingerprints"]


@pytest.mark.parametrize("size", [1, 2, 3])
def test_batches_split_by_rank_and_come_back_in_order(size, monkeypatch):
    for total in range(0, 9):
        for batch_size in (1, 2, 3, 4):
            shares = []
            for rank in range(size):
                monkeypatch.setattr(sharding, "current", lambda rank=rank: World(rank=rank, size=size))
                spans = sharding.my_spans(total, batch_size)
                assert all(start // batch_size % size == rank for start, _ in spans)
                shares.append([list(range(start, stop)) for start, stop in spans])
            monkeypatch.setattr(sharding, "gather_objects", lambda mine: shares)
            monkeypatch.setattr(sharding, "current", lambda: World(rank=0, size=size))
            assert sharding.generate_in_batches(total, batch_size, lambda a, b: list(range(a, b))) == list(range(total))


@pytest.fixture(scope="module")
def sqa_assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sqa-dist")
    data = root / "data"
    generate_scienceqa_demo(data, n_train=16, n_val=4, n_test=9, image_size=32)
    return {"data": data, "clip": tiny.make_tiny_clip(root / "clip"),
            "lm": tiny.make_tiny_llama(root / "llama", hidden=32, layers=1, words=tiny.scienceqa_words(data))}


def test_scienceqa_two_ranks_write_what_one_process_writes(tmp_path, sqa_assets):
    common = ["model.family=lavin", "model.clip.tokens=cls_every_k", "model.clip.cls_every=1",
              "model.lavin.adapter_dropout=0", f"model.clip.name={sqa_assets['clip']}", "model.clip.pretrained=",
              f"model.lm.name={sqa_assets['lm']}",
              "data.task=scienceqa", f"data.path={sqa_assets['data']}", "data.max_caption_tokens=256",
              "train.batch_size=8", "train.warmup_steps=0", "train.max_steps=2", "train.checkpoint_every=100",
              "eval.diagnostics=false"]
    trained = tmp_path / "trained"
    result = runner.invoke(app, ["train-stage", "base", "--run-dir", str(trained), "-q", *common])
    assert result.exit_code == 0, result.output
    # 9 test problems (text-only and with images) in batches of 2: 5 batches (3 and 2), the last a single problem
    one, two = _plain_and_two_ranks(trained, tmp_path, ["scienceqa", "-q", "eval.batch_size=2",
                                                        "eval.max_new_tokens=8"])
    _assert_same(one / "eval/base-scienceqa", two / "eval/base-scienceqa", ["results.json"])
