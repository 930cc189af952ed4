"""The speed switches of issue 5 change how a stage runs, not what it learns (beyond rounding).

eim.queue_placement=device (copy the queues into the device's memory once) must give the same
weights as streaming the memory-mapped queue; train.precision=bf16 (autocast) must track the
float32 losses; train.compile must give the float32 losses up to compiler rounding; the InfoNCE
stays float32 under autocast.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from eimctl.cli import app
from eimctl.eim.losses import infonce_reference, queue_infonce

runner = CliRunner()


@pytest.fixture
def eim_overrides(tiny_overrides, tmp_path) -> list[str]:
    return tiny_overrides + [f"eim.queues_dir={tmp_path / 'queues'}", "model.clip.remove_projection=true",
                             "model.clip.tokens=full", "model.projector.type=ffn", "train.epochs=1",
                             "train.device=cpu", "train.log_every=1"]


def _stage(run: Path, stage: str, overrides: list[str]) -> tuple[list[dict], dict]:
    result = runner.invoke(app, ["train-stage", stage, "--run-dir", str(run), "-q", *overrides])
    assert result.exit_code == 0, result.output
    folder = run / "stages" / stage
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return metrics, load_file(folder / "final/trainable.safetensors")


def test_queues_copied_to_the_device_give_the_same_weights(tmp_path, eim_overrides):
    assert runner.invoke(app, ["build-queues", "-q", *eim_overrides]).exit_code == 0
    host_metrics, host = _stage(tmp_path / "host", "st", [*eim_overrides, "eim.queue_placement=host"])
    device_metrics, device = _stage(tmp_path / "dev", "st", [*eim_overrides, "eim.queue_placement=device"])
    assert [m["loss_st"] for m in host_metrics] == [m["loss_st"] for m in device_metrics]
    assert host.keys() == device.keys() and all(torch.equal(host[k], device[k]) for k in host)
    # A chunk size other than the default changes only the order of the sums: same loss to rounding.
    chunked_metrics, _ = _stage(tmp_path / "chunk", "st", [*eim_overrides, "eim.chunk_rows=7"])
    assert [m["loss_st"] for m in chunked_metrics] == pytest.approx([m["loss_st"] for m in host_metrics], rel=1e-5)


def test_bf16_autocast_tracks_float32_and_keeps_float32_weights(tmp_path, eim_overrides):
    assert runner.invoke(app, ["build-queues", "-q", *eim_overrides]).exit_code == 0
    overrides = [*eim_overrides, "train.max_steps=4"]
    fp32_metrics, fp32 = _stage(tmp_path / "fp32", "st", overrides)
    bf16_metrics, bf16 = _stage(tmp_path / "bf16", "st", [*overrides, "train.precision=bf16"])
    # The projector runs in bfloat16 (about 3 significant digits); the loss against the queue does not.
    assert [m["loss_st"] for m in bf16_metrics] == pytest.approx([m["loss_st"] for m in fp32_metrics], rel=2e-2)
    assert [m["loss_st"] for m in bf16_metrics] != [m["loss_st"] for m in fp32_metrics]  # autocast did act
    assert all(t.dtype == torch.float32 for t in bf16.values())
    base_fp32, _ = _stage(tmp_path / "fp32", "base", overrides)
    base_bf16, _ = _stage(tmp_path / "bf16", "base", [*overrides, "train.precision=bf16"])
    assert [m["loss_base"] for m in base_bf16] == pytest.approx([m["loss_base"] for m in base_fp32], rel=3e-2)


def test_infonce_stays_float32_under_autocast():
    generator = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(300, 16, generator=generator), dim=-1)
    query = torch.randn(5, 16, generator=generator)
    positive = torch.tensor([0, 1, 2, 299, 150])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = queue_infonce(query, keys, positive, chunk_rows=64)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, infonce_reference(query, keys, positive), rtol=1e-6, atol=1e-6)


def test_compiled_stage_matches_eager(tmp_path, tiny_overrides, monkeypatch):
    import torch._inductor.config
    # Inductor draws dropout masks from its own generator; this makes it use eager's, so the two runs
    # see the same masks and any difference left is the compiler's arithmetic.
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    overrides = [*tiny_overrides, "train.device=cpu", "train.max_steps=3", "train.log_every=1"]
    eager_metrics, eager = _stage(tmp_path / "eager", "base", overrides)
    compiled_metrics, compiled = _stage(tmp_path / "compiled", "base", [*overrides, "train.compile=true"])
    assert eager.keys() == compiled.keys()  # compiling in place keeps the parameter names
    assert [m["loss"] for m in compiled_metrics] == pytest.approx([m["loss"] for m in eager_metrics], rel=1e-4)
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-3, atol=1e-4)


def test_queues_built_with_tokeniser_workers_are_identical(tmp_path, eim_overrides, monkeypatch):
    import numpy as np

    from eimctl.eim.queues import queue_folder
    from eimctl.config import load_config
    from eimctl.data.captions import read_split
    monkeypatch.setenv("EIMCTL_QUEUE_PART_ROWS", "16")  # several parts, so batches cross part boundaries
    keys = {}
    for workers in (0, 2):
        overrides = [*eim_overrides, f"eim.queues_dir={tmp_path / f'q{workers}'}", f"train.num_workers={workers}"]
        assert runner.invoke(app, ["build-queues", "-q", *overrides]).exit_code == 0
        config = load_config(overrides=overrides)
        folder = queue_folder(config, read_split(config.data, "train"))
        keys[workers] = {n: np.load(folder / f"{n}.parquet.keys.npy") for n in ("kt", "ke", "kb")}
    for name in ("kt", "ke", "kb"):
        assert np.array_equal(keys[0][name], keys[2][name]), name


def test_train_step_refuses_a_non_finite_loss_before_updating():
    from eimctl.runtime.errors import EimError
    from eimctl.train.loop import train_step
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    values = train_step({"loss_a": (weight ** 2).sum(), "loss_b": weight.sum()}, {"loss_b": 0.5}, optimizer,
                        scheduler, [weight], 0.0, 1)
    assert values == pytest.approx({"loss": 4.5, "loss_a": 3.0, "loss_b": 3.0})
    torch.testing.assert_close(weight.detach(), torch.full((3,), 1 - 0.1 * 2.5))  # d/dw (w² + w/2) = 2.5
    before = weight.detach().clone()
    with pytest.raises(EimError, match="loss became nan at step 2"):
        train_step({"loss_a": weight.sum() * float("nan")}, {}, optimizer, scheduler, [weight], 0.0, 2)
    assert torch.equal(weight.detach(), before)


def test_a_queue_too_big_for_the_device_is_one_clear_error(monkeypatch):
    import numpy as np

    from eimctl.runtime.errors import EimError
    from eimctl.eim import queues as stage_runner

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(stage_runner.torch, "empty", out_of_memory)
    with pytest.raises(EimError, match="key queue 'kb' .* does not fit") as caught:
        stage_runner.place_queues({"kb": np.zeros((10, 4), np.float16)}, "device", torch.device("cpu"), "float32",
                                  False)
    assert "eim.device_queue_dtype=float16" in caught.value.hint and "eim.queue_placement=host" in caught.value.hint
