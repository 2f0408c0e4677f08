"""The torchrun environment and the single-process defaults (collectives are tested with two
gloo processes in the training and labelling tests)."""

from __future__ import annotations

import pytest

from cxrlabel.distributed import (
    DistEnv,
    DistributedError,
    all_gather_objects,
    backend_for,
    broadcast_object,
    dist_env,
    shard,
)


def test_no_torchrun_environment_is_one_process() -> None:
    env = dist_env({})
    assert env == DistEnv.single() and not env.distributed and env.is_main


def test_torchrun_environment_is_read() -> None:
    env = dist_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank) == (3, 4, 1)
    assert env.distributed and not env.is_main


@pytest.mark.parametrize(
    "environ",
    [
        {"RANK": "0"},
        {"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"},
        {"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"},
        {"RANK": "0", "WORLD_SIZE": "0", "LOCAL_RANK": "0"},
    ],
)
def test_a_broken_torchrun_environment_is_an_error(environ: dict[str, str]) -> None:
    with pytest.raises(DistributedError, match="torchrun environment"):
        dist_env(environ)


def test_backend_follows_the_device() -> None:
    assert backend_for("cpu") == "gloo" and backend_for("cuda:1") == "nccl"


@pytest.mark.parametrize("n,world", [(0, 2), (1, 2), (7, 3), (10, 2), (5, 8)])
def test_shards_cover_the_inputs_in_order(n: int, world: int) -> None:
    parts = [shard(n, DistEnv(rank, world, rank)) for rank in range(world)]
    assert [i for part in parts for i in part] == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_collectives_are_identity_for_one_process() -> None:
    env = DistEnv.single()
    assert all_gather_objects(env, {"a": 1}) == [{"a": 1}]
    assert broadcast_object(env, 5) == 5
