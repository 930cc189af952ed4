"""generate: batched, KV-cached greedy `generate_captions` vs the per-sample full-recompute loop.

A random demo-sized GPT-2 whose eos can never be produced, so every caption runs to
max_new_tokens; both must give the same tokens.
"""
from __future__ import annotations

import statistics
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from common import figure, timed
from eimctl.demo.pretrain import DEFAULT_LM_CFG
from eimctl.models.generate import generate_captions, generate_captions_naive


def run(args, scale: dict, work: Path) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    vocab = 256
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, initializer_range=0.2, **DEFAULT_LM_CFG)).to(device).eval()
    prefix = torch.randn(32, 10, DEFAULT_LM_CFG["n_embd"], device=device)
    tokens = scale["gen_tokens"]
    never = vocab + 1  # an eos id the LM cannot produce: every caption runs to max_new_tokens
    outputs = {}

    def fast():
        outputs["fast"] = generate_captions(lm, prefix, eos_token_id=never, max_new_tokens=tokens)

    def naive():
        outputs["naive"] = generate_captions_naive(lm, prefix, eos_token_id=never, max_new_tokens=tokens)

    fast()
    fast_times, naive_times = [], []
    for _ in range(2):  # interleaved, so both see the same background load
        for _ in range(3):
            fast_times.append(timed(fast, device, min_reps=1, min_seconds=0.0, warmup=0))
        naive_times.append(timed(naive, device, min_reps=1, min_seconds=0.0, warmup=0))
    fast_s, naive_s = statistics.median(fast_times), statistics.median(naive_times)
    same = outputs["fast"] == outputs["naive"]
    rows_differ = sum(a != b for a, b in zip(outputs["fast"], outputs["naive"]))
    n_tok = 32 * tokens
    return {"figures": [
        figure(f"Caption generation, demo GPT-2 {DEFAULT_LM_CFG}, batch 32, {tokens} tokens each (greedy)",
               "generate_captions (batched, KV cache)", n_tok / fast_s, "generate_captions_naive", n_tok / naive_s,
               "tokens/s", target=10.0, ratio_label="speed-up",
               note=f"identical output tokens: {same} ({rows_differ} of 32 rows differ); median "
                    f"{fast_s:.3f} s vs {naive_s:.2f} s per batch, 2 interleaved rounds")]}
