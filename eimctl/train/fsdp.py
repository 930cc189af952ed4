"""`dist.strategy=fsdp`: FSDP2 (`fully_shard`) over the LM's blocks and the stage's objective, and its checkpoints.

    objective = shard_model(model, losses, device)   # each LM block, then the root Objective (the rest)
    ... the optimiser is built over the sharded parameters (DTensors) ...
    release(objective)                                # after training: whole tensors on every rank again

The blocks come from `model.lm.base_model.{layers, h, blocks}` (LLaMA-style, GPT-2, ...); a model without
them is sharded as one root group. Every loss runs inside `Objective.forward`, so the root's hooks have
gathered its parameters before `model.project`, `model.run_lm`, ... are called, and each block gathers its
own when the LM calls it (no `register_fsdp_forward_method` needed). Frozen 0-d parameters (CLIP's
logit_scale) stay whole on every rank; a trainable one is refused. After training, `release` leaves the
whole parameters in place, so rank 0 alone can run the diagnostics.

Checkpoints (`dist.checkpoint_format`):

    full     every rank takes part in gathering whole tensors; rank 0 writes the same files as a plain run
             (`trainable.safetensors` under the plain names, the optimiser state keyed like a plain one),
             so the checkpoint resumes at any world size, with fsdp, ddp or one process
    sharded  checkpoints/step-N/dcp/ (torch.distributed.checkpoint: trainable tensors and optimiser state,
             one file per rank) and trainer_state.pt beside it (no optimiser); `dcp.load` reshards, so it
             resumes at any world size, one process included (no process group needed)

`final/trainable.safetensors` is always whole tensors (`full_tensors`, called by every rank).
"""
from __future__ import annotations

import errno
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from eimctl.runtime import faults
from eimctl.runtime.distributed import barrier, current, is_writer
from eimctl.runtime.errors import EimError, disk_full
from eimctl.runtime.progress import log
from eimctl.runtime.weights import WEIGHTS, load_weights
from eimctl.train.checkpoint import DCP, STATE, list_checkpoints, save_checkpoint
from eimctl.train.sharding import Objective

BLOCK_LISTS = ("layers", "h", "blocks")  # under the LM's base model: LLaMA/Qwen/Phi/Gemma, GPT-2, others


def wants_fsdp(dist_cfg, show: bool) -> bool:
    """True when this fit shards with FSDP2; dist.strategy=fsdp with one process says once that it is ignored."""
    if dist_cfg.strategy != "fsdp":
        return False
    if current().distributed:
        return True
    log("warning: dist.strategy=fsdp needs several processes; one process trains unsharded (checkpoints full)",
        show)
    return False


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The LM's list of transformer blocks, found generically; [] when there is none."""
    base = getattr(getattr(model, "lm", None), "base_model", None)
    for name in BLOCK_LISTS:
        blocks = getattr(base, name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return list(blocks)
    return []


def shard_model(model: nn.Module, losses, device: torch.device, reshard_after_forward: bool = True) -> Objective:
    """FSDP2 over each LM block, then over the root Objective (which owns every other parameter), resharding
    after forward as dist.fsdp_reshard_after_forward says."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model.to(device)
    mesh = init_device_mesh(device.type, (current().size,))
    options = {"mesh": mesh, "reshard_after_forward": reshard_after_forward,
               "ignored_params": _scalars(model)}
    for block in transformer_blocks(model):
        fully_shard(block, **options)
    objective = Objective(model, losses)
    fully_shard(objective, **options)
    return objective


def _scalars(model: nn.Module) -> set[nn.Parameter]:
    """0-d parameters (CLIP's logit_scale), which FSDP2 cannot shard: frozen ones stay whole on every rank."""
    scalars = {name: p for name, p in model.named_parameters() if p.ndim == 0}
    trained = sorted(name for name, p in scalars.items() if p.requires_grad)
    if trained:
        raise EimError(f"dist.strategy=fsdp cannot shard the trainable scalar parameter {trained[0]}",
                       where="dist.strategy", hint="use dist.strategy=ddp for this stage")
    return set(scalars.values())


def _dtensor():
    """DTensor's class, or () while its module (half a second to import) is not loaded: then nothing is one."""
    module = sys.modules.get("torch.distributed.tensor")
    return module.DTensor if module is not None else ()


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, _dtensor()) for p in model.parameters())


def full_tensors(model: nn.Module, names: set[str]) -> dict[str, torch.Tensor]:
    """Whole CPU tensors of the parameters named in `names`, in the writer (every other rank gets {}). Under
    FSDP every rank must call it: each sharded tensor is all-gathered, one at a time, in the same order."""
    writer, tensors, dtensor = is_writer(), {}, _dtensor()
    for name, param in model.named_parameters():
        if name not in names:
            continue
        tensor = param.detach()
        if isinstance(tensor, dtensor):
            tensor = tensor.full_tensor()
        if writer:
            tensors[name] = tensor.cpu().contiguous()
    return tensors


