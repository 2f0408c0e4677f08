"""Training throughput: our training step versus a plain eager fp32 PyTorch loop, measured.

For each model (the tiny-cpu preset, and DenseNet121 at 320 px with weights 'none') this times,
on the same batch and in the same run:

- ``eager fp32``: the textbook loop (fp32, contiguous, `model(x)`, loss, backward, Adam step);
- ``plan``: `cxrlabel.training.finetune.train_step` under the plan `choose_execution` picks
  (or `--precision` / `--device` ask for);
- ``bf16+channels_last``: the same step forced to bf16 autocast + channels_last, where the plan
  is not that already and bf16 is native (CUDA, AMX/AVX512-BF16; `--all-paths` adds it anyway).

The paths take turns step by step, so a drift in machine load (a shared CPU) hits all alike.
Each first warms up until its step time is stable: the median of its last `--window` steps
differs from the median of the window before by less than `--tolerance` (capped at
`--max-warmup` steps; a path that never settles is reported). Then `--steps` steps per path are
timed, and min / median / max step time, images/s at the median and the ratio of medians
against eager fp32 are printed.

    .venv/bin/python benchmarks/bench_train.py                  # both models
    .venv/bin/python benchmarks/bench_train.py --steps 10 --models tiny
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch

from cxrlabel.config import build_config
from cxrlabel.data.labels import resolve_labels
from cxrlabel.models.factory import CXRModel, create_model, masked_bce_loss
from cxrlabel.training.execution import (
    ExecutionPlan,
    choose_execution,
    cpu_has_fast_bf16,
    cpu_name,
    to_device,
)
from cxrlabel.training.finetune import train_step


def _model(name: str) -> tuple[CXRModel, int]:
    if name == "tiny":
        config = build_config("tiny-cpu")
        labels = resolve_labels(config.labels)
        model = create_model("tiny", config.head, labels, weights="none", size=config.size)
        return model, config.batch_size
    if name == "densenet121":
        labels = resolve_labels("competition")
        return create_model("densenet121", "linear", labels, weights="none", size=320), 16
    raise ValueError(f"unknown model {name!r}")


def _batch(model: CXRModel, batch_size: int) -> dict[str, torch.Tensor]:
    size, k = model.preprocessing.size, len(model.spec.labels)
    generator = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(batch_size, 3, size, size, generator=generator),
        "target": torch.randint(0, 2, (batch_size, k), generator=generator).float(),
        "mask": torch.ones(batch_size, k),
    }


def _timed(step: Callable[[], None], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - start


def warm_up(
    steps: dict[str, Callable[[], None]],
    sync: Callable[[], None],
    *,
    window: int,
    tolerance: float,
    cap: int,
) -> dict[str, int]:
    """Step every path in turns until each one's rolling median step time is stable.

    Returns the warm-up steps each path took; a path still unsettled at `cap` steps gets -cap.
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    settled: dict[str, int] = {}
    while len(settled) < len(steps):
        for name, step in steps.items():
            if name in settled:
                continue
            times[name].append(_timed(step, sync))
            seen = times[name]
            if len(seen) >= 2 * window:
                now = statistics.median(seen[-window:])
                before = statistics.median(seen[-2 * window : -window])
                if abs(now - before) <= tolerance * before:
                    settled[name] = len(seen)
            if name not in settled and len(seen) >= cap:
                settled[name] = -cap
    return settled


def time_interleaved(
    steps: dict[str, Callable[[], None]], n: int, sync: Callable[[], None]
) -> dict[str, list[float]]:
    """Seconds per step for `n` steps of each path, the paths taking turns step by step."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(n):
        for name, step in steps.items():
            times[name].append(_timed(step, sync))
    return times


def _step_fn(
    base: CXRModel, batch: dict[str, torch.Tensor], plan: ExecutionPlan | None, device: str
) -> Callable[[], None]:
    """One training step of a fresh copy of `base`: our train_step under `plan`, or the plain
    eager fp32 loop where `plan` is None."""
    model = copy.deepcopy(base).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    if plan is None:
        on_device = {k: v.to(device) for k, v in batch.items()}

        def plain_step() -> None:
            optimizer.zero_grad()
            logits = model(on_device["image"])
            masked_bce_loss(logits, on_device["target"], on_device["mask"]).backward()
            optimizer.step()

        return plain_step
    if plan.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ready = to_device(batch, plan)
    return lambda: train_step(model, ready, optimizer, plan)


def _label(plan: ExecutionPlan) -> str:
    return f"{plan.precision}{'+channels_last' if plan.channels_last else ''}"


def bench(name: str, plan: ExecutionPlan, args: argparse.Namespace) -> None:
    base, batch_size = _model(name)
    batch = _batch(base, batch_size)
    sync = torch.cuda.synchronize if plan.device == "cuda" else (lambda: None)
    paths = {
        "eager fp32": _step_fn(base, batch, None, plan.device),
        f"plan ({_label(plan)})": _step_fn(base, batch, plan, plan.device),
    }
    native_bf16 = plan.device == "cuda" or cpu_has_fast_bf16()
    if (plan.amp_dtype is None or not plan.channels_last) and (native_bf16 or args.all_paths):
        forced = choose_execution(plan.device, "bf16")
        paths["bf16+channels_last"] = _step_fn(base, batch, forced, plan.device)
    warm = warm_up(paths, sync, window=args.window, tolerance=args.tolerance, cap=args.max_warmup)
    times = time_interleaved(paths, args.steps, sync)
    size = base.preprocessing.size
    print(f"\n{name} at {size} px, batch {batch_size}, {args.steps} timed steps per path")
    print("path                         warm-up   min ms  median ms   max ms    img/s   ratio")
    baseline = statistics.median(times["eager fp32"])
    for path, seconds in times.items():
        median = statistics.median(seconds)
        steps = warm[path]
        warmed = f"{steps:4d}" if steps > 0 else f">{-steps:3d}!"  # ! never settled
        print(
            f"{path:28s} {warmed:>7s} {min(seconds) * 1e3:8.1f} {median * 1e3:10.1f} "
            f"{max(seconds) * 1e3:8.1f} {batch_size / median:8.1f} {baseline / median:6.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per model and path")
    parser.add_argument("--window", type=int, default=5, help="steps per rolling median")
    parser.add_argument("--tolerance", type=float, default=0.05, help="relative change: stable")
    parser.add_argument("--max-warmup", type=int, default=60, help="warm-up steps at most")
    parser.add_argument("--all-paths", action="store_true", help="bf16 even where emulated")
    parser.add_argument("--models", nargs="+", default=["tiny", "densenet121"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    args = parser.parse_args()
    plan = choose_execution(args.device, args.precision)
    print(f"CPU: {cpu_name()} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    if plan.device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}")
    print(f"execution plan: {plan.to_dict()}")
    for name in args.models:
        bench(name, plan, args)


if __name__ == "__main__":
    main()
