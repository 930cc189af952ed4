"""ClipCap's results are unchanged by the restructuring: final weights and key queues on a tiny config
equal the ones the code before it produced (tests/golden/, made once with that code).

The golden file holds the final trainable tensors of the ClipCap baseline (`base`, prefix MLP on the
pooled feature) and of EIM's `st -> lm -> base-ie` chain (FFN on full tokens, visual prompts), plus the
three key queues, all trained through the real CLI with OMP_NUM_THREADS=1 on the tiny assets of
conftest.py. They must be bit-identical on the x86-64 CPU the golden file was made on.
"""
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from eimctl.cli import app
from eimctl.eim.queue_store import open_queue

GOLDEN = Path(__file__).parent / "golden" / "clipcap_tiny_weights.safetensors"
runner = CliRunner()


def _run(*args: str) -> None:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output


def test_final_weights_and_queues_equal_the_previous_code(tiny_assets, tmp_path: Path):
    base = [f"model.clip.name={tiny_assets['clip']}", "model.clip.pretrained=", f"model.lm.name={tiny_assets['lm']}",
            f"data.path={tiny_assets['data']}", "train.epochs=2", "train.batch_size=8", "train.warmup_steps=2",
            "train.lr=1e-3", "train.log_every=1", "train.checkpoint_every=2", "model.projector.prefix_length=4",
            "eim.clip_tuning=tokens"]
    eim = base + [f"eim.queues_dir={tmp_path / 'queues'}", "model.clip.remove_projection=true",
                  "model.clip.tokens=full", "model.projector.type=ffn", "eim.prompt_tokens=2", "train.epochs=1"]
    _run("train-stage", "base", "--run-dir", str(tmp_path / "clipcap"), "-q", *base)
    _run("build-queues", "-q", *eim)
    for stage in ("st", "lm", "base-ie"):
        _run("train-stage", stage, "--run-dir", str(tmp_path / "eim"), "-q", *eim)

    produced = {}
    for tag, folder in (("clipcap.base", tmp_path / "clipcap/stages/base"),
                        ("eim.base-ie", tmp_path / "eim/stages/base-ie")):
        for name, tensor in load_file(folder / "final/trainable.safetensors").items():
            produced[f"{tag}/{name}"] = tensor
    for name in ("kt", "ke", "kb"):
        (path,) = (tmp_path / "queues").glob(f"*/{name}.parquet")
        keys, _ = open_queue(path)
        produced[f"queue/{name}"] = torch.from_numpy(np.asarray(keys, dtype=np.float32).copy())

    golden = load_file(GOLDEN)
    assert set(produced) == set(golden)
    differing = {name: float((produced[name] - golden[name]).abs().max()) for name in golden
                 if not torch.equal(produced[name], golden[name])}
    assert not differing, f"tensors differ from the previous code's (max |diff|): {differing}"
