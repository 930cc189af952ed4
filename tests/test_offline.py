"""No network and no cached weights: the CLI fails fast with one complete error line.

The hub endpoint points at a loopback port that refuses at once and the Hugging Face cache is an
empty folder, with HF_HUB_OFFLINE unset: eimctl must notice the hub is unreachable, switch to
offline mode itself, and say in one line what is missing, where, and the three ways to supply it.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tiny
from eimctl.runtime.hub import short

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def unreachable(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline")
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "EIMCTL_VERBOSE", "EIMCTL_DEBUG")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(root / "hf"), HF_HUB_CACHE=str(root / "hf" / "hub"),
               PYTHONPATH=str(ROOT))
    return {"env": env, "data": tiny.make_tiny_data(root / "data"), "clip": tiny.make_tiny_clip(root / "clip"),
            "root": root}


def _fails_fast(unreachable, overrides: list[str]) -> str:
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "eimctl", "build-queues", "-q",
                             f"data.path={unreachable['data']}", f"eim.queues_dir={unreachable['root'] / 'queues'}",
                             *overrides], env=unreachable["env"], cwd=unreachable["root"],
                            capture_output=True, text=True, timeout=60)
    seconds = time.monotonic() - start
    print(f"\nfailed in {seconds:.1f} s")
    assert result.returncode == 1, result.stderr
    assert seconds < 10, seconds
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert not [line for line in lines if "Retrying" in line or "ERROR:root" in line]
    assert "local cache" in lines[0] and "the hub is unreachable" in lines[0]
    return lines[0]


def test_clip_tag_without_hub_fails_fast_in_one_line(unreachable):
    line = _fails_fast(unreachable, ["model.clip.name=ViT-B-32", "model.clip.pretrained=openai"])
    assert "cannot obtain CLIP weights for ViT-B-32 / openai" in line and "(model.clip)" in line
    for way in ("download them once with network access", "model.clip.pretrained to a local checkpoint file",
                "'local-dir:/path'"):
        assert way in line, line


def test_lm_hub_id_without_hub_fails_fast_in_one_line(unreachable):
    line = _fails_fast(unreachable, [f"model.clip.name={unreachable['clip']}", "model.clip.pretrained=",
                                     "model.lm.name=gpt2"])
    assert "cannot load language model 'gpt2'" in line and "(model.lm.name)" in line
    for way in ("download the id once with network access", "model.lm.name to a local directory",
                "model.lm.gguf_file"):
        assert way in line, line


def test_quoted_errors_are_shortened_at_a_word_boundary():
    text = "Failed to download file for timm/vit. Last error: An error happened while trying " * 5
    shortened = short(text, 100)
    assert len(shortened) <= 102 and shortened.endswith(" …")
    assert text.startswith(shortened[:-2]) and text[len(shortened) - 2] == " "
