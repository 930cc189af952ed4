"""The llama-adapter family: adaption prompts with zero-init tanh gates in the top L layers of a tiny GQA LLaMA,
visual tokens from a Transformer ST added to them. Exact checks at initialisation, a hand-written reference
for one layer's prompt term, parameter counts at the real LLaMA-7B shapes (meta device), KV-cached generation
against per-sample and uncached decoding, and the EIM schedule through the real CLI."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from typer.testing import CliRunner

import tiny
from eimctl.cli import app
from eimctl.config import load_config
from eimctl.data.tokens import pad_batch, tokenize_pairs
from eimctl.models.adaption_prompts import AdaptionPrompts
from eimctl.models.factory import build_model, set_trainable
from eimctl.runtime.errors import EimError

runner = CliRunner()
L, K, D, HEADS, KV_HEADS = 3, 4, 64, 4, 2     # adapted layers (of 4), prompts, LM width, query / KV heads


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("llama_adapter")
    return {"clip": tiny.make_tiny_clip(root / "clip", layers=4), "lm": tiny.make_tiny_llama(root / "llama"),
            "gpt2": tiny.make_tiny_lm(root / "gpt2"), "data": tiny.make_tiny_data(root / "data")}


@pytest.fixture(scope="module")
def overrides(assets) -> list[str]:
    return [f"model.clip.name={assets['clip']}", "model.clip.pretrained=", f"model.lm.name={assets['lm']}",
            "model.family=llama-adapter", "model.clip.remove_projection=true", "model.clip.tokens=full",
            f"model.llama_adapter.layers={L}", f"model.llama_adapter.prompt_len={K}",
            "model.llama_adapter.st_depth=2", "model.llama_adapter.st_heads=2",
            "model.llama_adapter.bos=false"]   # exact comparisons with the plain LM on the same ids


def make(overrides: list[str], *extra: str, groups=("st", "prompts", "gates"), losses=("base",)):
    model, _ = build_model(load_config(overrides=[*overrides, *extra]), groups=set(groups), losses=set(losses))
    return model.eval()


def text_batch(model, has_image=None) -> dict:
    pairs = [("there is", "a red square"), ("", "the big blue bar of the picture"), ("a", "small green bar")]
    tokens, _ = tokenize_pairs(model.tokenizer, pairs, 40)
    batch = pad_batch(tokens, model.tokenizer.pad_token_id)
    if has_image is not None:
        batch["has_image"] = torch.tensor(has_image)
    return batch


def features(rows: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, 17, 32, generator=torch.Generator().manual_seed(seed))   # [CLS] + 16 patches, width 32


def perturb(model, seed: int = 1) -> None:
    """Non-zero gates and a moved ST, so that the prompt term and the image matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.adapter.gates.copy_(torch.randn(model.adapter.gates.shape, generator=generator))
        for param in model.st.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))


def test_zero_init_is_the_plain_lm_and_a_gate_changes_it(overrides, assets):
    model = make(overrides)
    plain_lm = AutoModelForCausalLM.from_pretrained(assets["lm"]).eval()
    batch = text_batch(model, has_image=[True, False, True])
    with torch.no_grad():
        plain = plain_lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        visual = model.project(features())
        for given in (visual, None):
            assert (model.run_lm(given, batch).logits - plain).abs().max() <= 1e-6
        model.adapter.gates[L - 1, 1] = 0.5                  # one head of one layer
        gated = model.run_lm(visual, batch).logits
        assert (gated - plain).abs().max() > 1e-3
        assert torch.equal(model.text_hidden(batch["input_ids"], batch["attention_mask"]),
                           plain_lm.model(input_ids=batch["input_ids"],
                                          attention_mask=batch["attention_mask"]).last_hidden_state)
        # the image enters only for samples that have one
        text_only = model.run_lm(None, batch).logits
        assert torch.allclose(gated[1], text_only[1], atol=1e-6) and not torch.allclose(gated[0], text_only[0])


