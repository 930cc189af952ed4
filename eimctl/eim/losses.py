"""EIM's full-dataset InfoNCE against a frozen key queue, and the pooling that makes queries.

    L_i = -log softmax_j(q̂_i · K̂_j / τ)[positive_i],   j over all N queue rows

N reaches 566,747 at COCO scale, so the B×N logits are never kept: one pass
streams over key chunks with an online log-sum-exp and, when the query needs a
gradient, accumulates Σ_j p_ij K̂_j alongside it, so the backward pass is just
dL/dq̂ = (Σ_j p_ij K̂_j − K̂_pos_i)/(τB). Peak memory is O(B·chunk + chunk·d)
whatever N is, and each key is read once per step.

    keys, _ = open_queue(stage_dir / "kt.parquet", expect_rows=len(train))  # eimctl.eim.queue_store
    loss = queue_infonce(query, keys, batch["index"])   # keys: np.memmap or a (GPU) Tensor

`queue_infonce_related` is the same pass with extra positives or masked rows per query
(eim.same_image, eim.same_text: our extension, not from the paper).
"""
from __future__ import annotations

import warnings
import weakref

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from eimctl.runtime.errors import EimError

DEFAULT_TEMPERATURE = 0.07
# Keys per chunk when none is given (`make bench`). On a CPU, a chunk whose float32 copy stays in
# cache for both matrix products is fastest (2,048 x 768 x 4 B = 6 MiB). On a GPU with the queue in
# its memory, few large chunks mean few kernel launches; streaming a host queue to a GPU uses
# mid-sized chunks so the host-side staging of each copy stays small.
CPU_CHUNK_ROWS = 2_048
GPU_CHUNK_ROWS = 262_144
GPU_HOST_QUEUE_CHUNK_ROWS = 16_384


def default_chunk_rows(device: torch.device | str, keys=None) -> int:
    if torch.device(device).type != "cuda":
        return CPU_CHUNK_ROWS
    on_device = isinstance(keys, Tensor) and keys.device.type == "cuda"
    return GPU_CHUNK_ROWS if keys is None or on_device else GPU_HOST_QUEUE_CHUNK_ROWS


def queue_infonce(query: Tensor, keys: np.ndarray | Tensor, positive: Tensor, *,
                  temperature: float = DEFAULT_TEMPERATURE, chunk_rows: int | None = None,
                  normalise: bool = True) -> Tensor:
    """Mean InfoNCE of `query` [B, d] against every row of the frozen `keys` [N, d].

    `positive` [B] holds each query's row in `keys`. With `normalise`, both the
    queries (with ordinary autograd, so the gradient flows through the norm) and
    the key chunks are L2-normalised; normalising an already normalised queue is
    harmless. Keys may be a numpy array/memmap (any float dtype, read a chunk at
    a time) or a Tensor on any device. The loss is computed in float32 (float64
    if the query is float64) and returned as a float scalar. `chunk_rows`
    defaults to `default_chunk_rows(query.device, keys)`.

    The keys' inverse norms are computed once per queue and kept while the queue
    object lives (for a read-only array such as the memmaps `open_queue` returns,
    or a Tensor until it is modified in place); a writable array is re-measured
    on every call.
    """
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(query.device, keys)
    _check_inputs(query, keys, positive, temperature, chunk_rows)
    compute_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    query = query.to(compute_dtype)
    if normalise:
        query = F.normalize(query, dim=-1)
    positive = positive.to(device=query.device, dtype=torch.long)
    # Inside Function.forward grad mode is always off and needs_input_grad ignores no_grad(),
    # so decide here whether the gradient accumulation is worth doing.
    needs_grad = torch.is_grad_enabled() and query.requires_grad
    # Under bf16 autocast (train.precision=bf16) the products against the queue still run in float32:
    # 566,747 logits scaled by 1/τ need more than bfloat16's 8 mantissa bits.
    with torch.autocast(query.device.type, enabled=False):
        return _QueueInfoNCE.apply(query, positive, keys, temperature, chunk_rows, normalise, needs_grad)


# Roles of the extra queue rows in `queue_infonce_related` (0 = padding).
RELATED_POSITIVE, RELATED_MASKED = 1, 2


