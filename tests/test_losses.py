"""queue_infonce against hand-computed values, the plain reference, and gradcheck."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eimctl.runtime.errors import EimError
from eimctl.eim.losses import infonce_reference, last_token, mean_pool, queue_infonce
from eimctl.eim.queue_store import open_queue, write_queue

# Three unit keys in the plane: east, north, west.
HAND_KEYS = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=np.float32)
# Un-normalised queries: q0 points east (norm 2), q1 points north-east (norm √2).
HAND_QUERY = [[2.0, 0.0], [1.0, 1.0]]
HAND_POSITIVE = [0, 1]
TAU = 0.5


def softmax(logits: list[float]) -> list[float]:
    exps = [math.exp(x) for x in logits]
    return [e / sum(exps) for e in exps]


def hand_logits() -> tuple[list[float], list[float]]:
    a = 1 / math.sqrt(2)
    # q̂0 = (1, 0): cosines with the keys are 1, 0, -1; q̂1 = (a, a): a, a, -a.
    return [1 / TAU, 0.0, -1 / TAU], [a / TAU, a / TAU, -a / TAU]


def test_loss_matches_closed_form():
    logits0, logits1 = hand_logits()
    a = 1 / math.sqrt(2)
    # L0 = -1/τ + log(e^{1/τ} + 1 + e^{-1/τ});  L1 = log(2 + e^{-2a/τ}) since its positive logit is a/τ.
    loss0 = -1 / TAU + math.log(math.exp(1 / TAU) + 1 + math.exp(-1 / TAU))
    loss1 = math.log(2 + math.exp(-2 * a / TAU))
    expected = (loss0 + loss1) / 2
    assert expected == pytest.approx((-math.log(softmax(logits0)[0]) - math.log(softmax(logits1)[1])) / 2)
    query = torch.tensor(HAND_QUERY)
    positive = torch.tensor(HAND_POSITIVE)
    for chunk_rows in (1, 2, 3):
        loss = queue_infonce(query, HAND_KEYS, positive, temperature=TAU, chunk_rows=chunk_rows)
        assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert infonce_reference(query, torch.from_numpy(HAND_KEYS), positive, TAU).item() == pytest.approx(expected)


def test_default_temperature_closed_form():
    # Query exactly between the positive (east) and north: logits cos45°/τ, cos45°/τ, -cos45°/τ with τ = 0.07.
    a = 1 / math.sqrt(2) / 0.07
    loss = queue_infonce(torch.tensor([[3.0, 3.0]]), HAND_KEYS, torch.tensor([0]))
    assert loss.item() == pytest.approx(-a + math.log(2 * math.exp(a) + math.exp(-a)), rel=1e-6)


def test_gradient_matches_hand_derivation():
    logits0, logits1 = hand_logits()
    p0, p1 = softmax(logits0), softmax(logits1)
    batch = 2
    # dL/dq̂_i = (Σ_j p_ij K_j − K_pos) / (τ B);  dL/dq = (I − q̂q̂ᵀ) dL/dq̂ / ‖q‖.
    # Row 0: Σ p K = (p00 − p02, p01); minus east → (p00 − p02 − 1, p01). Projecting out q̂0 = east
    # keeps only the north part, and ‖q0‖ = 2.
    grad0 = [0.0, p0[1] / (TAU * batch) / 2]
    # Row 1: (p10 − p12, p11 − 1)/(τB), minus its component along u = (1, 1)/√2, divided by ‖q1‖ = √2.
    v = [(p1[0] - p1[2]) / (TAU * batch), (p1[1] - 1) / (TAU * batch)]
    along = (v[0] + v[1]) / 2  # (v·u) u has both coordinates equal to (v0 + v1)/2
    grad1 = [(v[0] - along) / math.sqrt(2), (v[1] - along) / math.sqrt(2)]
    expected = torch.tensor([grad0, grad1])

    query = torch.tensor(HAND_QUERY, requires_grad=True)
    queue_infonce(query, HAND_KEYS, torch.tensor(HAND_POSITIVE), temperature=TAU, chunk_rows=2).backward()
    torch.testing.assert_close(query.grad, expected, rtol=1e-5, atol=1e-7)

    reference_query = torch.tensor(HAND_QUERY, requires_grad=True)
    infonce_reference(reference_query, torch.from_numpy(HAND_KEYS), torch.tensor(HAND_POSITIVE), TAU).backward()
    torch.testing.assert_close(reference_query.grad, expected, rtol=1e-5, atol=1e-7)


def test_gradcheck_float64():
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(11, 6, generator=generator, dtype=torch.float64).numpy() * 3
    query = torch.randn(4, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    positive = torch.tensor([3, 0, 10, 3])
    assert torch.autograd.gradcheck(
        lambda q: queue_infonce(q, keys, positive, temperature=0.3, chunk_rows=4), (query,))
    assert torch.autograd.gradcheck(
        lambda q: queue_infonce(q, keys, positive, temperature=0.3, chunk_rows=4, normalise=False), (query,))


@pytest.mark.parametrize("chunk_rows", [1, 7, 36, 37, 100, 65_536])
def test_chunked_equals_reference(chunk_rows):
    generator = torch.Generator().manual_seed(1)
    keys = torch.randn(37, 8, generator=generator)
    query = torch.randn(5, 8, generator=generator)
    positive = torch.tensor([4, 36, 0, 17, 4])  # not the row order, with a repeat
    chunked_query = query.clone().requires_grad_()
    reference_query = query.clone().requires_grad_()
    chunked = queue_infonce(chunked_query, keys.numpy(), positive, chunk_rows=chunk_rows)
    reference = infonce_reference(reference_query, keys, positive)
    chunked.backward()
    reference.backward()
    torch.testing.assert_close(chunked, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked_query.grad, reference_query.grad, rtol=1e-4, atol=1e-6)


def test_tensor_keys_and_prenormalised_queue():
    generator = torch.Generator().manual_seed(2)
    keys = torch.nn.functional.normalize(torch.randn(20, 4, generator=generator), dim=-1)
    query = torch.randn(3, 4, generator=generator)
    positive = torch.tensor([19, 2, 5])
    reference = infonce_reference(query, keys, positive)
    torch.testing.assert_close(queue_infonce(query, keys, positive, chunk_rows=6), reference)
    # Normalising an already normalised queue changes nothing.
    torch.testing.assert_close(queue_infonce(query, keys, positive, chunk_rows=6, normalise=True),
                               queue_infonce(torch.nn.functional.normalize(query, dim=-1), keys, positive,
                                             chunk_rows=6, normalise=False))


def test_float16_memmap_queue(tmp_path):
    generator = torch.Generator().manual_seed(3)
    keys = torch.nn.functional.normalize(torch.randn(50, 16, generator=generator), dim=-1).numpy()
    write_queue(tmp_path / "kb.parquet", keys, [f"s{i}" for i in range(50)], encoder="lm", field="text",
                normalised=True, dtype="float16", data_fingerprint="fp", row_group_rows=16)
    memmap, _ = open_queue(tmp_path / "kb.parquet")
    assert memmap.dtype == np.float16
    query = torch.randn(6, 16, generator=generator, requires_grad=True)
    positive = torch.tensor([49, 0, 7, 7, 30, 1])
    loss = queue_infonce(query, memmap, positive, chunk_rows=9)
    loss.backward()
    reference_query = query.detach().clone().requires_grad_()
    reference = infonce_reference(reference_query, torch.from_numpy(memmap.astype(np.float32)), positive)
    reference.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(query.grad, reference_query.grad, rtol=1e-4, atol=1e-6)


def test_low_precision_query_gets_float32_loss_and_own_dtype_grad():
    keys = np.eye(4, dtype=np.float32)
    query = torch.randn(2, 4).to(torch.bfloat16).requires_grad_()
    loss = queue_infonce(query, keys, torch.tensor([1, 2]))
    loss.backward()
    assert loss.dtype == torch.float32 and query.grad.dtype == torch.bfloat16


def test_no_grad_forward_gives_the_same_loss():
    query = torch.randn(2, 2, requires_grad=True)
    with torch.no_grad():
        evaluated = queue_infonce(query, HAND_KEYS, torch.tensor([0, 2]), chunk_rows=2)
    trained = queue_infonce(query, HAND_KEYS, torch.tensor([0, 2]), chunk_rows=2)
    assert not evaluated.requires_grad and trained.requires_grad
    torch.testing.assert_close(evaluated, trained.detach())


def test_bad_inputs_are_explained():
    with pytest.raises(EimError, match="width 3 does not match the key queue width 2"):
        queue_infonce(torch.randn(2, 3), HAND_KEYS, torch.tensor([0, 1]))
    with pytest.raises(EimError, match="queue index 3 is outside the key queue's 3 rows"):
        queue_infonce(torch.randn(2, 2), HAND_KEYS, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="positive must have shape"):
        queue_infonce(torch.randn(2, 2), HAND_KEYS, torch.tensor([0]))


def test_mean_pool_and_last_token():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    torch.testing.assert_close(mean_pool(hidden, mask), torch.stack([hidden[0, :3].mean(0), hidden[1, 0]]))
    torch.testing.assert_close(last_token(hidden, mask), torch.stack([hidden[0, 2], hidden[1, 0]]))
    left_padded = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1]])
    torch.testing.assert_close(last_token(hidden, left_padded), hidden[:, 3])
    with pytest.raises(ValueError, match="no 1s"):
        last_token(hidden, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]))


def test_key_norms_are_measured_once_per_frozen_queue_and_again_after_a_change():
    """The inverse key norms are cached per queue; an in-place edit or a writable array is re-measured."""
    generator = torch.Generator().manual_seed(5)
    keys = torch.randn(30, 8, generator=generator) * 3  # not unit rows: the norms matter
    query = torch.randn(4, 8, generator=generator)
    positive = torch.tensor([0, 5, 29, 5])
    first = queue_infonce(query, keys, positive, chunk_rows=7)
    torch.testing.assert_close(first, infonce_reference(query, keys, positive))
    keys[3] *= -5  # in place: the cached norms must not be reused
    torch.testing.assert_close(queue_infonce(query, keys, positive, chunk_rows=7),
                               infonce_reference(query, keys, positive))
    writable = keys.numpy().copy()
    queue_infonce(query, writable, positive, chunk_rows=7)
    writable[10] *= 4
    torch.testing.assert_close(queue_infonce(query, writable, positive, chunk_rows=7),
                               infonce_reference(query, torch.from_numpy(writable), positive))
    frozen = writable.copy()
    frozen.flags.writeable = False
    torch.testing.assert_close(queue_infonce(query, frozen, positive, chunk_rows=7),
                               queue_infonce(query, frozen, positive, chunk_rows=30))


def test_default_chunk_rows_depend_on_the_device():
    from eimctl.eim.losses import CPU_CHUNK_ROWS, GPU_CHUNK_ROWS, default_chunk_rows
    assert default_chunk_rows("cpu") == CPU_CHUNK_ROWS and default_chunk_rows("cuda") == GPU_CHUNK_ROWS
    keys = torch.nn.functional.normalize(torch.randn(CPU_CHUNK_ROWS + 5, 4), dim=-1)
    query, positive = torch.randn(3, 4), torch.tensor([0, CPU_CHUNK_ROWS, CPU_CHUNK_ROWS + 4])
    torch.testing.assert_close(queue_infonce(query, keys, positive), infonce_reference(query, keys, positive))
