"""Caption decoding from a prefix of embeddings (ClipCap-style) with a KV cache.

The projector turns CLIP features into `prefix_embeds` [B, P, D]; a Hugging Face
causal LM continues that prefix. Two decoders live here:

- `generate_captions`: batched greedy or beam search. The prefix runs through the
  LM once (`inputs_embeds`, `use_cache=True`); every later step feeds one token
  per row together with the cache, so the network runs on one new position per
  row instead of the whole sequence.
- `generate_captions_naive`: the reference ClipCap loop, one sample at a time,
  re-running the whole sequence for every token. Kept as the baseline for
  `benchmarks/` and as the oracle the tests compare against.

    from eimctl.models.generate import generate_captions
    token_lists = generate_captions(lm, prefix_embeds, eos_token_id=tok.eos_token_id, beam_size=5)

transformers 5.x renamed the forward argument `past_key_values` to `cache`
(the old name is deprecated until 5.40) and the output field to `.cache`; we use
the new names, falling back to the old ones for LMs that only know those.
Cache objects (`DynamicCache`) are updated in place by each forward, and
`Cache.reorder_cache(index)` index-selects the batch dimension of every layer,
which serves both beam reordering and dropping finished rows.
"""
from __future__ import annotations

import inspect

import torch
from torch import Tensor


def _prepare(lm, prefix_embeds: Tensor) -> Tensor:
    """Match the prefix to the LM's embedding device and dtype (fp16/bf16 LMs reject fp32 input)."""
    weight = lm.get_input_embeddings().weight
    return prefix_embeds.to(device=weight.device, dtype=weight.dtype)


def _cached_forward(lm):
    """`forward(token_ids, cache) -> (logits of the last position, cache)` for this LM.

    transformers 5.x calls the cache `cache`; 4.x models and some custom ones still
    take `past_key_values`, and an unknown keyword would vanish into **kwargs,
    silently decoding without a cache. So look at the signature once.
    """
    parameters = inspect.signature(lm.forward).parameters
    name = "past_key_values" if "past_key_values" in parameters and "cache" not in parameters else "cache"

    def forward(token_ids: Tensor, cache):
        outputs = lm(input_ids=token_ids, use_cache=True, **{name: cache})
        return outputs.logits[:, -1, :], _cache_of(outputs)
    return forward


def _cache_of(outputs):
    return outputs.cache if hasattr(outputs, "cache") else outputs.past_key_values


class _EvalMode:
    """Put the LM in eval mode (dropout off) for the block, then restore its previous mode."""

    def __init__(self, lm):
        self.lm = lm
        self.was_training = lm.training

    def __enter__(self):
        self.lm.eval()

    def __exit__(self, *exc):
        self.lm.train(self.was_training)


def generate_captions(
    lm,
    prefix_embeds: Tensor,
    *,
    eos_token_id: int,
    max_new_tokens: int = 40,
    beam_size: int = 1,
    length_penalty: float = 1.0,
) -> list[list[int]]:
    """Decode one caption per prefix; returns token ids per sample, without the eos token.

    beam_size == 1 is greedy decoding. For beam_size > 1 finished hypotheses are
    ranked by sum(log p) / length ** length_penalty, length counting the eos token
    (length_penalty = 0 ranks by total log-probability).
    """
    if prefix_embeds.dim() != 3:
        raise ValueError(f"prefix_embeds must be [batch, prefix_len, dim], got shape {tuple(prefix_embeds.shape)}")
    if beam_size < 1 or max_new_tokens < 0:
        raise ValueError(f"need beam_size >= 1 and max_new_tokens >= 0 (got {beam_size}, {max_new_tokens})")
    if prefix_embeds.shape[0] == 0 or max_new_tokens == 0:
        return [[] for _ in range(prefix_embeds.shape[0])]
    with _EvalMode(lm), torch.inference_mode():
        prefix = _prepare(lm, prefix_embeds)
        if beam_size == 1:
            return _greedy(lm, prefix, eos_token_id, max_new_tokens)
        return _beam_search(lm, prefix, eos_token_id, max_new_tokens, beam_size, length_penalty)


def _greedy(lm, prefix: Tensor, eos_token_id: int, max_new_tokens: int) -> list[list[int]]:
    batch = prefix.shape[0]
    step_forward = _cached_forward(lm)
    outputs = lm(inputs_embeds=prefix, use_cache=True)
    cache, logits = _cache_of(outputs), outputs.logits[:, -1, :]
    results: list[list[int]] = [[] for _ in range(batch)]
    # `active[r]` is the sample that cache row r belongs to. Finished rows are
    # dropped from the batch (and the cache) so later steps only pay for live rows.
    active = list(range(batch))
    for step in range(max_new_tokens):
        next_tokens = logits.argmax(dim=-1)
        token_list = next_tokens.tolist()  # the one host sync per step: needed to know who stopped
        live = [row for row, token in enumerate(token_list) if token != eos_token_id]
        for row in live:
            results[active[row]].append(token_list[row])
        if step == max_new_tokens - 1 or not live:
            break
        if len(live) < len(active):
            keep = torch.tensor(live, device=prefix.device)
            cache.reorder_cache(keep)
            next_tokens = next_tokens[keep]
            active = [active[row] for row in live]
        logits, cache = step_forward(next_tokens[:, None], cache)
    return results