def queue_infonce_related(query: Tensor, keys: np.ndarray | Tensor, positive: Tensor, related_rows: Tensor,
                          related_roles: Tensor, *, temperature: float = DEFAULT_TEMPERATURE,
                          chunk_rows: int | None = None, normalise: bool = True) -> Tensor:
    """`queue_infonce` where other queue rows count as positives or leave the denominator.

    Our extension, NOT from the paper (eim.same_image, eim.same_text); with s_ij = q̂_i·K̂_j/τ,

        L_i = -log Σ_{p∈P(i)} exp(s_ip) + log Σ_{j∉M(i)} exp(s_ij)

    P(i) is the query's own row `positive[i]` plus the rows of `related_rows` [B, R] whose role in
    `related_roles` [B, R] is RELATED_POSITIVE; M(i) those marked RELATED_MASKED (role 0 pads).
    Rows must be distinct within a query; an entry naming the query's own row is ignored. The
    denominator is the streamed log-sum-exp of `queue_infonce` over all N rows (memory O(B·chunk)),
    with M(i)'s logits set to -inf in the chunks that hold them: subtracting their mass afterwards
    would lose every digit when they hold nearly all of it. The numerator comes from the gathered
    rows of P(i) with ordinary autograd.
    """
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(query.device, keys)
    _check_inputs(query, keys, positive, temperature, chunk_rows)
    _check_related(related_rows, related_roles, positive, len(keys))
    compute_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    query = query.to(compute_dtype)
    if normalise:
        query = F.normalize(query, dim=-1)
    own = positive.detach().cpu().long().unsqueeze(1)
    rows = torch.cat([own, related_rows.detach().cpu().long()], dim=1)
    roles = torch.cat([torch.full_like(own, RELATED_POSITIVE), related_roles.detach().cpu().long()], dim=1)
    roles[:, 1:][rows[:, 1:] == own] = 0
    excluded = _masked_by_chunk(rows, roles, chunk_rows, query.device)
    needs_grad = torch.is_grad_enabled() and query.requires_grad
    with torch.autocast(query.device.type, enabled=False):
        log_kept = _QueueLogNormaliser.apply(query, keys, temperature, chunk_rows, normalise, needs_grad, excluded)
        gathered = _gather_rows(keys, rows.flatten(), query, normalise).view(*rows.shape, -1)
        logits = torch.einsum("bd,brd->br", query, gathered) / temperature
        not_positive = (roles != RELATED_POSITIVE).to(query.device)
        log_positive = torch.logsumexp(logits.masked_fill(not_positive, float("-inf")), dim=1)
        return (log_kept - log_positive).mean()


def _masked_by_chunk(rows: Tensor, roles: Tensor, chunk_rows: int, device: torch.device) -> dict:
    """{chunk number: (batch positions, columns within the chunk)} of the masked (query, row) pairs."""
    batch_index, column = (roles == RELATED_MASKED).nonzero(as_tuple=True)
    queue_rows = rows[batch_index, column]
    chunk = queue_rows // chunk_rows
    return {number: (batch_index[chunk == number].to(device), (queue_rows[chunk == number] % chunk_rows).to(device))
            for number in chunk.unique().tolist()}


def infonce_reference(query: Tensor, keys: Tensor, positive: Tensor,
                      temperature: float = DEFAULT_TEMPERATURE) -> Tensor:
    """The plain version: all B×N logits at once. For tests and benchmarks only."""
    keys = torch.as_tensor(np.asarray(keys)) if not isinstance(keys, Tensor) else keys
    compute_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    query_unit = F.normalize(query.to(compute_dtype), dim=-1)
    keys_unit = F.normalize(keys.to(device=query.device, dtype=compute_dtype), dim=-1)
    return F.cross_entropy(query_unit @ keys_unit.T / temperature, positive.to(query.device).long())


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of `hidden` [B, L, D] over the positions where `mask` [B, L] is 1 (rows with none give 0)."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)


def last_token(hidden: Tensor, mask: Tensor) -> Tensor:
    """`hidden` [B, L, D] at each row's last position where `mask` [B, L] is 1.

    Written for right padding, but taking the last 1 (not `mask.sum() - 1`)
    keeps it right for left padding too.
    """
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, torch.full_like(positions, -1)).amax(dim=1)
    if bool((last < 0).any()):
        raise ValueError("last_token: a row of the mask has no 1s, so it has no last token")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class _QueueInfoNCE(torch.autograd.Function):
    """InfoNCE for already-normalised queries; keys are frozen and read chunk by chunk.

    The only gradient is dL/dq̂_i = (Σ_j p_ij K̂_j − K̂_pos_i)/(τB), and Σ_j p_ij K̂_j
    can be accumulated during the forward pass with the same online rescaling as
    the log-sum-exp. Doing so reads and converts every key chunk once per step
    instead of twice (forward, then a recomputing backward): at COCO scale on CPU
    that is most of the cost. It is skipped when no gradient is wanted (no_grad, eval).
    """

    @staticmethod
    def forward(ctx, query_unit: Tensor, positive: Tensor, keys, temperature: float, chunk_rows: int,
                normalise: bool, needs_grad: bool) -> Tensor:
        batch = query_unit.shape[0]
        log_normaliser, expected_key = _stream_log_normaliser(query_unit, keys, temperature, chunk_rows,
                                                              normalise, needs_grad)
        positive_keys = _gather_rows(keys, positive, query_unit, normalise)
        positive_logits = (query_unit * positive_keys).sum(dim=1) / temperature
        if needs_grad:
            ctx.save_for_backward(expected_key - positive_keys)
            ctx.scale = 1.0 / (temperature * batch)
        return (log_normaliser - positive_logits).mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        (key_difference,) = ctx.saved_tensors
        return key_difference * (grad_loss * ctx.scale), None, None, None, None, None, None


