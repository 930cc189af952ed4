"""Shared fixtures: tiny CLIP, tiny LM and a tiny data set, built once per session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny models gain nothing from intra-op threads, and on a busy machine oversubscribed threads make
# each step ~10x slower; one thread (inherited by CLI subprocesses) keeps the suite fast.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import tiny  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "distributed: launches several processes with torchrun (gloo on CPU)")


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny")
    return {"clip": tiny.make_tiny_clip(root / "clip"), "lm": tiny.make_tiny_lm(root / "lm"),
            "data": tiny.make_tiny_data(root / "data")}


@pytest.fixture
def tiny_overrides(tiny_assets) -> list[str]:
    """Overrides that point a config at the tiny assets and make training take seconds."""
    return [f"model.clip.name={tiny_assets['clip']}", "model.clip.pretrained=",
            f"model.lm.name={tiny_assets['lm']}", f"data.path={tiny_assets['data']}",
            "train.epochs=2", "train.batch_size=8", "train.warmup_steps=2", "train.lr=1e-3",
            "train.log_every=1", "train.checkpoint_every=2", "eval.max_new_tokens=8",
            "eval.fixed_caption_candidates=5"]
