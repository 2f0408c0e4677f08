"""Training throughput: our training step versus a plain eager fp32 PyTorch loop.

For each model (the tiny-cpu preset, and DenseNet121 at 320 px with weights 'none') this times
`cxrlabel.training.finetune.train_step` under the execution plan `choose_execution` picks for
this machine
(bf16 autocast + channels_last where the CPU has AMX/AVX512-BF16 or on CUDA, else fp32), and
the textbook loop (fp32, contiguous, `model(x)`, loss, backward, Adam step) over the same model
and batch, and prints images/s for both and their ratio.

    .venv/bin/python benchmarks/bench_train.py                 # both models
    .venv/bin/python benchmarks/bench_train.py --steps 3 --models tiny
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch

from cxrlabel.config import build_config
from cxrlabel.data.labels import resolve_labels
from cxrlabel.models.factory import CXRModel, create_model, masked_bce_loss
from cxrlabel.training.execution import ExecutionPlan, choose_execution, cpu_name, to_device
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


def _time_interleaved(
    steps: dict[str, Callable[[], None]], n: int, warmup: int, sync: Callable[[], None]
) -> dict[str, float]:
    """Seconds per loop over `n` steps, the loops taking turns step by step.

    Taking turns spreads any change in machine load (a shared CPU) over both loops alike, so
    their ratio stays meaningful even when the absolute numbers drift.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    totals = dict.fromkeys(steps, 0.0)
    for _ in range(n):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            totals[name] += time.perf_counter() - start
    return totals


def bench(name: str, plan: ExecutionPlan, steps: int, warmup: int) -> None:
    base, batch_size = _model(name)
    batch = _batch(base, batch_size)
    sync = torch.cuda.synchronize if plan.device == "cuda" else (lambda: None)

    ours = copy.deepcopy(base).to(plan.device)
    if plan.channels_last:
        ours = ours.to(memory_format=torch.channels_last)
    ours_opt = torch.optim.Adam(ours.parameters(), lr=1e-4)
    ours_batch = to_device(batch, plan)

    plain = copy.deepcopy(base).to(plan.device).train()
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-4)
    plain_batch = {k: v.to(plan.device) for k, v in batch.items()}

    def plain_step() -> None:
        plain_opt.zero_grad()
        logits = plain(plain_batch["image"])
        masked_bce_loss(logits, plain_batch["target"], plain_batch["mask"]).backward()
        plain_opt.step()

    def our_step() -> None:
        train_step(ours, ours_batch, ours_opt, plan)

    times = _time_interleaved({"ours": our_step, "plain": plain_step}, steps, warmup, sync)
    t_ours, t_plain = times["ours"], times["plain"]
    images = steps * batch_size
    size = base.preprocessing.size
    print(
        f"{name:12s} {size:4d}px batch {batch_size:3d}  "
        f"ours ({plan.precision}{', channels_last' if plan.channels_last else ''}): "
        f"{images / t_ours:8.1f} img/s   plain eager fp32: {images / t_plain:8.1f} img/s   "
        f"ratio {t_plain / t_ours:5.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model and loop")
    parser.add_argument("--warmup", type=int, default=1)
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
        bench(name, plan, args.steps, args.warmup)


if __name__ == "__main__":
    main()
