"""Key-queue diagnostics (build-queues) and the options that are NOT from the paper: multi-positive /
masked InfoNCE (eim.same_image, eim.same_text) and centred keys (eim.center_keys)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from eimctl.cli import app
from eimctl.config import EIMConfig, load_config
from eimctl.data.captions import CaptionSample
from eimctl.eim.losses import (RELATED_MASKED, RELATED_POSITIVE, infonce_reference, queue_infonce,
                               queue_infonce_related)
from eimctl.eim.queue_diagnostics import diagnose_queue, row_statistics, sample_rows
from eimctl.eim.queues import centred_queues
from eimctl.eim import objectives
from eimctl.eim.related import RelatedRows, normalise_caption, related_rows
from eimctl.runtime.errors import EimError
from eimctl.steps import train_stage

runner = CliRunner()

# Five unit keys in 3-d: rows 0 and 1 are the same key; row 4 lies between rows 0 and 2.
HAND_KEYS = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0.6, 0.8, 0]], dtype=np.float64)
# Their cosines, row by row (a row's own cosine is 1).
HAND_COSINES = [[1, 1, 0, 0, 0.6], [1, 1, 0, 0, 0.6], [0, 0, 1, 0, 0.8], [0, 0, 0, 1, 0], [0.6, 0.6, 0.8, 0, 1]]


def hand_floor(temperature: float) -> float:
    """mean_i log Σ_j exp((cos_ij − 1)/τ): the InfoNCE of each key used as its own query."""
    return sum(math.log(sum(math.exp((c - 1) / temperature) for c in row)) for row in HAND_COSINES) / 5


def test_diagnostics_equal_hand_values():
    found = diagnose_queue(HAND_KEYS, duplicate_cosine=0.999, most_rows=100, temperature=1.0, chunk_rows=2)
    assert found.rows == found.sampled_rows == 5
    assert found.duplicate_rate == pytest.approx(2 / 5)        # rows 0 and 1 see each other at cosine 1
    # K̄ = (2.6, 1.8, 1)/5 = (0.52, 0.36, 0.2); the cosines k_i·K̄/‖K̄‖ average to 2.2/5/‖K̄‖ = √0.44.
    assert found.mean_cosine == pytest.approx(math.sqrt(0.44), abs=1e-12)
    assert found.floor_loss == pytest.approx(hand_floor(1.0), abs=1e-12)
    assert found.log_rows == pytest.approx(math.log(5))
    # A lower threshold makes row 4 (cosine 0.8 to row 2) and row 2 near-duplicates too.
    assert diagnose_queue(HAND_KEYS, duplicate_cosine=0.7).duplicate_rate == pytest.approx(4 / 5)


def test_the_warning_fires_only_when_the_floor_exceeds_half_log_n():
    loose = diagnose_queue(HAND_KEYS, temperature=1.0)       # floor 1.138 > ½ log 5 = 0.805
    assert hand_floor(1.0) > 0.5 * math.log(5) and loose.indistinguishable
    assert "keys nearly indistinguishable" in loose.warning("kt")
    sharp = diagnose_queue(HAND_KEYS, temperature=0.07)      # floor ≈ (2 log 2)/5 = 0.277
    assert hand_floor(0.07) < 0.5 * math.log(5) and not sharp.indistinguishable
    assert sharp.warning("kt") is None
    assert sharp.floor_loss == pytest.approx(hand_floor(0.07), abs=1e-9)


def test_sampled_estimate_is_exact_when_the_sample_covers_every_row():
    keys = np.random.default_rng(1).normal(size=(40, 6))
    keys[7] = keys[3] * 2                                     # a duplicate direction
    cosines = F.normalize(torch.from_numpy(keys), dim=-1) @ F.normalize(torch.from_numpy(keys), dim=-1).T
    own = cosines.diagonal().clone()
    floors = torch.logsumexp(cosines / 0.07, dim=1) - own / 0.07
    nearest = cosines.fill_diagonal_(float("-inf")).amax(dim=1)
    exact = diagnose_queue(keys, most_rows=40, chunk_rows=7)
    assert exact.sampled_rows == 40 and "exact over all 40 rows" in exact.line("ke")
    whole = diagnose_queue(keys, most_rows=4096, chunk_rows=40)
    assert whole.duplicate_rate == exact.duplicate_rate and whole.floor_loss == pytest.approx(exact.floor_loss)
    assert exact.floor_loss == pytest.approx(float(floors.mean()), abs=1e-9)
    assert exact.duplicate_rate == pytest.approx(float((nearest > 0.999).double().mean()))
    assert exact.duplicate_rate == pytest.approx(2 / 40)
    sampled = diagnose_queue(keys, most_rows=9, chunk_rows=7)   # 9 seeded rows against all 40
    rows = sample_rows(40, 9)
    assert len(set(rows.tolist())) == 9 and "estimated on 9 of 40 rows" in sampled.line("ke")
    assert sampled.floor_loss == pytest.approx(float(floors[rows].mean()), abs=1e-9)
    nearest_sampled, _ = row_statistics(keys, rows, 0.07, chunk_rows=5)
    torch.testing.assert_close(nearest_sampled, nearest[rows])


def reference_related_infonce(query, keys, positive, positives, masked, temperature):
    """All B×N logits: L_i = -log Σ_{p∈P(i)} exp(s_ip) + log Σ_{j∉M(i)} exp(s_ij), P(i) ∋ i, M(i) ∌ P(i)."""
    logits = F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).T / temperature
    losses = []
    for i, own in enumerate(positive.tolist()):
        wanted = sorted({own} | positives[i])
        kept = [j for j in range(len(keys)) if j not in masked[i] or j in wanted]
        losses.append(torch.logsumexp(logits[i, kept], 0) - torch.logsumexp(logits[i, wanted], 0))
    return torch.stack(losses).mean()


def as_rows_and_roles(positives: list[set], masked: list[set]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p | m) for p, m in zip(positives, masked))
    rows, roles = torch.zeros(len(positives), width, dtype=torch.long), torch.zeros(len(positives), width,
                                                                                   dtype=torch.long)
    for i, (pos, mask) in enumerate(zip(positives, masked)):
        entries = [(r, RELATED_POSITIVE) for r in sorted(pos)] + [(r, RELATED_MASKED) for r in sorted(mask - pos)]
        for column, (row, role) in enumerate(entries):
            rows[i, column], roles[i, column] = row, role
    return rows, roles


@pytest.mark.parametrize("case", ["positive", "masked", "both"])
def test_related_variants_equal_the_plain_reference(case):
    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(11, 4, dtype=torch.float64, generator=generator)
    query = torch.randn(3, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    positive = torch.tensor([0, 5, 9])
    extra = [{1, 2}, {6}, set()]
    positives = extra if case != "masked" else [set(), set(), set()]
    masked = extra if case == "masked" else ([{3}, {7, 8}, {10}] if case == "both" else [set(), set(), set()])
    rows, roles = as_rows_and_roles(positives, masked)
    found = queue_infonce_related(query, keys.numpy(), positive, rows, roles, temperature=0.3, chunk_rows=4)
    expected = reference_related_infonce(query, keys, positive, positives, masked, 0.3)
    assert abs(found.item() - expected.item()) < 1e-6
    assert found.item() != pytest.approx(queue_infonce(query, keys, positive, temperature=0.3).item(), abs=1e-3)
    (found_grad,) = torch.autograd.grad(found, query)
    (expected_grad,) = torch.autograd.grad(expected, query)
    torch.testing.assert_close(found_grad, expected_grad, atol=1e-6, rtol=0)
    assert torch.autograd.gradcheck(
        lambda q: queue_infonce_related(q, keys, positive, rows, roles, temperature=0.3, chunk_rows=4), (query,))


@pytest.mark.parametrize("chunk_rows", [1, 3])
def test_masking_every_heavy_row_stays_exact(chunk_rows):
    keys = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    query = torch.tensor([[0.0, 1.0]], dtype=torch.float64, requires_grad=True)  # far from its own row 2
    rows, roles = torch.tensor([[0, 1]]), torch.tensor([[RELATED_MASKED, RELATED_MASKED]])
    # Rows 0 and 1 hold all but e^-100 of the softmax mass; with one row per chunk, the first two chunks
    # are all masked for this query.
    loss = queue_infonce_related(query, keys, torch.tensor([2]), rows, roles, temperature=0.01,
                                 chunk_rows=chunk_rows)
    assert abs(loss.item()) < 1e-12   # only row 2 is left: its softmax is 1, its loss 0
    loss.backward()
    assert torch.isfinite(query.grad).all() and query.grad.abs().max() < 1e-12


def test_default_options_keep_the_papers_loss():
    samples = [CaptionSample(f"s{i}", f"img{i // 2}", "x.png", "a dog") for i in range(4)]
    assert related_rows(samples, EIMConfig()) is None              # compute_losses takes queue_infonce's path
    generator = torch.Generator().manual_seed(0)
    keys, query = torch.randn(9, 5, generator=generator), torch.randn(3, 5, generator=generator)
    positive = torch.tensor([2, 0, 8])
    plain = queue_infonce(query, keys, positive, chunk_rows=4)
    torch.testing.assert_close(plain, infonce_reference(query, keys, positive))
    nothing = torch.zeros(3, 1, dtype=torch.long)                  # role 0 everywhere: no related rows
    torch.testing.assert_close(queue_infonce_related(query, keys, positive, nothing, nothing, chunk_rows=4), plain)


def test_related_rows_from_image_and_text_groups():
    captions = ["A dog.", "a  DOG", "a cat", "a dog", "a bird"]
    images = ["i0", "i0", "i0", "i1", "i2"]
    samples = [CaptionSample(f"s{k}", image, "x.png", text) for k, (image, text) in enumerate(zip(images, captions))]
    assert normalise_caption("A dog, running.") == "a dog running"
    rows, roles = RelatedRows(samples, same_image="masked", same_text="positive").for_batch(torch.tensor([0, 4, 3]))
    found = [{int(r): int(k) for r, k in zip(rs, ks) if k} for rs, ks in zip(rows, roles)]
    # Row 1 shares sample 0's image AND text: positive wins; row 2 only its image; row 3 only its text.
    assert found == [{1: RELATED_POSITIVE, 2: RELATED_MASKED, 3: RELATED_POSITIVE}, {},
                     {0: RELATED_POSITIVE, 1: RELATED_POSITIVE}]
    with pytest.raises(EimError, match="eim.same_image"):
        load_config(overrides=["eim.same_image=maybe", "eim.duplicate_cosine=2"])


def test_centred_queues_are_read_only_copies():
    keys = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float16)
    keys.flags.writeable = False                                   # like the memory-mapped queues
    (centred,) = centred_queues({"kt": keys}, show=False).values()
    a = 1 / math.sqrt(2)                                           # K̄ = (½, ½): (½, −½) and (−½, ½), re-normalised
    np.testing.assert_allclose(centred, [[a, -a], [-a, a]], atol=1e-6)
    assert centred.dtype == np.float32 and not centred.flags.writeable
    np.testing.assert_array_equal(keys, [[1, 0], [0, 1]])


@pytest.fixture
def eim_overrides(tiny_overrides, tmp_path) -> list[str]:
    return tiny_overrides + [f"eim.queues_dir={tmp_path / 'queues'}", "model.clip.remove_projection=true",
                             "model.clip.tokens=full", "model.projector.type=ffn", "eim.prompt_tokens=2",
                             "train.epochs=1"]


def test_build_queues_prints_and_stores_the_diagnostics(eim_overrides, tmp_path: Path):
    result = runner.invoke(app, ["build-queues", *eim_overrides, "eim.diagnostic_rows=10"])
    assert result.exit_code == 0, result.output
    for name in ("kt", "ke", "kb"):
        (line,) = [l for l in result.output.splitlines() if l.startswith(f"{name}: near-duplicates")]
        assert "estimated on 10 of 48 rows" in line and "floor loss" in line and "mean cosine" in line
    (manifest,) = (tmp_path / "queues").glob("*/manifest.json")
    stored = json.loads(manifest.read_text())["diagnostics"]
    assert set(stored) == {"kt", "ke", "kb"}
    assert stored["kt"]["rows"] == 48 and stored["kt"]["sampled_rows"] == 10
    assert 0 <= stored["kb"]["floor_loss"] <= stored["kb"]["log_rows"] == pytest.approx(math.log(48))
    # The tiny data set repeats "a red square"-style captions, so kt has exact duplicates.
    assert stored["kt"]["duplicate_rate"] > 0


@pytest.mark.parametrize("options, spied", [(["eim.same_image=positive", "eim.same_text=masked"],
                                              (objectives, "queue_infonce_related")),
                                             (["eim.center_keys=true"], (train_stage, "centred_queues"))])
def test_eim_stages_run_with_the_extensions(eim_overrides, tmp_path: Path, monkeypatch, options, spied):
    calls = []
    module, name = spied
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args, **kwargs: calls.append(name) or original(*args, **kwargs))
    overrides = [*eim_overrides, *options, "train.max_steps=2"]
    assert runner.invoke(app, ["build-queues", "-q", *overrides]).exit_code == 0
    for stage in ("st", "lm", "base-ie"):                          # loss_ST, loss_LM, loss_IE in turn
        result = runner.invoke(app, ["train-stage", stage, "--run-dir", str(tmp_path / "run"), "-q", *overrides])
        assert result.exit_code == 0, (stage, result.output)
    assert len(calls) == (3 * 2 if name == "queue_infonce_related" else 3)  # 2 steps a stage, or once a stage
    manifest = json.loads((tmp_path / "run/stages/base-ie/manifest.json").read_text())
    assert math.isfinite(manifest["summary"]["final_loss"])
