"""Many processes under torchrun or srun: who this process is, and the few collectives eimctl needs.

    world = start(config.dist, device)      # a process group only when the world size is above 1
    local = shard_of(global_indices, world) # this rank's strided share of the global batch
    ...
    finish()                                # barrier, then destroy the process group

One code path: with one process (a plain run, or `torchrun --nproc_per_node 1`) nothing here
creates a process group and every helper is the identity, so the result is bit for bit a plain
run's. The world comes from torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE) or, under
`srun`, from SLURM's (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS), which are written back as the
torchrun names (as open_clip does); torchrun's win when both are there (`srun torchrun`).
Backend: nccl on CUDA, gloo on CPU. Rank 0 alone writes artifacts (`is_writer`).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from eimctl.runtime.errors import EimError

SLURM_NAMES = {"RANK": "SLURM_PROCID", "LOCAL_RANK": "SLURM_LOCALID", "WORLD_SIZE": "SLURM_NTASKS"}
EXAMPLES = "examples/launch/"


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    launcher: str = "none"  # torchrun | slurm | none

    @property
    def distributed(self) -> bool:
        return self.size > 1


@dataclass
class DistConfig:
    """Many processes (torchrun, srun): how, not what. Never fingerprinted, so a stage finished on 8 GPUs is
    complete on 1 (README: Many GPUs)."""
    strategy: str = "auto"            # auto (ddp when there are several processes) | ddp | fsdp (FSDP2 fully_shard)
    backend: str = "auto"             # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    timeout_minutes: float = 60.0     # collectives' timeout (rank 0 may build a feature cache meanwhile)
    checkpoint_format: str = "full"   # full (rank 0 writes whole tensors) | sharded (torch.distributed.checkpoint;
                                      # needs strategy=fsdp)
    fsdp_reshard_after_forward: bool = True


_current = World()


def check_strategy(dist_cfg) -> None:
    """One line, before anything is written, for a dist config that cannot run."""
    if dist_cfg.checkpoint_format == "sharded" and dist_cfg.strategy != "fsdp":
        raise EimError(f"dist.checkpoint_format=sharded needs dist.strategy=fsdp (it is {dist_cfg.strategy})",
                       where="dist.checkpoint_format",
                       hint="add dist.strategy=fsdp, or use dist.checkpoint_format=full")


def world_from_env(env: dict | None = None) -> World:
    """The world this process belongs to, read from torchrun's or SLURM's variables (one process if neither)."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env and "RANK" in env:
        return World(_int(env, "RANK"), _int(env, "LOCAL_RANK", "0"), _int(env, "WORLD_SIZE"), "torchrun")
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in env:
        return World(_int(env, "SLURM_PROCID"), _int(env, "SLURM_LOCALID", "0"), _int(env, "SLURM_NTASKS"), "slurm")
    return World()


def _int(env, name: str, default: str | None = None) -> int:
    value = env.get(name, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise EimError(f"environment variable {name}={value!r} is not an integer",
                       hint="launch with torchrun or srun, or unset it for a single process") from None


def current() -> World:
    """The world set by `start` (one process before it, or when nothing was launched)."""
    return _current


def is_writer() -> bool:
    """True in the process that writes artifacts: the only one, or rank 0."""
    return _current.rank == 0 if _current.distributed else world_from_env().rank == 0


def start(dist_cfg, device: torch.device | None = None) -> World:
    """Join the process group when the world size is above 1 (else do nothing); returns the world."""
    global _current
    world = world_from_env()
    if not world.distributed or torch.distributed.is_initialized():
        _current = world
        return world
    if world.launcher == "slurm":
        _from_slurm(world)
    backend = dist_cfg.backend if dist_cfg.backend != "auto" else (
        "nccl" if device is not None and device.type == "cuda" else "gloo")
    if device is not None and device.type == "cuda":
        _check_gpus(world)
        torch.cuda.set_device(world.local_rank)
    timeout = timedelta(minutes=dist_cfg.timeout_minutes)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restart in ("", "0"):
        torch.distributed.init_process_group(backend, timeout=timeout, rank=world.rank, world_size=world.size)
    else:  # after `torchrun --max-restarts`: the store still holds the dead attempt's addresses; keep apart from them
        store, _, _ = next(torch.distributed.rendezvous("env://", rank=world.rank, world_size=world.size,
                                                        timeout=timeout))
        torch.distributed.init_process_group(backend, store=torch.distributed.PrefixStore(f"restart-{restart}/", store),
                                             timeout=timeout, rank=world.rank, world_size=world.size)
    _current = world
    return world


def _from_slurm(world: World) -> None:
    if "MASTER_ADDR" not in os.environ:
        raise EimError(f"SLURM started {world.size} tasks but MASTER_ADDR is not set",
                       hint=f"export MASTER_ADDR and MASTER_PORT in the batch script (see {EXAMPLES})")
    os.environ.setdefault("MASTER_PORT", "29500")
    for name, slurm in SLURM_NAMES.items():
        os.environ[name] = os.environ[slurm]


def _check_gpus(world: World) -> None:
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world.local_rank + 1))
    if per_node > torch.cuda.device_count():
        raise EimError(f"{per_node} processes per node but {torch.cuda.device_count()} GPUs are visible",
                       hint="start one process per GPU (--nproc_per_node, --ntasks-per-node)")


