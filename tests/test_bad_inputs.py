"""The bad-input catalogue (docs/bad-inputs.md) through the real CLI.

Each case ends in exactly one `Error: ...` line on stderr, exit code 1, no traceback, and leaves
no partial artifact (no manifest for the failed step, no temporary file).
"""
import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import eimctl.runtime.weights as weights_io
import eimctl.train.checkpoint as checkpoint
from eimctl.eim.queues import queue_folder
from eimctl.cli import app
from eimctl.config import load_config
from eimctl.data.captions import read_split
from eimctl.eim.queue_store import read_queue_info, write_queue

runner = CliRunner()


def fails(args: list[str], message: str, root: Path, step_dir: Path | None = None, env: dict | None = None):
    """Run the CLI; check the one-line error, exit code 1 and that nothing partial was left under `root`."""
    result = runner.invoke(app, [*args, "-q"] if args[0] in ("train-stage", "build-queues") else args, env=env)
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    print(f"\nCATALOGUE {lines[0]}")  # shown with -s: the messages quoted in docs/bad-inputs.md
    assert message in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]
    if step_dir is not None:
        assert not (step_dir / "manifest.json").exists()
    return lines[0]


@pytest.fixture
def data(tmp_path: Path, tiny_assets) -> Path:
    """A private copy of the tiny data set, to damage."""
    return Path(shutil.copytree(tiny_assets["data"], tmp_path / "data"))


@pytest.fixture
def over(tiny_overrides, data) -> list[str]:
    return [o for o in tiny_overrides if not o.startswith("data.path=")] + [f"data.path={data}"]


def train(tmp_path: Path, over: list[str], *extra: str, stage: str = "base") -> list[str]:
    return ["train-stage", stage, "--run-dir", str(tmp_path / "run"), *over, *extra]


def rows(data: Path) -> list[dict]:
    return [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]


def write_rows(data: Path, records: list[dict]) -> None:
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


# --- data -------------------------------------------------------------------------------------

def test_missing_image(tmp_path, data, over):
    (data / "images/train-0.png").unlink()
    fails(train(tmp_path, over), "image not found: images/train-0.png", tmp_path, tmp_path / "run/stages/base")
    assert not (tmp_path / "run/stages/base").exists()   # not even config.yaml: the stage never started


def test_unreadable_image(tmp_path, data, over, monkeypatch):
    import eimctl.data.images as images
    real_open = images.Image.open

    def no_permission(path, *args, **kwargs):  # chmod 000 does not stop root, so simulate it
        if "train-0.png" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(images.Image, "open", no_permission)
    fails(train(tmp_path, over), "image not readable: images/train-0.png", tmp_path, tmp_path / "run/stages/base")


def test_corrupt_image(tmp_path, data, over):
    (data / "images/train-0.png").write_bytes(b"\x89PNG not really")
    fails(train(tmp_path, over), "corrupt image: images/train-0.png", tmp_path, tmp_path / "run/stages/base")


def test_empty_caption(tmp_path, data, over):
    records = rows(data)
    records[2]["caption"] = "   "
    write_rows(data, records)
    line = fails(train(tmp_path, over), "empty caption", tmp_path)
    assert "train.jsonl, row 3" in line


def test_overlong_caption_refused(tmp_path, over):
    line = fails(train(tmp_path, over, "data.max_caption_tokens=2", "data.overlong=refuse"),
                 "samples exceed data.max_caption_tokens=2", tmp_path, tmp_path / "run/stages/base")
    assert "data.overlong=truncate" in line


def test_overlong_caption_truncated_with_warning(tmp_path, over):
    result = runner.invoke(app, train(tmp_path, over, "data.max_caption_tokens=3", "train.epochs=1"))
    assert result.exit_code == 0, result.output
    assert "samples longer than 3 tokens were truncated" in result.output


def test_duplicate_sample_ids(tmp_path, data, over):
    records = rows(data)
    records[5]["sample_id"] = records[1]["sample_id"]
    write_rows(data, records)
    fails(train(tmp_path, over), f"duplicate sample_id '{records[1]['sample_id']}' (rows 2 and 6)", tmp_path)


def test_malformed_jsonl(tmp_path, data, over):
    (data / "train.jsonl").write_text((data / "train.jsonl").read_text() + '{"image": "x.png",\n')
    fails(train(tmp_path, over), "malformed JSON", tmp_path)


def test_image_path_escaping_root(tmp_path, data, over):
    records = rows(data)
    records[0]["image"] = "../../../etc/hostname"
    write_rows(data, records)
    line = fails(train(tmp_path, over), "image path escapes the data root", tmp_path, tmp_path / "run/stages/base")
    assert "data.allow_outside_root=true" in line


def test_missing_data_path(tmp_path, over):
    fails(train(tmp_path, over, f"data.path={tmp_path / 'nowhere'}"), "split file not found", tmp_path)
    fails(train(tmp_path, over, "data.path="), "no data set given", tmp_path)