def _fqn_order(model: nn.Module, optimizer) -> list[str]:
    """The optimiser's parameters by name, in the order a plain `optimizer.state_dict()` numbers them."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


def full_optimizer_state(model: nn.Module, optimizer) -> dict:
    """The optimiser's state as whole tensors, numbered like a plain `optimizer.state_dict()` (in the writer;
    {} elsewhere). Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    named = get_optimizer_state_dict(model, optimizer, options=_options(full_state_dict=True, cpu_offload=True))
    if not is_writer():
        return {}
    index = {name: i for i, name in enumerate(_fqn_order(model, optimizer))}
    return {"state": {index[name]: value for name, value in named["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in named["param_groups"]]}


def save_full(checkpoints: Path, step: int, model: nn.Module, optimizer, state: dict, keep: int) -> Path:
    """A `full` checkpoint of a sharded model: every rank gathers, rank 0 writes the plain files."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    tensors = full_tensors(model, trainable)
    optimizer_state = full_optimizer_state(model, optimizer)
    folder = checkpoints / f"step-{step:06d}"
    if is_writer():
        folder = save_checkpoint(checkpoints, step, model, {**state, "optimizer": optimizer_state}, keep=keep,
                                 tensors=tensors)
    barrier()
    return folder


def _sharded_state(model: nn.Module, optimizer) -> dict:
    """What a sharded checkpoint holds, as DCP reads and writes it in place: the trainable tensors (this rank's
    shards, or whole tensors in an unsharded model) and the optimiser state keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    trainable = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    return {"model": trainable, "optimizer": get_optimizer_state_dict(model, optimizer)}


def save_sharded(checkpoints: Path, step: int, model: nn.Module, optimizer, state: dict, keep: int) -> Path:
    """checkpoints/step-N/{dcp/, trainer_state.pt}: every rank writes its shards into .step-N.tmp/dcp, then
    rank 0 adds the trainer state and renames the folder into place (a crash leaves no torn checkpoint)."""
    import torch.distributed.checkpoint as dcp

    final, tmp = checkpoints / f"step-{step:06d}", checkpoints / f".step-{step:06d}.tmp"
    if is_writer():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    try:
        dcp.save(_sharded_state(model, optimizer), checkpoint_id=tmp / DCP)
        barrier()
        if is_writer():
            faults.crash_in_checkpoint(step, "weights")
            torch.save({**state, "checkpoint_format": "sharded"}, tmp / STATE)
            faults.crash_in_checkpoint(step, "rename")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    except BaseException as error:  # leave the previous checkpoints only, never a partial folder
        if is_writer():
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            raise disk_full(error, final) from error
        raise
    if is_writer():
        for old in list_checkpoints(checkpoints)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def restore(folder: Path, state: dict, model: nn.Module, optimizer) -> None:
    """Load a checkpoint of any format into `model` and `optimizer`, sharded by FSDP or not; every rank calls
    it. A plain model from a full checkpoint loads exactly as it always has."""
    if (folder / DCP).is_dir():
        _load_sharded(folder / DCP, model, optimizer)
    elif is_sharded(model):
        _load_full_into_shards(folder / WEIGHTS, model)
        _load_full_optimizer(state["optimizer"], model, optimizer)
    else:
        load_weights(model, folder / WEIGHTS)
        optimizer.load_state_dict(state["optimizer"])


def _load_sharded(path: Path, model: nn.Module, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    target = _sharded_state(model, optimizer)
    with warnings.catch_warnings():  # one process reads it without a process group, as intended
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        try:
            dcp.load(target, checkpoint_id=path)
        except Exception as error:  # a tensor missing or of another shape: another architecture or stage
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            raise EimError(f"cannot load the sharded checkpoint: {first}", where=str(path),
                           hint="resume with the config it was made with, or --force to start over") from None
    set_optimizer_state_dict(model, optimizer, target["optimizer"])


def _load_full_into_shards(path: Path, model: nn.Module) -> None:
    """Whole tensors from a safetensors file into a sharded model: each rank keeps its own shard."""
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor, distribute_tensor

    tensors = load_file(path)
    own = dict(model.named_parameters())
    wrong = [n for n in tensors if n not in own or tuple(tensors[n].shape) != tuple(own[n].shape)]
    if wrong:
        raise EimError(f"checkpoint is from another architecture: {wrong[:3]}", where=str(path),
                       hint="use the model config the checkpoint was trained with")
    with torch.no_grad():
        for name, tensor in tensors.items():
            param = own[name]
            tensor = tensor.to(param.device, param.dtype)
            if isinstance(param, DTensor):
                tensor = distribute_tensor(tensor, param.device_mesh, param.placements, src_data_rank=None)
            param.copy_(tensor)


def _load_full_optimizer(saved: dict, model: nn.Module, optimizer) -> None:
    """A plain-numbered optimiser state (whole tensors) into the optimiser of a sharded model."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    order = _fqn_order(model, optimizer)
    named = {"state": {order[i]: value for i, value in saved["state"].items()},
             "param_groups": [{**group, "params": [order[i] for i in group["params"]]}
                              for group in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, named, options=_options(full_state_dict=True))


def release(objective) -> None:
    """After training, every rank holds whole, unsharded parameters again and no forward gathers or
    reshards any more, so rank 0 alone can run the model (diagnostics, the CLIP tuning check)."""
    from torch.distributed.fsdp import FSDPModule

    groups = [m for m in objective.modules() if isinstance(m, FSDPModule)]
    for module in groups:
        module.set_reshard_after_forward(False, recurse=False)
    for module in groups:
        module.unshard()
