"""KV-cached batched decoding (eimctl.models.generate) against the no-cache ClipCap loop, on tiny GPT-2 and Llama."""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from eimctl.models.generate import generate_captions, generate_captions_naive

DIM, PREFIX_LEN, MAX_NEW = 32, 5, 12
NEVER = -1  # an eos id no token can match: decoding runs to max_new_tokens


def tiny_lm(kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        config = GPT2Config(n_embd=DIM, n_layer=2, n_head=2, vocab_size=100, n_positions=64,
                            bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(config)
    config = LlamaConfig(hidden_size=DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matmuls gain nothing from threads, and on a busy 2-core machine OpenMP
    # threads waiting on each other make each op ~100x slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lm(request):
    return tiny_lm(request.param)


def random_prefix(batch: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 3.0 * torch.randn(batch, PREFIX_LEN, DIM, generator=generator)


def common_eos(free_runs: list[list[int]]) -> int:
    """A token that ends the first row early (its 4th token), so rows stop at different steps."""
    return free_runs[0][3]


def test_greedy_cached_matches_naive_and_stops_at_eos(lm):
    prefix = random_prefix(6, seed=1)
    free = generate_captions_naive(lm, prefix, eos_token_id=NEVER, max_new_tokens=MAX_NEW)
    assert all(len(tokens) == MAX_NEW for tokens in free)
    assert generate_captions(lm, prefix, eos_token_id=NEVER, max_new_tokens=MAX_NEW) == free

    eos = common_eos(free)
    # Each row must stop right before the first time it would have produced eos.
    expected = [tokens[:tokens.index(eos)] if eos in tokens else tokens for tokens in free]
    assert generate_captions_naive(lm, prefix, eos_token_id=eos, max_new_tokens=MAX_NEW) == expected
    cached = generate_captions(lm, prefix, eos_token_id=eos, max_new_tokens=MAX_NEW)
    assert cached == expected
    assert all(eos not in tokens for tokens in cached)
    assert len({len(tokens) for tokens in cached}) > 1, "rows should finish at different steps"


def test_beam_size_one_is_greedy(lm):
    prefix = random_prefix(3, seed=2)
    greedy = generate_captions_naive(lm, prefix, eos_token_id=NEVER, max_new_tokens=MAX_NEW)
    assert generate_captions(lm, prefix, eos_token_id=NEVER, max_new_tokens=MAX_NEW, beam_size=1,
                             length_penalty=2.0) == greedy


def sequence_logprob(lm, prefix_row: torch.Tensor, tokens: list[int], eos: int, max_new: int) -> float:
    """Total log-prob the LM gives a decoded caption, counting eos when decoding stopped on it."""
    scored = tokens + ([eos] if len(tokens) < max_new else [])
    with torch.no_grad():
        embeds = lm.get_input_embeddings()(torch.tensor([scored]))
        logits = lm(inputs_embeds=torch.cat([prefix_row[None], embeds], dim=1)).logits[0]
        logprobs = torch.log_softmax(logits.double(), dim=-1)
    # logits at position P-1+i predict scored[i]
    return sum(float(logprobs[PREFIX_LEN - 1 + i, token]) for i, token in enumerate(scored))


def test_beam_search_finds_at_least_greedy_logprob(lm):
    prefix = random_prefix(5, seed=3)
    lm.eval()
    free = generate_captions(lm, prefix, eos_token_id=NEVER, max_new_tokens=MAX_NEW)
    eos = common_eos(free)
    greedy = generate_captions(lm, prefix, eos_token_id=eos, max_new_tokens=MAX_NEW)
    # length_penalty=0 ranks finished beams by total log-prob, the quantity compared here.
    beams = generate_captions(lm, prefix, eos_token_id=eos, max_new_tokens=MAX_NEW, beam_size=4, length_penalty=0.0)
    assert len(beams) == 5
    better = 0
    for row in range(5):
        assert eos not in beams[row]
        assert len(beams[row]) <= MAX_NEW
        greedy_lp = sequence_logprob(lm, prefix[row], greedy[row], eos, MAX_NEW)
        beam_lp = sequence_logprob(lm, prefix[row], beams[row], eos, MAX_NEW)
        assert beam_lp >= greedy_lp - 1e-4, (row, beam_lp, greedy_lp)
        better += beam_lp > greedy_lp + 1e-4
    assert better >= 1, "beam search should improve on greedy for some row"


def test_beam_search_batched_equals_one_sample_at_a_time(lm):
    # Catches cache rows being reordered across samples or finished samples being dropped wrongly.
    prefix = random_prefix(4, seed=4)
    eos = common_eos(generate_captions(lm, prefix, eos_token_id=NEVER, max_new_tokens=MAX_NEW))
    batched = generate_captions(lm, prefix, eos_token_id=eos, max_new_tokens=MAX_NEW, beam_size=3)
    single = [generate_captions(lm, prefix[i:i + 1], eos_token_id=eos, max_new_tokens=MAX_NEW, beam_size=3)[0]
              for i in range(4)]
    assert batched == single


def test_input_dtype_is_matched_and_training_mode_restored():
    lm = tiny_lm("gpt2")
    lm.train()
    prefix = random_prefix(2, seed=5)
    expected = generate_captions(lm, prefix, eos_token_id=NEVER, max_new_tokens=4)
    assert lm.training, "the caller's training mode comes back"
    assert generate_captions(lm, prefix.double(), eos_token_id=NEVER, max_new_tokens=4) == expected
    assert generate_captions(lm, prefix, eos_token_id=NEVER, max_new_tokens=0) == [[], []]


def test_beam_search_matches_transformers_generate(lm):
    # An independent implementation of the same algorithm: Hugging Face's own beam search.
    prefix = random_prefix(4, seed=6)
    lm.eval()
    eos = common_eos(generate_captions(lm, prefix, eos_token_id=NEVER, max_new_tokens=10))
    ours = generate_captions(lm, prefix, eos_token_id=eos, max_new_tokens=10, beam_size=4, length_penalty=1.0)
    for row in range(4):
        output = lm.generate(inputs_embeds=prefix[row:row + 1], num_beams=4, max_new_tokens=10, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos, length_penalty=1.0, early_stopping=False)
        theirs = output[0].tolist()
        while theirs and theirs[-1] == eos:  # eos and the padding after it
            theirs.pop()
        assert ours[row] == theirs
