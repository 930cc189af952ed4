"""The pieces of many-process runs that need no process group: the world from the environment, the shares of a
global batch and their loss scales, and the start-up checks."""
import random

import pytest
import torch

from eimctl.runtime import distributed
from eimctl.runtime.distributed import DistConfig, World, shard_of, world_from_env
from eimctl.runtime.errors import EimError
from eimctl.train.sharding import Sharding, check_micro_batch, scaled


def test_the_world_comes_from_torchrun_then_slurm_then_nothing():
    assert world_from_env({}) == World()
    assert world_from_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}) == World(3, 1, 4, "torchrun")
    slurm = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"}
    assert world_from_env(slurm) == World(5, 1, 8, "slurm")
    # srun torchrun: torchrun's variables win
    assert world_from_env({**slurm, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}) == World(0, 0, 2, "torchrun")
    assert world_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == World()  # one task: a plain process
    with pytest.raises(EimError, match="RANK='x' is not an integer"):
        world_from_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_slurm_tasks_without_a_master_address_are_one_error(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    with pytest.raises(EimError, match="SLURM started 8 tasks but MASTER_ADDR is not set") as error:
        distributed.start(DistConfig(), torch.device("cpu"))
    assert "examples/launch/" in error.value.line()


def test_shares_are_strided_and_a_rank_without_samples_gets_a_weightless_copy():
    assert shard_of([7, 8, 9], World(0, 0, 2)) == ([7, 9], False)
    assert shard_of([7, 8, 9], World(1, 0, 2)) == ([8], False)
    assert shard_of([7], World(1, 0, 2)) == ([7], True)  # the pad: a copy of the first sample


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_scaled_shares_add_up_to_the_global_mean(world_size):
    """Σ over ranks and micro-batches of (scale × share mean), averaged over ranks as DDP averages gradients,
    equals the global mean — per sample and per token — on random uneven batches, including empty shares."""
    rng = random.Random(world_size)
    counts = [rng.randint(1, 9) for _ in range(40)]
    token_loss = [[rng.random() for _ in range(c)] for c in counts]
    sample_loss = [rng.random() for _ in counts]
    for size in (1, 2, 3, 7, 12):
        batch = rng.sample(range(40), size)
        true_tokens = sum(sum(token_loss[i]) for i in batch) / sum(counts[i] for i in batch)
        true_samples = sum(sample_loss[i] for i in batch) / size
        got_tokens = got_samples = 0.0
        for rank in range(world_size):
            for micro in (0, 1):
                for share in Sharding(World(rank, 0, world_size), counts, micro).shares(batch):
                    mean_tokens = sum(sum(token_loss[i]) for i in share.indices) / sum(counts[i] for i in share.indices)
                    mean_samples = sum(sample_loss[i] for i in share.indices) / len(share.indices)
                    out = scaled({"loss_base": torch.tensor(mean_tokens, dtype=torch.float64),
                                  "loss_st": torch.tensor(mean_samples, dtype=torch.float64)}, share)
                    got_tokens += out["loss_base"].item() / world_size / 2
                    got_samples += out["loss_st"].item() / world_size / 2
        assert got_tokens == pytest.approx(true_tokens, abs=1e-12)
        assert got_samples == pytest.approx(true_samples, abs=1e-12)


def test_one_process_without_micro_batches_is_not_scaled():
    [share] = Sharding(World(), [3, 4], 0).shares([1, 0])
    assert share.indices == [1, 0] and share.scale == {}
    named = {"loss_base": torch.tensor(1.5)}
    assert scaled(named, share) is named


def test_batches_that_cannot_be_split_are_refused():
    with pytest.raises(EimError, match="train.batch_size=1 is smaller than the 2 processes launched"):
        check_micro_batch(1, World(0, 0, 2), 0)
    with pytest.raises(EimError, match="not a multiple of 2 processes x train.micro_batch_size=3"):
        check_micro_batch(8, World(0, 0, 2), 3)
    check_micro_batch(8, World(0, 0, 2), 2)


def test_a_config_that_differs_between_ranks_stops_every_rank(monkeypatch):
    monkeypatch.setattr(distributed, "gather_objects", lambda value: ["aaaa", value, "aaaa"])
    distributed.check_same_everywhere("aaaa", "the config fingerprint")
    with pytest.raises(EimError, match="the config fingerprint differs between ranks: rank 1 has 'bbbb'"):
        distributed.check_same_everywhere("bbbb", "the config fingerprint")
