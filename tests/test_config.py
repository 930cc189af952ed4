from pathlib import Path

import pytest

from eimctl.config import config_fingerprint, load_config, parse_overrides
from eimctl.runtime.errors import EimError


def test_precedence_defaults_yaml_overrides(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.001\n  epochs: 3\nmodel:\n  projector:\n    type: ffn\n")
    config = load_config(path, ["train.epochs=5"])
    assert config.train.lr == 0.001          # from YAML
    assert config.train.epochs == 5          # override beats YAML
    assert config.train.batch_size == 40     # default (paper)
    assert config.model.projector.type == "ffn"


def test_every_problem_in_one_error():
    with pytest.raises(EimError) as caught:
        load_config(overrides=["train.lrr=1", "train.epochs=0", "model.clip.tokens=some"])
    text = caught.value.line()
    assert "unknown key 'train.lrr'" in text and "did you mean train.lr" in text
    assert "train.epochs: must be > 0" in text
    assert "model.clip.tokens" in text


def test_malformed_yaml_names_the_line(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(EimError, match="malformed YAML"):
        load_config(path)


def test_wrong_type_is_refused():
    with pytest.raises(EimError, match="train.batch_size: expected int"):
        load_config(overrides=["train.batch_size=big"])


def test_scientific_notation_float():
    assert parse_overrides(["train.lr=1e-4"]) == {"train": {"lr": "1e-4"}}
    assert load_config(overrides=["train.lr=1e-4"]).train.lr == pytest.approx(1e-4)


def test_fingerprint_ignores_how_but_not_what():
    a = load_config(overrides=["train.device=cpu"])
    b = load_config(overrides=["train.device=auto", "train.log_every=7"])
    c = load_config(overrides=["train.lr=0.001"])
    assert config_fingerprint(a) == config_fingerprint(b)
    assert config_fingerprint(a) != config_fingerprint(c)


def test_a_config_error_names_its_source(tmp_path):
    good, typo = tmp_path / "good.yaml", tmp_path / "typo.yaml"
    good.write_text("train:\n  epochs: 3\n")
    typo.write_text("train:\n  batchsize: 8\n")
    with pytest.raises(EimError) as caught:
        load_config([good, typo], ["train.lrr=1e-4", "train.warmup_steps=-5"])
    text = caught.value.line()
    assert f"unknown key 'train.batchsize' (did you mean train.batch_size?) [{typo}]" in text
    assert "unknown key 'train.lrr' (did you mean train.lr?) [override train.lrr=1e-4]" in text
    assert "train.warmup_steps: must be >= 0, got -5 [override train.warmup_steps=-5]" in text
    assert str(good) not in text      # the file without a problem is not blamed
    with pytest.raises(EimError) as caught:
        load_config(typo)
    assert caught.value.where == str(typo)