def test_karpathy_file_that_is_not_one(tmp_path, over):
    (tmp_path / "dataset_coco.json").write_text('{"annotations": []}')
    fails(train(tmp_path, over, "data.format=coco-karpathy", f"data.path={tmp_path / 'dataset_coco.json'}"),
          "not a Karpathy dataset_coco.json", tmp_path)


# --- configuration ----------------------------------------------------------------------------

def test_unknown_config_key(tmp_path, over):
    fails(train(tmp_path, over, "train.lrr=0.1"), "unknown key 'train.lrr' (did you mean train.lr?)", tmp_path)


def test_mistyped_config_value(tmp_path, over):
    fails(train(tmp_path, over, "train.epochs=two"), "train.epochs: expected int, got 'two'", tmp_path)


def test_out_of_range_values_reported_together(tmp_path, over):
    line = fails(train(tmp_path, over, "train.lr=5", "train.batch_size=0", "model.projector.type=lstm"),
                 "train.lr: must be in (0, 1), got 5.0", tmp_path)
    assert "train.batch_size: must be > 0" in line and "model.projector.type: 'lstm' is not one of" in line


def test_malformed_yaml(tmp_path, over):
    (tmp_path / "bad.yaml").write_text("train:\n  lr: [1e-4\n")
    fails(train(tmp_path, over, "-c", str(tmp_path / "bad.yaml")), "malformed YAML", tmp_path)


def test_non_mapping_yaml(tmp_path, over):
    (tmp_path / "list.yaml").write_text("- train\n- model\n")
    fails(train(tmp_path, over, "-c", str(tmp_path / "list.yaml")), "must hold a mapping at the top level", tmp_path)


def test_missing_config_file(tmp_path, over):
    fails(train(tmp_path, over, "-c", str(tmp_path / "nope.yaml")), "config file not found", tmp_path)


def test_override_not_key_value(tmp_path, over):
    fails(train(tmp_path, over, "train.lr"), "override 'train.lr' is not key=value", tmp_path)


def test_cuda_without_gpu(tmp_path, over):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    fails(train(tmp_path, over, "train.device=cuda"), "train.device=cuda but no CUDA device is visible",
          tmp_path, tmp_path / "run/stages/base")


# --- stages, run directories, checkpoints -----------------------------------------------------

def test_unknown_stage(tmp_path, over):
    fails(train(tmp_path, over, stage="bogus"), "unknown stage 'bogus'", tmp_path)


def test_stage_before_its_dependency(tmp_path, over):
    line = fails(train(tmp_path, over, stage="lm"), "stage 'st' (which 'lm' starts from) has not been run",
                 tmp_path, tmp_path / "run/stages/lm")
    assert "eimctl train-stage st" in line


def test_wrong_resume_value(tmp_path, over):
    fails(train(tmp_path, over, "--resume", "sometimes"), "--resume must be auto or never, not 'sometimes'", tmp_path)


def test_evaluate_before_training(tmp_path):
    fails(["evaluate", "coco", "--run-dir", str(tmp_path / "run"), "--stage", "base", "-q"],
          "stage 'base' has not been run", tmp_path, tmp_path / "run/eval/base-coco")


@pytest.fixture
def trained(tmp_path, over) -> Path:
    result = runner.invoke(app, train(tmp_path, over, "train.epochs=1", "-q"))
    assert result.exit_code == 0, result.output
    return tmp_path / "run"


def test_run_directory_from_another_config(tmp_path, over, trained):
    fails(train(tmp_path, over, "train.epochs=1", "train.lr=0.002"), "built from another config", tmp_path)


def test_evaluate_with_model_override(tmp_path, trained):
    fails(["evaluate", "coco", "--run-dir", str(trained), "--stage", "base", "-q", "model.clip.tokens=full"],
          "evaluate accepts eval.*, scienceqa.parse* and train.device overrides only", tmp_path)


def _replace_output(stage: Path, name: str, data: bytes) -> None:
    """Swap one output and re-list its size, as if the manifest were genuine (tests checks behind it)."""
    (stage / name).write_bytes(data)
    manifest = json.loads((stage / "manifest.json").read_text())
    manifest["outputs"][name] = len(data)
    (stage / "manifest.json").write_text(json.dumps(manifest))


def test_checkpoint_from_another_architecture(tmp_path, over, trained):
    other = runner.invoke(app, ["train-stage", "base", "--run-dir", str(tmp_path / "other"), *over,
                                "train.epochs=1", "model.projector.prefix_length=2", "-q"])
    assert other.exit_code == 0, other.output
    foreign = (tmp_path / "other/stages/base/final/trainable.safetensors").read_bytes()
    _replace_output(trained / "stages/base", "final/trainable.safetensors", foreign)
    fails(["evaluate", "coco", "--run-dir", str(trained), "--stage", "base", "-q"],
          "checkpoint is from another architecture", tmp_path, trained / "eval/base-coco")


def test_damaged_safetensors(tmp_path, trained):
    weights = trained / "stages/base/final/trainable.safetensors"
    _replace_output(trained / "stages/base", "final/trainable.safetensors", b"\0" * weights.stat().st_size)
    fails(["evaluate", "coco", "--run-dir", str(trained), "--stage", "base", "-q"], "cannot read weights",
          tmp_path, trained / "eval/base-coco")


