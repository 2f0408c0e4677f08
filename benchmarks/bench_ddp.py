"""DDP on the CPU: 1 versus 2 gloo processes, images/s and scaling efficiency, measured.

A correctness-and-overhead check on a small (2-core) machine, not a speed claim: each process
gets one intra-op thread (OMP_NUM_THREADS=1), so 1 process uses one core and 2 processes use
two, and the scaling efficiency (2-process rate / (2 x 1-process rate)) shows what DDP's
gradient all-reduce, buffer broadcast and the launcher cost on top of splitting the batch.

Training: the tiny-cpu preset's model (tiny CNN, linear head, 96 px) wrapped as
cxrlabel.training.finetune wraps it (DistributedDataParallel under torchrun), `train_step` in
fp32 on a synthetic in-memory global batch of `--batch` images, each rank its contiguous half.
Each job warms up for `--warmup` steps, then times `--steps` steps between two barriers.
Extraction (`--extract`): `extract_features` with the tiny backbone over a synthetic table made
by cxrlabel.synth, end to end (reading, preprocessing, journal, rank 0's merge).

Every measurement is its own `python -m torch.distributed.run --standalone` job, 1- and
2-process jobs taking turns `--repeats` times, so drifting load on a shared machine hits both
alike; the median and the min-max spread over the repeats are printed.

    .venv/bin/python benchmarks/bench_ddp.py
    .venv/bin/python benchmarks/bench_ddp.py --repeats 5 --steps 50 --extract
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

RESULT = "RESULT "
SRC = Path(__file__).resolve().parents[1] / "src"


# ---------------------------------------------------------------------------------------------
# Inside each torchrun process


def _train_worker(args: argparse.Namespace) -> float:
    from cxrlabel import distributed
    from cxrlabel.config import build_config
    from cxrlabel.data.labels import resolve_labels
    from cxrlabel.models.factory import create_model
    from cxrlabel.training.execution import choose_execution
    from cxrlabel.training.finetune import train_step

    env = distributed.dist_env()
    config = build_config("tiny-cpu")
    labels = resolve_labels(config.labels)
    torch.manual_seed(0)  # the same initial weights on every rank, as a run's seed gives
    model = create_model("tiny", config.head, labels, weights="none", size=config.size)
    step_model: torch.nn.Module = model
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel

        step_model = DistributedDataParallel(model)
    plan = choose_execution("cpu", "fp32")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    size, k = config.size, len(labels)
    images = torch.randn(args.batch, 3, size, size, generator=generator)
    targets = torch.randint(0, 2, (args.batch, k), generator=generator).float()
    mine = distributed.shard(args.batch, env)
    batch = {
        "image": images[mine.start : mine.stop],
        "target": targets[mine.start : mine.stop],
        "mask": torch.ones(len(mine), k),
    }
    for _ in range(args.warmup):
        train_step(step_model, batch, optimizer, plan)
    distributed.barrier(env)
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(step_model, batch, optimizer, plan)
    distributed.barrier(env)
    return args.batch * args.steps / (time.perf_counter() - start)


def _extract_worker(args: argparse.Namespace) -> float:
    from cxrlabel import distributed
    from cxrlabel.data.formats import load_table
    from cxrlabel.models.factory import TINY_PREPROCESSING
    from cxrlabel.training.features import extract_features

    env = distributed.dist_env()
    table = load_table(Path(args.data) / "train.csv")
    prep = replace(TINY_PREPROCESSING, size=args.extract_size)
    distributed.barrier(env)
    start = time.perf_counter()
    extract_features(table, "tiny", "none", prep, Path(args.cache), batch_size=args.batch,
                     progress=False, env=env)  # fmt: skip
    return len(table) / (time.perf_counter() - start)


def worker(args: argparse.Namespace) -> None:
    from cxrlabel import distributed

    env = distributed.dist_env()
    distributed.init_process_group(env, "cpu")
    try:
        rate = _extract_worker(args) if args.worker == "extract" else _train_worker(args)
    finally:
        distributed.destroy_process_group()
    if env.is_main:
        print(RESULT + json.dumps({"images_per_s": rate, "world": env.world_size}), flush=True)


# ---------------------------------------------------------------------------------------------
# The parent: launches the jobs and prints the table


def _job(kind: str, procs: int, args: argparse.Namespace, extra: list[str]) -> float:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
        str(procs), __file__, "--worker", kind, "--batch", str(args.batch), "--steps",
        str(args.steps), "--warmup", str(args.warmup), *extra,
    ]  # fmt: skip
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    done = subprocess.run(command, env=environ, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} job with {procs} process(es) failed:\n{done.stderr[-3000:]}")
    (line,) = [x for x in done.stdout.splitlines() if x.startswith(RESULT)]
    return float(json.loads(line[len(RESULT) :])["images_per_s"])


def _row(name: str, rates: list[float]) -> str:
    median = statistics.median(rates)
    return f"{name:34s} {median:9.1f} {min(rates):9.1f} {max(rates):9.1f}"


def _report(title: str, rates: dict[int, list[float]]) -> None:
    print(f"\n{title}")
    print(f"{'':34s} {'median':>9s} {'min':>9s} {'max':>9s}   images/s")
    for procs, values in rates.items():
        print(_row(f"{procs} gloo process{'es' if procs > 1 else ''}", values))
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(f"scaling efficiency (2-proc / (2 x 1-proc)): {two / (2 * one):.2f}; "
          f"speed-up {two / one:.2f}x")  # fmt: skip


def _measure(
    kind: str, args: argparse.Namespace, extra: Callable[[int, int], list[str]] | None = None
) -> dict[int, list[float]]:
    """Images/s of each repeat for 1 and 2 processes; `extra(procs, repeat)`: job arguments."""
    rates: dict[int, list[float]] = {1: [], 2: []}
    for r in range(args.repeats):
        for procs in (1, 2):  # taking turns: load drift hits both
            rates[procs].append(_job(kind, procs, args, extra(procs, r) if extra else []))
    return rates


def parent(args: argparse.Namespace) -> None:
    from cxrlabel.hardware import cpu_name

    print("correctness-and-overhead check on a 2-core machine, not a speed claim")
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores), torch {torch.__version__}; "
          "OMP_NUM_THREADS=1 per process")  # fmt: skip
    started = time.perf_counter()
    rates = _measure("train", args)
    _report(f"training: tiny-cpu model (tiny CNN, 96 px), fp32, global batch {args.batch}, "
            f"{args.steps} timed steps after {args.warmup} warm-up, {args.repeats} repeats",
            rates)  # fmt: skip
    if args.extract:
        from cxrlabel.synth import write_dataset

        with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
            data = Path(tmp) / "data"
            write_dataset(data, patients=args.extract_patients, size=args.extract_size, seed=0)
            rows = sum(1 for _ in (data / "train.csv").open()) - 1
            common = ["--data", str(data), "--extract-size", str(args.extract_size)]
            rates = _measure(
                "extract", args, lambda p, r: [*common, "--cache", f"{tmp}/cache-{p}-{r}"]
            )
        _report(f"extraction: tiny backbone, {rows} synthetic films at {args.extract_size} px, "
                f"batch {args.batch}, end to end, {args.repeats} repeats", rates)  # fmt: skip
    print(f"\n(total {time.perf_counter() - started:.0f} s, each figure one torchrun job)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="global batch (both kinds)")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per job")
    parser.add_argument("--warmup", type=int, default=10, help="training warm-up steps per job")
    parser.add_argument("--repeats", type=int, default=3, help="jobs per process count")
    parser.add_argument("--extract", action="store_true", help="also time extract_features")
    parser.add_argument("--extract-patients", type=int, default=64, help="synthetic patients")
    parser.add_argument("--extract-size", type=int, default=96, help="film and input size")
    # Set by the parent for the torchrun processes.
    parser.add_argument("--worker", choices=["train", "extract"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