def device_for(device: torch.device) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK on CUDA under a launcher, else `device` unchanged."""
    if device.type == "cuda" and _current.distributed and device.index is None:
        return torch.device("cuda", _current.local_rank)
    return device


def barrier() -> None:
    if _current.distributed:
        torch.distributed.barrier()


def finish() -> None:
    """A clean exit of every rank: wait for all, then leave the process group (no-op with one process)."""
    global _current
    if _current.distributed and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    _current = World()


def leave() -> None:
    """Leave the process group without waiting for the other ranks (after an error on this rank, when a
    barrier could wait forever); the launcher stops the rest."""
    global _current
    if _current.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _current = World()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (a new tensor; `tensor` itself when there is one process)."""
    if not _current.distributed:
        return tensor
    total = tensor.detach().clone()
    torch.distributed.all_reduce(total)
    return total


def broadcast_object(value):
    """Rank 0's `value` on every rank."""
    if not _current.distributed:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    if not _current.distributed:
        return [value]
    out = [None] * _current.size
    torch.distributed.all_gather_object(out, value)
    return out


def shard_of(indices: list[int], world: World | None = None) -> tuple[list[int], bool]:
    """(this rank's strided share `indices[rank::W]`, whether it is a zero-weight pad). A rank left without
    samples (a last batch smaller than W) gets one copy of the first sample, which must weigh nothing."""
    world = world or _current
    local = indices[world.rank::world.size]
    if local or not indices:
        return local, False
    return indices[:1], True


def check_same_everywhere(value: str, what: str) -> None:
    """Stop every rank with one line when a rank's `value` (e.g. the config fingerprint) differs from rank 0's."""
    values = gather_objects(value)
    odd = [rank for rank, v in enumerate(values) if v != values[0]]
    if odd:
        raise EimError(f"{what} differs between ranks: rank {odd[0]} has {values[odd[0]]!r}, rank 0 {values[0]!r}",
                       hint="launch every rank with the same config files and overrides")


@contextlib.contextmanager
def writer_first():
    """Rank 0 runs the block first (building a cache or a sidecar), the other ranks after it (reading them)."""
    if not is_writer():
        barrier()
    try:
        yield
    finally:
        if is_writer():
            barrier()


def distributed_record(config, train) -> dict:
    """How a step ran, for its manifest (not part of any fingerprint)."""
    world = _current
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world.size)) if world.distributed else 1
    strategy = config.dist.strategy if config.dist.strategy != "auto" else ("ddp" if world.distributed else "none")
    backend = torch.distributed.get_backend() if world.distributed else "none"
    return {"world_size": world.size, "nodes": max(1, world.size // max(per_node, 1)), "strategy": strategy,
            "backend": backend, "global_batch": train.batch_size,
            "per_rank_batch": -(-train.batch_size // world.size), "micro_batch": train.micro_batch_size,
            "launcher": world.launcher}


def check_shared(folder, what: str) -> None:
    """Stop every rank with one line when some rank cannot see a file rank 0 wrote in `folder` (a run directory
    or queue store on node-local disks). No-op with one process."""
    if not _current.distributed:
        return
    import socket
    import uuid
    from pathlib import Path

    from eimctl.runtime.faults import unshared_view

    path = Path(folder) / f".rendezvous-{broadcast_object(uuid.uuid4().hex)}"
    if is_writer():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(socket.gethostname(), encoding="utf-8")
    barrier()
    seen = gather_objects((unshared_view(path).is_file(), socket.gethostname()))
    barrier()
    if is_writer():
        path.unlink(missing_ok=True)
    blind = [(rank, host) for rank, (ok, host) in enumerate(seen) if not ok]
    if blind:
        rank, host = blind[0]
        raise EimError(f"rank {rank} on {host} cannot see {path.name} that rank 0 wrote in {folder}: {what} must be "
                       "on a file system shared by all nodes", hint="put the run directory and the queue store on "
                                                                    "shared storage (NFS, Lustre, ...)")