def test_gradients_at_initialisation(overrides):
    model = make(overrides).train()
    set_trainable(model, "llama-adapter", ("st", "prompts", "gates"))
    batch = text_batch(model)
    loss = model.response_loss(model.run_lm(model.project(features()), batch), batch)
    loss.backward()
    assert model.adapter.prompts.grad is not None and torch.count_nonzero(model.adapter.prompts.grad) == 0
    assert torch.count_nonzero(model.adapter.gates.grad) == model.adapter.gates.numel()   # tanh'(0) = 1
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in model.st.parameters())


def test_labels_ignore_with_minus_100_not_token_zero(overrides):
    model = make(overrides)
    batch = text_batch(model)
    out = model.run_lm(None, batch)
    assert out.offset == 0 and torch.equal(out.mask, batch["attention_mask"])
    assert torch.equal(out.labels == -100, batch["loss_mask"] == 0)


def test_parameter_accounting_tiny_and_llama_7b_shapes(overrides):
    model = make(overrides)
    set_trainable(model, "llama-adapter", ("prompts", "gates"))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == L * K * D + L * HEADS
    assert tuple(model.adapter.gates.shape) == (L, HEADS)
    with torch.device("meta"):
        llama_7b = LlamaForCausalLM(LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                                intermediate_size=11008, vocab_size=32000))
        adapter = AdaptionPrompts(llama_7b, layers=30, prompt_len=10)
    assert sum(p.numel() for p in adapter.parameters()) == 30 * 10 * 4096 + 30 * 32 == 1_229_760
    with torch.device("meta"):   # SmolLM2-135M's shapes: GQA with 9 query heads over 3 KV heads
        smol = LlamaForCausalLM(LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                            num_key_value_heads=3, intermediate_size=1536, vocab_size=49152))
        adapter = AdaptionPrompts(smol, layers=8, prompt_len=10)
    assert sum(p.numel() for p in adapter.parameters()) == 46_152 and tuple(adapter.gates.shape) == (8, 9)


def reference_term(attention, hidden, cos, sin, prompts, gates) -> torch.Tensor:
    """One layer's prompt term written out: per query head j, KV head j // (H / KV), no RoPE on the prompts."""
    batch, length, _ = hidden.shape
    head_dim = D // HEADS
    q = (hidden @ attention.q_proj.weight.T).view(batch, length, HEADS, head_dim).transpose(1, 2)
    q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    k = (prompts @ attention.k_proj.weight.T).view(batch, K, KV_HEADS, head_dim)
    v = (prompts @ attention.v_proj.weight.T).view(batch, K, KV_HEADS, head_dim)
    heads = []
    for j in range(HEADS):
        kv = j // (HEADS // KV_HEADS)
        weights = torch.softmax(q[:, j] @ k[:, :, kv].transpose(1, 2) / head_dim ** 0.5, dim=-1)
        heads.append(torch.tanh(gates[j]) * weights @ v[:, :, kv])
    return torch.cat(heads, dim=-1) @ attention.o_proj.weight.T


