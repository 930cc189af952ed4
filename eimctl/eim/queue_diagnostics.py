"""Diagnostics of a key queue [N, d]: near-duplicate keys, anisotropy, and the floor of its InfoNCE.

    near-duplicate rate  fraction of rows whose most similar OTHER row has cosine > a threshold
    mean cosine          mean_i cos(K_i, K̄), K̄ the mean unit key (0: keys spread out, 1: all alike)
    floor loss           mean_i of InfoNCE with query = K_i: logsumexp_j(K̂_i·K̂_j/τ) − K̂_i·K̂_i/τ,
                         the loss of a query that reproduces its own key exactly; it lies in
                         [0, log N], and log N is what a query that cannot tell the keys apart gets

Near-duplicates and the floor need each row against the whole queue (N²·d: at COCO scale,
566,747 rows, far too much for a CPU), so they are estimated on a seeded sample of at most
`most_rows` rows, each compared with all N rows streamed in chunks; with N ≤ `most_rows` the
sample is every row and the values are exact. The mean cosine is always exact (one pass).

    diagnostics = diagnose_queue(keys, duplicate_cosine=0.999, most_rows=4096)
    print(diagnostics.line("kt")); manifest["diagnostics"]["kt"] = diagnostics.as_dict()
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SAMPLE_SEED = 0        # the same rows are sampled on every build of the same queue
CHUNK_ROWS = 8_192


@dataclass(frozen=True)
class QueueDiagnostics:
    rows: int                  # N
    sampled_rows: int          # rows the near-duplicate rate and the floor were measured on
    duplicate_cosine: float    # the near-duplicate threshold
    duplicate_rate: float
    mean_cosine: float
    floor_loss: float
    log_rows: float            # log N
    temperature: float

    @property
    def indistinguishable(self) -> bool:
        """Even a query equal to its own key gets more than half the loss of a blind guess."""
        return self.floor_loss > 0.5 * self.log_rows

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def line(self, name: str) -> str:
        scope = (f"exact over all {self.rows:,} rows" if self.sampled_rows == self.rows
                 else f"estimated on {self.sampled_rows:,} of {self.rows:,} rows")
        return (f"{name}: near-duplicates {self.duplicate_rate:.2%} (nearest other row cosine > "
                f"{self.duplicate_cosine:g}), mean cosine to the mean key {self.mean_cosine:.3f}, floor loss "
                f"{self.floor_loss:.3f} vs log N {self.log_rows:.3f} (τ = {self.temperature:g}) — {scope}")

    def warning(self, name: str) -> str | None:
        if not self.indistinguishable:
            return None
        return (f"warning: {name}: keys nearly indistinguishable: floor loss {self.floor_loss:.3f} > ½ log N = "
                f"{0.5 * self.log_rows:.3f}, so even a query equal to its own key barely picks it out "
                f"(near-duplicates {self.duplicate_rate:.2%}, mean cosine {self.mean_cosine:.3f})")


def diagnose_queue(keys, *, duplicate_cosine: float = 0.999, most_rows: int = 4_096, temperature: float = 0.07,
                   device: torch.device | str = "cpu", chunk_rows: int = CHUNK_ROWS) -> QueueDiagnostics:
    """The three diagnostics of `keys` [N, d] (numpy array, memmap or Tensor; rows need not be unit)."""
    rows = sample_rows(len(keys), most_rows)
    nearest_other, floor = row_statistics(keys, rows, temperature, device, chunk_rows)
    return QueueDiagnostics(rows=len(keys), sampled_rows=len(rows), duplicate_cosine=duplicate_cosine,
                            duplicate_rate=float((nearest_other > duplicate_cosine).double().mean()),
                            mean_cosine=float(np.linalg.norm(mean_unit_key(keys, device, chunk_rows))),
                            floor_loss=float(floor.double().mean()), log_rows=math.log(len(keys)),
                            temperature=temperature)


def sample_rows(total: int, most: int, seed: int = SAMPLE_SEED) -> np.ndarray:
    """Every row when there are at most `most`, else `most` distinct rows drawn with a fixed seed, sorted."""
    if total <= most:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=most, replace=False))


def unit_rows(block, device: torch.device | str = "cpu") -> torch.Tensor:
    """Rows of `block` L2-normalised, as float64 if they are float64, else float32."""
    tensor = block.detach() if isinstance(block, torch.Tensor) else torch.from_numpy(np.array(block))
    dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    return F.normalize(tensor.to(device=device, dtype=dtype), dim=-1)


def mean_unit_key(keys, device: torch.device | str = "cpu", chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """K̄ = mean_i K̂_i [d] (float64). Since mean_i K̂_i·K̄ = ‖K̄‖², the mean cosine of the keys to K̄
    is ‖K̄‖ itself."""
    total = torch.zeros(keys.shape[1], dtype=torch.float64, device=device)
    for start in range(0, len(keys), chunk_rows):
        total += unit_rows(keys[start:start + chunk_rows], device).sum(dim=0, dtype=torch.float64)
    return (total / max(len(keys), 1)).cpu().numpy()


@torch.no_grad()
def row_statistics(keys, rows: np.ndarray, temperature: float, device: torch.device | str = "cpu",
                   chunk_rows: int = CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of `rows` (queue positions), against every queue row: the largest cosine to another
    row (-inf when N = 1) and the InfoNCE with the row's own key as the query [len(rows)] each."""
    query = unit_rows(keys[rows] if not isinstance(keys, torch.Tensor) else keys[torch.from_numpy(rows)], device)
    positions = torch.from_numpy(rows).to(device)
    nearest_other = torch.full((len(rows),), float("-inf"), dtype=query.dtype, device=device)
    log_normaliser = torch.full_like(nearest_other, float("-inf"))
    for start in range(0, len(keys), chunk_rows):
        cosines = query @ unit_rows(keys[start:start + chunk_rows], device).T
        log_normaliser = torch.logaddexp(log_normaliser, torch.logsumexp(cosines / temperature, dim=1))
        inside = ((positions >= start) & (positions < start + cosines.shape[1])).nonzero().squeeze(1)
        cosines[inside, positions[inside] - start] = float("-inf")  # a row is not its own neighbour
        nearest_other = torch.maximum(nearest_other, cosines.amax(dim=1))
    own_logit = (query * query).sum(dim=1) / temperature
    return nearest_other.cpu(), (log_normaliser - own_logit).cpu()