class _Hypotheses:
    """The best `beam_size` finished captions of one sample, ranked by length-penalised score."""

    def __init__(self, beam_size: int, length_penalty: float):
        self.beam_size = beam_size
        self.length_penalty = length_penalty
        self.ranked: list[tuple[float, list[int]]] = []  # best first

    def normalised(self, sum_logprobs: float, length: int) -> float:
        return sum_logprobs / max(length, 1) ** self.length_penalty

    def add(self, tokens: list[int], sum_logprobs: float, length: int) -> None:
        self.ranked.append((self.normalised(sum_logprobs, length), tokens))
        self.ranked.sort(key=lambda item: item[0], reverse=True)
        del self.ranked[self.beam_size:]

    def is_done(self, best_running_sum: float, running_length: int) -> bool:
        """True once no running beam is expected to beat the worst kept hypothesis.

        Close to Hugging Face's default (early_stopping=False): judge the best
        running beam as if it ended at the next step. For length_penalty <= 0 this
        is exact, since a beam's log-prob only falls as it grows.
        """
        if len(self.ranked) < self.beam_size:
            return False
        return self.normalised(best_running_sum, running_length + 1) <= self.ranked[-1][0]

    def best(self) -> list[int]:
        return self.ranked[0][1]


def _beam_search(lm, prefix: Tensor, eos_token_id: int, max_new_tokens: int,
                 beam_size: int, length_penalty: float) -> list[list[int]]:
    batch, device = prefix.shape[0], prefix.device
    step_forward = _cached_forward(lm)
    outputs = lm(inputs_embeds=prefix, use_cache=True)
    cache = _cache_of(outputs)
    if outputs.logits.shape[-1] < 2 * beam_size:
        raise ValueError(f"beam_size {beam_size} needs a vocabulary of at least {2 * beam_size} tokens")
    # Rows are laid out sample-major: row = slot * beam_size + beam. All beams of a
    # sample start from the same prefix, so the prefix is encoded once and copied.
    cache.batch_repeat_interleave(beam_size)
    logprobs = torch.log_softmax(outputs.logits[:, -1, :].float(), dim=-1).repeat_interleave(beam_size, dim=0)
    vocab = logprobs.shape[-1]
    # Only beam 0 may expand at the first step, else every beam would pick the same top tokens.
    beam_sums = torch.full((batch, beam_size), float("-inf"), device=device)
    beam_sums[:, 0] = 0.0
    histories: list[list[int]] = [[] for _ in range(batch * beam_size)]  # tokens of each row so far
    active = list(range(batch))  # slot -> sample index
    finished = [_Hypotheses(beam_size, length_penalty) for _ in range(batch)]

    for step in range(max_new_tokens):
        slots = len(active)
        candidates = (beam_sums[:, :, None] + logprobs.view(slots, beam_size, vocab)).view(slots, -1)
        # 2*beam candidates: each beam contributes at most one eos candidate, so at
        # least `beam_size` of them continue and the next beam set is always full.
        top_sums, top_index = candidates.topk(2 * beam_size, dim=-1)
        top_beam, top_token = top_index // vocab, top_index % vocab
        top_sums_list, top_beam_list, top_token_list = top_sums.tolist(), top_beam.tolist(), top_token.tolist()

        next_rows, next_tokens, next_sums, keep_slots = [], [], [], []
        for slot, sample in enumerate(active):
            chosen = _continuing_candidates(slot, beam_size, eos_token_id, histories, finished[sample], step,
                                            zip(top_beam_list[slot], top_token_list[slot], top_sums_list[slot]))
            if finished[sample].is_done(chosen[0][2], step + 1) or step == max_new_tokens - 1:
                if step == max_new_tokens - 1:
                    # Out of budget: running beams compete as they are (no eos).
                    for row, token, total in chosen:
                        finished[sample].add(histories[row] + [token], total, step + 1)
                continue
            keep_slots.append(sample)
            for row, token, total in chosen:
                next_rows.append(row)
                next_tokens.append(token)
                next_sums.append(total)

        active = keep_slots
        if not active:
            break
        rows = torch.tensor(next_rows, device=device)
        tokens = torch.tensor(next_tokens, device=device)
        # One index both follows each beam's parent and drops finished samples.
        cache.reorder_cache(rows)
        histories = [histories[row] + [token] for row, token in zip(next_rows, next_tokens)]
        beam_sums = torch.tensor(next_sums, device=device).view(len(active), beam_size)
        logits, cache = step_forward(tokens[:, None], cache)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
    return [hypotheses.best() for hypotheses in finished]