def test_truncated_upstream_output(tmp_path, trained):
    weights = trained / "stages/base/final/trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    fails(["evaluate", "coco", "--run-dir", str(trained), "--stage", "base", "-q"],
          "stage 'base' is damaged: final/trainable.safetensors missing or partial", tmp_path)


def test_manifest_not_json(tmp_path, trained):
    (trained / "stages/base/manifest.json").write_text("{not json")
    fails(["evaluate", "coco", "--run-dir", str(trained), "--stage", "base", "-q"], "manifest is not valid JSON",
          tmp_path)


@pytest.fixture
def interrupted(tmp_path, over, monkeypatch) -> Path:
    """A stage whose final save hit a full disk: one clear line, checkpoints kept for --resume auto."""
    real = weights_io.save_file

    def full(tensors, path, *args, **kwargs):
        if "final" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(weights_io, "save_file", full)
        line = fails(train(tmp_path, over), "disk full while writing", tmp_path, tmp_path / "run/stages/base")
    assert "final/trainable.safetensors" in line and "free space" in line
    assert not (tmp_path / "run/stages/base/final/trainable.safetensors").exists()
    return tmp_path / "run/stages/base/checkpoints"


def test_disk_full_while_writing(interrupted):
    assert sorted(p.name for p in interrupted.iterdir()) == ["step-000008", "step-000010"]  # kept for resume


def test_damaged_trainer_state(tmp_path, over, interrupted):
    last = sorted(interrupted.iterdir())[-1]
    (last / "trainer_state.pt").write_bytes(b"garbage")
    line = fails(train(tmp_path, over), "cannot read trainer state", tmp_path, tmp_path / "run/stages/base")
    assert "delete that checkpoint folder" in line


def test_checkpoints_from_another_config(tmp_path, over, interrupted):
    fails(train(tmp_path, over, "train.lr=0.002"), "checkpoints of stage 'base' come from another config",
          tmp_path, tmp_path / "run/stages/base")


def test_debug_variable_shows_the_traceback(tmp_path, over):
    result = runner.invoke(app, train(tmp_path, over, stage="bogus"), env={"EIMCTL_DEBUG": "1"})
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and result.stderr.splitlines()[-1].startswith("Error: unknown stage")


# --- key queues -------------------------------------------------------------------------------

@pytest.fixture
def queues(tmp_path, over) -> tuple[Path, list[str]]:
    args = [*over, f"eim.queues_dir={tmp_path / 'queues'}"]
    result = runner.invoke(app, ["build-queues", "-q", *args])
    assert result.exit_code == 0, result.output
    config = load_config(None, args)
    return queue_folder(config, read_split(config.data, "train")), args


def test_queues_not_built(tmp_path, over):
    fails(train(tmp_path, over, f"eim.queues_dir={tmp_path / 'queues'}", stage="st"),
          "key queues for this data set and models have not been built", tmp_path)


def _rewrite_ke(folder: Path, rows: int | None = None, dim: int | None = None, encoder: str | None = None,
                data_fingerprint: str | None = None) -> None:
    info = read_queue_info(folder / "ke.parquet")
    rows, dim = rows or info.rows, dim or info.dim
    keys = np.random.default_rng(0).normal(size=(rows, dim)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    write_queue(folder / "ke.parquet", keys, [f"s{i}" for i in range(rows)], encoder=encoder or info.encoder,
                field=info.field, normalised=True, dtype=info.dtype,
                data_fingerprint=data_fingerprint or info.data_fingerprint)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["outputs"]["ke.parquet"] = (folder / "ke.parquet").stat().st_size
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("change, message", [
    ({"rows": 47}, "rows is 47, expected 48"),
    ({"dim": 16}, "key queue 'ke' has width 16, but this model's ke query has width 32"),
    ({"encoder": "some-other-lm"}, "encoder is 'some-other-lm'"),
    ({"data_fingerprint": "0123456789abcdef"}, "data fingerprint is '0123456789abcdef'"),
])
def test_queue_that_does_not_match_the_stage(tmp_path, queues, change, message):
    folder, args = queues
    _rewrite_ke(folder, **change)
    fails(["train-stage", "st", "--run-dir", str(tmp_path / "run"), *args], message, tmp_path,
          tmp_path / "run/stages/st")


def test_queue_built_from_another_fingerprint(tmp_path, queues):
    folder, args = queues
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["fingerprints"]["queues"] = "0000000000000000"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    fails(["train-stage", "st", "--run-dir", str(tmp_path / "run"), *args], "do not match this config: queues fingerprint 0000000000000000",
          tmp_path, tmp_path / "run/stages/st")


def test_disk_full_anywhere_else_is_one_line_too(capsys):
    from eimctl.runtime.errors import report_and_exit

    with pytest.raises(SystemExit) as exited:
        report_and_exit(OSError(errno.ENOSPC, "No space left on device", "/runs/r/stages/base/metrics.jsonl"))
    assert exited.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "Error: disk full while writing (/runs/r/stages/base/metrics.jsonl) — free space on that file system "
        "(or write elsewhere) and rerun; completed work is kept"]