def _stream_log_normaliser(query_unit: Tensor, keys, temperature: float, chunk_rows: int, normalise: bool,
                           needs_grad: bool, excluded: dict | None = None) -> tuple[Tensor, Tensor | None]:
    """log Σ_j exp(q̂_i·K̂_j/τ) [B] over every queue row in one streamed pass and, with `needs_grad`,
    the softmax-weighted key Σ_j p_ij K̂_j [B, d] (else None). `excluded` ({chunk number: (batch
    positions, columns)}, from _masked_by_chunk) leaves those (query, row) pairs out of both."""
    batch = query_unit.shape[0]
    running_max = torch.full((batch,), float("-inf"), dtype=query_unit.dtype, device=query_unit.device)
    running_sum = torch.zeros_like(running_max)
    running_keys = torch.zeros_like(query_unit)  # Σ_j exp(logit_ij − running_max_i) K̂_j
    scales = _logit_scales(keys, chunk_rows, query_unit, normalise, temperature)
    # One logits buffer for every chunk: a fresh [B, chunk] tensor per chunk costs an allocation,
    # and once glibc has raised its mmap threshold (after any large free) also page faults.
    logits_buffer = torch.empty(batch * min(chunk_rows, len(keys)), dtype=query_unit.dtype,
                                device=query_unit.device)
    for number, (key_chunk, column_scale) in enumerate(_key_chunks(keys, chunk_rows, query_unit, scales)):
        logits = logits_buffer[:batch * len(key_chunk)].view(batch, len(key_chunk))
        torch.mm(query_unit, key_chunk.T, out=logits).mul_(column_scale)
        if excluded is not None and number in excluded:
            logits[excluded[number]] = float("-inf")
        # Online log-sum-exp: rescale what was summed so far whenever a larger logit turns up.
        new_max = torch.maximum(running_max, logits.amax(dim=1))
        if excluded is not None:  # a query whose rows so far were all excluded: keep exp(-inf - -inf) out
            new_max.clamp_min_(torch.finfo(new_max.dtype).min)
        rescale = torch.exp(running_max - new_max)
        weights = logits.sub_(new_max.unsqueeze(1)).exp_()
        running_sum = running_sum * rescale + weights.sum(dim=1)
        if needs_grad:
            # K̂_j = K_j/‖K_j‖: fold the key norms into the weights instead of rescaling the chunk.
            if normalise:
                weights.mul_(column_scale * temperature)
            running_keys.mul_(rescale.unsqueeze(1)).addmm_(weights, key_chunk)
        running_max = new_max
    log_normaliser = running_max + torch.log(running_sum)
    expected_key = running_keys / running_sum.unsqueeze(1) if needs_grad else None  # Σ_j p_ij K̂_j
    return log_normaliser, expected_key


class _QueueLogNormaliser(torch.autograd.Function):
    """log Σ_j exp(q̂_i·K̂_j/τ) [B] for already-normalised queries, j over the rows not `excluded`;
    its gradient is Σ_j p_ij K̂_j / τ."""

    @staticmethod
    def forward(ctx, query_unit: Tensor, keys, temperature: float, chunk_rows: int, normalise: bool,
                needs_grad: bool, excluded: dict) -> Tensor:
        log_normaliser, expected_key = _stream_log_normaliser(query_unit, keys, temperature, chunk_rows,
                                                              normalise, needs_grad, excluded)
        if needs_grad:
            ctx.save_for_backward(expected_key)
            ctx.temperature = temperature
        return log_normaliser

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_log_normaliser: Tensor):
        (expected_key,) = ctx.saved_tensors
        return (expected_key * (grad_log_normaliser / ctx.temperature).unsqueeze(1),
                None, None, None, None, None, None)


def _key_chunks(keys, chunk_rows: int, like: Tensor, scales: Tensor):
    """Yield ([chunk, d] raw keys on `like`'s device and dtype, the chunk's slice of `scales`).

    Chunks that need converting (a float16 memmap, another device) go through
    one reused buffer, so no chunk-sized memory is allocated per step.
    """
    buffer = None
    for start in range(0, len(keys), chunk_rows):
        block = _as_tensor(keys[start:start + chunk_rows])
        if block.device != like.device or block.dtype != like.dtype:
            if buffer is None:
                buffer = torch.empty(min(chunk_rows, len(keys)), keys.shape[1], dtype=like.dtype,
                                     device=like.device)
            block = buffer[:len(block)].copy_(block)
        yield block, scales[start:start + len(block)]