def test_gqa_prompt_term_matches_a_hand_written_reference(overrides):
    model = make(overrides)
    perturb(model)
    attention = model.lm.model.layers[-1].self_attn
    assert attention.k_proj.out_features == KV_HEADS * (D // HEADS)    # the prompts get 2 KV heads ...
    captured = {}
    attention.register_forward_pre_hook(lambda m, args, kwargs: captured.update(args=args, kwargs=kwargs),
                                        with_kwargs=True)
    batch = text_batch(model)
    visual = model.project(features())
    with torch.no_grad():
        with model.adapter.active(visual):
            model.lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        args, kwargs = captured["args"], captured["kwargs"]
        with model.adapter.active(visual):
            keys, values = model.adapter.prompt_kv(L - 1, attention, torch.float32)
            adapted = attention(*args, **kwargs)[0]
        with model.adapter.bypassed():
            plain = attention(*args, **kwargs)[0]
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        expected = reference_term(attention, hidden, cos, sin, model.adapter.prompts[L - 1] + visual,
                                  model.adapter.gates[L - 1])
    assert keys.shape == (3, HEADS, K, D // HEADS)                          # ... repeated to the 4 query heads
    assert torch.equal(keys[:, 0], keys[:, 1]) and torch.equal(values[:, 2], values[:, 3])
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(adapted - plain, expected, atol=1e-5, rtol=1e-4)


def uncached_greedy(model, visual, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding by re-running run_lm on the whole sequence: the oracle for the KV-cached path."""
    ids, out = list(prompt), []
    for _ in range(steps):
        tensor = torch.tensor([ids])
        logits = model.run_lm(visual, {"input_ids": tensor, "attention_mask": torch.ones_like(tensor),
                                       "loss_mask": torch.ones_like(tensor)}).logits
        token = int(logits[0, -1].argmax())
        if token == model.tokenizer.eos_token_id:
            break
        out.append(token)
        ids.append(token)
    return out


def test_generation_batched_left_padded_equals_each_alone(overrides):
    model = make(overrides)
    perturb(model)
    with torch.no_grad():
        model.adapter.prompts.mul_(3.0)
    prompts = [model.tokenizer(text, add_special_tokens=False)["input_ids"]
               for text in ("there is a", "the", "a small picture of the")]
    visual, has_image = model.project(features()), torch.tensor([True, True, False])
    alone = [model.generate(visual[i:i + 1], [prompts[i]], max_new_tokens=6, beam_size=1,
                            has_image=has_image[i:i + 1]) for i in range(3)]
    with torch.no_grad():
        assert alone[0][0] == uncached_greedy(model, visual[:1], prompts[0], 6)
    assert model.generate(visual, prompts, max_new_tokens=6, beam_size=1, has_image=has_image) == \
        [row[0] for row in alone]
    # rows that stop early leave the batch (the per-row visual prompts follow): pick an eos that does that
    lengths_differ = False
    for eos in {token for row in alone for token in row[0]}:
        model.tokenizer.eos_token_id = eos
        singles = [model.generate(visual[i:i + 1], [prompts[i]], max_new_tokens=6, beam_size=1,
                                  has_image=has_image[i:i + 1])[0] for i in range(3)]
        if len({len(row) for row in singles}) > 1:
            lengths_differ = True
            assert model.generate(visual, prompts, max_new_tokens=6, beam_size=1, has_image=has_image) == singles
    assert lengths_differ


def test_generation_without_prompts_starts_from_bos_and_refuses_beams(overrides):
    model = make(overrides)
    perturb(model)
    visual = model.project(features(2))
    bos = model.tokenizer.bos_token_id
    assert model.generate(visual, None, max_new_tokens=4, beam_size=1) == \
        model.generate(visual, [[bos], [bos]], max_new_tokens=4, beam_size=1)
    with pytest.raises(EimError, match="beam search is not available for llama-adapter"):
        model.generate(visual, None, max_new_tokens=4, beam_size=3)
    sampled = model.generate(visual, None, max_new_tokens=4, beam_size=1,
                             sampling={"temperature": 1.0, "top_p": 0.9, "generator": torch.Generator().manual_seed(0)})
    assert len(sampled) == 2


def test_global_mlp_fusion_gives_one_token_repeated(overrides):
    model = make(overrides, "model.llama_adapter.visual_fusion=global_mlp", "model.llama_adapter.st_width=16")
    visual = model.project(features())
    assert visual.shape == (3, K, D) and torch.equal(visual[:, 0], visual[:, -1])
    assert sum(p.numel() for p in model.st.parameters()) == 32 * 16 + 16 + 16 * D + D


@pytest.mark.parametrize("extra, message", [
    (("model.llama_adapter.layers=5",), "has 4 layers"),
    (("model.llama_adapter.st_heads=3",), "st_heads=3 does not divide the ST width 32"),
    (("model.llama_adapter.visual_fusion=cross",), "visual_fusion='cross'"),
])
def test_bad_options_are_refused_clearly(overrides, extra, message):
    with pytest.raises(EimError, match=message):
        make(overrides, *extra)


def test_a_non_llama_lm_is_refused(overrides, assets):
    with pytest.raises(EimError, match="not a LLaMA-architecture causal LM") as error:
        make(overrides, f"model.lm.name={assets['gpt2']}")
    assert error.value.where == "model.lm.name"


def metrics(run: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (run / f"stages/{stage}/metrics.jsonl").read_text().splitlines()]


def test_the_eim_schedule_runs_through_the_cli(overrides, assets, tmp_path):
    common = [*overrides, f"data.path={assets['data']}", f"eim.queues_dir={tmp_path / 'queues'}",
              "train.epochs=3", "train.batch_size=8", "train.warmup_steps=0", "train.lr=3e-2", "train.log_every=1",
              "train.checkpoint_every=100", "eval.max_new_tokens=4", "eval.fixed_caption_baseline=false",
              "eval.diagnostics=false"]
    run = tmp_path / "run"
    base = runner.invoke(app, ["train-stage", "base", "--run-dir", str(run), "-q", *common])
    assert base.exit_code == 0, base.output
    losses = [m["loss"] for m in metrics(run, "base")]
    assert sum(losses[-3:]) < sum(losses[:3])                              # it learns
    assert {name.split(".")[0] for name in load_file(run / "stages/base/final/trainable.safetensors")} == \
        {"st", "adapter"}
    assert runner.invoke(app, ["build-queues", "-q", *common]).exit_code == 0
    short = [*common, "train.max_steps=2"]
    for stage in ("st", "lm", "adapter"):
        result = runner.invoke(app, ["train-stage", stage, "--run-dir", str(run), "-q", *short])
        assert result.exit_code == 0, (stage, result.output)
    trained = load_file(run / "stages/adapter/final/trainable.safetensors")
    assert {"adapter.prompts", "adapter.gates"} <= set(trained) and any(k.startswith("st.") for k in trained)
    assert runner.invoke(app, ["train-stage", "base-ie", "--run-dir", str(run), "-q", *short]).exit_code == 0
    result = runner.invoke(app, ["evaluate", "coco", "--run-dir", str(run), "--stage", "adapter", "-q"])
    assert result.exit_code == 0, result.output


def test_bos_is_put_first_in_training_keys_and_generation(overrides):
    model = make(overrides, "model.llama_adapter.bos=true")
    plain = make(overrides)
    ids = torch.tensor([[5, 6, 7], [8, 9, model.tokenizer.pad_token_id]])
    batch = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
             "loss_mask": torch.tensor([[0, 1, 1], [0, 1, 0]])}
    out = model.run_lm(None, batch)
    assert out.logits.shape[1] == 4 and out.offset == 1 and out.labels[:, 0].tolist() == [-100, -100]
    assert out.labels[0].tolist() == [-100, -100, 6, 7]
    with_bos = torch.cat([torch.full((2, 1), model.tokenizer.bos_token_id), ids], dim=1)
    expected = plain.lm(input_ids=with_bos, attention_mask=torch.cat([torch.ones(2, 1, dtype=torch.long),
                                                                       batch["attention_mask"]], dim=1)).logits
    assert (out.logits - expected).abs().max() <= 1e-6            # at init: the plain LM after BOS
    assert model.text_hidden(ids, batch["attention_mask"]).shape[1] == 3   # keys stay aligned with the text
    assert model._start_tokens([[5, 6]], 1) == [[model.tokenizer.bos_token_id, 5, 6]]
