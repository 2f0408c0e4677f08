"""Which process of a torchrun job this is, and the few collective steps cxrlabel needs.

cxrlabel never launches processes itself: ``torchrun`` (one node or many; Slurm's ``srun
torchrun ...`` and Kubernetes start it the same way) sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in each process's environment, and
:func:`dist_env` reads them. Without those variables a command runs as today, as the only
process (``DistEnv.single()``), and nothing here touches ``torch.distributed``.

The backend follows the device: NCCL for CUDA, gloo for CPU. Nothing runs at import and no
state is global here: the process group that ``torch.distributed`` itself keeps is the only
one, created by :func:`init_process_group` and destroyed by :func:`destroy_process_group`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

log = logging.getLogger(__name__)

# torchrun's variables; all must be present for a distributed run.
_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# Collectives wait this long for a slow or dead peer before failing (torch's default is 30
# minutes for NCCL, which hides a dead rank for half an hour).
DEFAULT_TIMEOUT_S = 600.0


class DistributedError(RuntimeError):
    """A torchrun environment that is inconsistent, or a collective step that failed."""


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job: rank (global), local rank (on its node), world size."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def single(cls) -> DistEnv:
        return cls()

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes run folders, metrics and merged outputs."""
        return self.rank == 0


def dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """The torchrun environment of this process, or a single process when it has none."""
    env = os.environ if environ is None else environ
    present = [k for k in _ENV_KEYS if k in env]
    if not present:
        return DistEnv.single()
    if len(present) != len(_ENV_KEYS):
        missing = sorted(set(_ENV_KEYS) - set(present))
        raise DistributedError(f"torchrun environment incomplete: {', '.join(missing)} not set")
    try:
        rank, world, local = (int(env[k]) for k in _ENV_KEYS)
    except ValueError as exc:
        raise DistributedError(f"torchrun environment not integers: {exc}") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise DistributedError(
            f"torchrun environment inconsistent: RANK={rank}, WORLD_SIZE={world}"
        )
    return DistEnv(rank=rank, world_size=world, local_rank=local)


def backend_for(device: torch.device | str) -> str:
    """NCCL for CUDA devices, gloo for everything else."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def process_device(env: DistEnv, device: torch.device | str) -> torch.device:
    """The device this process uses: on CUDA, the GPU of its local rank."""
    device = torch.device(device)
    if device.type == "cuda" and env.distributed:
        return torch.device("cuda", env.local_rank)
    return device


def init_process_group(
    env: DistEnv, device: torch.device | str, timeout_s: float = DEFAULT_TIMEOUT_S
) -> None:
    """Join the job's process group (torchrun's env:// rendezvous); nothing for one process."""
    import torch.distributed as dist

    if not env.distributed or dist.is_initialized():
        return
    device = process_device(env, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend_for(device)
    dist.init_process_group(
        backend=backend,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    log.info("rank %d of %d joined (%s)", env.rank, env.world_size, backend)


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    """Wait for every rank (nothing for one process)."""
    if env.distributed:
        import torch.distributed as dist

        dist.barrier()


def all_gather_objects(env: DistEnv, value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (``[value]`` for one process). For small things
    (counts, paths, metric dicts); tensors go through ``all_gather`` instead."""
    if not env.distributed:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, value)
    return out


def broadcast_object(env: DistEnv, value: Any, src: int = 0) -> Any:
    """Rank `src`'s `value` on every rank (`value` itself for one process)."""
    if not env.distributed:
        return value
    import torch.distributed as dist

    box = [value if env.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard(n: int, env: DistEnv) -> range:
    """This rank's share of ``range(n)``: contiguous blocks, sizes differing by at most one,
    in rank order, so concatenating the ranks' shares gives ``range(n)`` back."""
    base, extra = divmod(n, env.world_size)
    start = env.rank * base + min(env.rank, extra)
    return range(start, start + base + (1 if env.rank < extra else 0))


def all_reduce_sum(env: DistEnv, values: list[float]) -> list[float]:
    """The sum over ranks of each of `values` (float64; `values` itself for one process)."""
    if not env.distributed:
        return list(values)
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":  # NCCL reduces device tensors only
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def per_process_batch(global_batch: int, env: DistEnv) -> int:
    """Each rank's share of a global batch; the global batch must split evenly."""
    if global_batch % env.world_size:
        raise DistributedError(
            f"batch_size {global_batch} (the global batch) does not split evenly over "
            f"{env.world_size} processes: use a multiple of {env.world_size}"
        )
    return global_batch // env.world_size


@dataclass(frozen=True)
class StepBatch:
    """One rank's images for one optimisation step; `placeholder`: the rank has none of the
    global batch (a last batch smaller than the world) and runs one image with weight 0, so
    every rank still takes part in the step's gradient all-reduce."""

    indices: list[int]
    placeholder: bool = False


def step_batches(
    order: list[int], global_batch: int, env: DistEnv, start_step: int = 0
) -> list[StepBatch]:
    """This rank's batches of an epoch `order`: step s covers ``order[s*B:(s+1)*B]`` (B the
    global batch) and rank r takes its contiguous :func:`shard` of it, so N processes see the
    samples that one process with batch B sees, step for step. Steps before `start_step`
    (done before a resume) are left out."""
    out = []
    for start in range(start_step * global_batch, len(order), global_batch):
        chunk = order[start : start + global_batch]
        mine = [chunk[i] for i in shard(len(chunk), env)]
        out.append(StepBatch(mine) if mine else StepBatch([chunk[0]], placeholder=True))
    return out