def _continuing_candidates(slot: int, beam_size: int, eos_token_id: int, histories: list, finished: "_Hypotheses",
                           step: int, ranked) -> list[tuple[int, int, float]]:
    """The first `beam_size` non-eos candidates (row, token, sum) of one sample, best first; eos
    candidates that would have made the beam count (rank < beam_size) become finished hypotheses."""
    chosen: list[tuple[int, int, float]] = []
    for rank, (beam, token, total) in enumerate(ranked):
        row = slot * beam_size + beam
        if token == eos_token_id:
            if rank < beam_size:
                finished.add(histories[row], total, step + 1)
        else:
            chosen.append((row, token, total))
        if len(chosen) == beam_size:
            break
    return chosen


def generate_captions_naive(lm, prefix_embeds: Tensor, *, eos_token_id: int,
                            max_new_tokens: int = 40) -> list[list[int]]:
    """Greedy decoding the original ClipCap way: per sample, no cache, full recompute per token.

    Deliberately slow: it is the baseline that `generate_captions` is measured
    against and must agree with token for token.
    """
    results: list[list[int]] = []
    with _EvalMode(lm), torch.inference_mode():
        prefix = _prepare(lm, prefix_embeds)
        embed_tokens = lm.get_input_embeddings()
        for sample in range(prefix.shape[0]):
            sequence = prefix[sample:sample + 1]
            tokens: list[int] = []
            for _ in range(max_new_tokens):
                logits = lm(inputs_embeds=sequence, use_cache=False).logits[0, -1, :]
                token = int(logits.argmax())
                if token == eos_token_id:
                    break
                tokens.append(token)
                token_embed = embed_tokens(torch.tensor([[token]], device=sequence.device))
                sequence = torch.cat([sequence, token_embed], dim=1)
            results.append(tokens)
    return results


def _pick(logits: Tensor, temperature: float, top_p: float, generator) -> Tensor:
    """Greedy when temperature is 0; else nucleus sampling (top-p) at that temperature."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p  # always keeps the most likely token
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs.cpu(), 1, generator=generator).to(logits.device)
    return order.gather(-1, choice).squeeze(-1)


def generate_from_embeds(lm, embeds: Tensor, mask: Tensor, *, eos_token_id: int, max_new_tokens: int,
                         position_offset: int = 0, on_keep=None, temperature: float = 0.0, top_p: float = 1.0,
                         generator=None, on_token=None) -> list[list[int]]:
    """Continue LEFT-padded prompts given as embeddings ([B, S, D], mask [B, S], 1 = real) with a KV cache.

    Positions count real tokens only (a row's first real token is at `position_offset`), so a padded row
    decodes exactly as it would alone. `on_keep(rows)` is called with the kept row indices whenever
    finished rows leave the batch, for callers that hold per-row state of their own (adaption prompts,
    routing weights). Greedy unless `temperature` > 0 (then top-p sampling with `generator`). `on_token(sample,
    token_id)` is called for every token as it is decoded (eos excluded), for callers that stream the text."""
    if embeds.shape[0] == 0 or max_new_tokens == 0:
        return [[] for _ in range(embeds.shape[0])]
    with _EvalMode(lm), torch.inference_mode():
        embeds = _prepare(lm, embeds)
        mask = mask.to(embeds.device).long()
        positions = (mask.cumsum(dim=1) - 1).clamp_min(0) + position_offset
        outputs = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
        cache, logits = _cache_of(outputs), outputs.logits[:, -1, :]
        name = "past_key_values" if "cache" not in inspect.signature(lm.forward).parameters else "cache"
        results: list[list[int]] = [[] for _ in range(embeds.shape[0])]
        active, last = list(range(embeds.shape[0])), positions[:, -1:]
        for step in range(max_new_tokens):
            tokens = _pick(logits, temperature, top_p, generator)
            token_list = tokens.tolist()
            live = [row for row, token in enumerate(token_list) if token != eos_token_id]
            for row in live:
                results[active[row]].append(token_list[row])
                if on_token is not None:
                    on_token(active[row], token_list[row])
            if step == max_new_tokens - 1 or not live:
                break
            if len(live) < len(active):
                keep = torch.tensor(live, device=embeds.device)
                cache.reorder_cache(keep)
                tokens, mask, last = tokens[keep], mask[keep], last[keep]
                active = [active[row] for row in live]
                if on_keep is not None:
                    on_keep(keep)
            mask, last = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1), last + 1
            outputs = lm(input_ids=tokens[:, None], attention_mask=mask, position_ids=last, use_cache=True,
                         **{name: cache})
            cache, logits = _cache_of(outputs), outputs.logits[:, -1, :]
    return results