def _as_tensor(block) -> Tensor:
    if isinstance(block, Tensor):
        return block.detach()
    with warnings.catch_warnings():
        # A read-only memmap slice: torch warns it is not writable; we only read it.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(block)


# id(keys) -> (what identifies that state of the keys, {(dtype, device, τ): logit scales})
_SCALE_CACHE: dict[int, tuple[tuple, dict]] = {}


def _logit_scales(keys, chunk_rows: int, like: Tensor, normalise: bool, temperature: float) -> Tensor:
    """Per-key logit scale [N]: 1/(τ‖K_j‖), or 1/τ without `normalise`.

    Scaling the B×chunk logits is far cheaper than writing a normalised copy of
    each chunk, and the scales, a full pass over the queue, are computed once per
    frozen queue (and dtype, device, τ) rather than every step.
    """
    if not normalise:
        return torch.full((len(keys),), 1 / temperature, dtype=like.dtype, device=like.device)
    state = _frozen_state(keys)
    slot = (like.dtype, like.device, temperature)
    if state is not None:
        cached = _SCALE_CACHE.get(id(keys))
        if cached is not None and cached[0] == state and slot in cached[1]:
            return cached[1][slot]
    norms = torch.empty(len(keys), dtype=like.dtype, device=like.device)
    for start in range(0, len(keys), chunk_rows):
        block = _as_tensor(keys[start:start + chunk_rows]).to(device=like.device, dtype=like.dtype)
        torch.linalg.vector_norm(block, dim=1, out=norms[start:start + len(block)])
    scales = norms.clamp_min_(1e-12).mul_(temperature).reciprocal_()
    if state is not None:
        if id(keys) not in _SCALE_CACHE:
            weakref.finalize(keys, _SCALE_CACHE.pop, id(keys), None)
        if _SCALE_CACHE.get(id(keys), (None,))[0] != state:
            _SCALE_CACHE[id(keys)] = (state, {})
        _SCALE_CACHE[id(keys)][1][slot] = scales
    return scales


def _frozen_state(keys) -> tuple | None:
    """What identifies the current contents of `keys`, or None when they may change unseen."""
    if isinstance(keys, Tensor):
        return ("tensor", keys.data_ptr(), tuple(keys.shape), keys.dtype, keys._version)
    if isinstance(keys, np.ndarray) and not keys.flags.writeable:
        return ("array", keys.__array_interface__["data"][0], keys.shape, keys.dtype.str)
    return None


def _gather_rows(keys, rows: Tensor, like: Tensor, normalise: bool) -> Tensor:
    if isinstance(keys, Tensor):
        block = keys.index_select(0, rows.to(keys.device))
    else:
        block = torch.from_numpy(np.ascontiguousarray(keys[rows.cpu().numpy()]))
    block = block.detach().to(device=like.device, dtype=like.dtype)
    return F.normalize(block, dim=-1) if normalise else block


def _check_inputs(query: Tensor, keys, positive: Tensor, temperature: float, chunk_rows: int) -> None:
    if query.ndim != 2 or keys.ndim != 2:
        raise ValueError(f"queue_infonce wants query [B, d] and keys [N, d], got {tuple(query.shape)} "
                         f"and {tuple(keys.shape)}")
    if query.shape[1] != keys.shape[1]:
        raise EimError(f"query width {query.shape[1]} does not match the key queue width {keys.shape[1]}",
                       hint="the queue was built for another model or feature; rebuild it with "
                            "`eimctl build-queues --force` or fix the query head's output size")
    if positive.shape != (query.shape[0],):
        raise ValueError(f"positive must have shape [{query.shape[0]}], got {tuple(positive.shape)}")
    if temperature <= 0 or chunk_rows < 1:
        raise ValueError(f"temperature must be > 0 and chunk_rows >= 1, got {temperature} and {chunk_rows}")
    outside = positive[(positive < 0) | (positive >= keys.shape[0])]
    if outside.numel():
        raise EimError(f"queue index {int(outside[0])} is outside the key queue's {keys.shape[0]} rows",
                       hint="the queue was built from another data set; rebuild it with "
                            "`eimctl build-queues --force`")


def _check_related(rows: Tensor, roles: Tensor, positive: Tensor, queue_rows: int) -> None:
    if rows.ndim != 2 or rows.shape != roles.shape or rows.shape[0] != positive.shape[0]:
        raise ValueError(f"related rows and roles must both be [{positive.shape[0]}, R], got "
                         f"{tuple(rows.shape)} and {tuple(roles.shape)}")
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= queue_rows):
        raise ValueError(f"a related row is outside the key queue's {queue_rows} rows")
