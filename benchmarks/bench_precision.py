"""Held-out AUROC of fp32 versus bf16 training: does bf16 autocast cost accuracy?

Trains the tiny CNN with the learning check's exact data and settings
(tests/training/learning_check.py: 6 epochs of ~460 synthetic films at 96 px, batch 32, cosine
lr) for each seed and precision, scores each best checkpoint on the 250 held-out patients, and
prints per-label AUROC per seed, then mean, std, min and max per precision. It flags bf16 as
losing accuracy when its mean falls below fp32's by more than the seed spread (the larger of
the two standard deviations across seeds): then `choose_execution("cpu", "auto")` must not
pick bf16. Where bf16 is emulated (CPUs without AMX/AVX512-BF16) it is slower but numerically
the same autocast.

    .venv/bin/python benchmarks/bench_precision.py                  # seeds 0-4, fp32 and bf16
    .venv/bin/python benchmarks/bench_precision.py --seeds 8 --precisions bf16
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# The learning check's settings live with its test; run from anywhere, import them from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrlabel.training.execution import cpu_name
from cxrlabel.training.finetune import train
from tests.training.learning_check import (
    LEARN_LABELS,
    held_out_aurocs,
    learning_config,
    learning_datasets,
)


def summarise(results: dict[str, list[dict[str, float]]]) -> bool:
    """Print mean/std/min/max per precision and label; True where bf16 loses beyond noise."""
    print("\nprecision  label               mean    std     min     max   (n seeds)")
    stats: dict[tuple[str, str], tuple[float, float]] = {}
    for precision, runs in results.items():
        for label in LEARN_LABELS:
            values = [r[label] for r in runs]
            mean = statistics.fmean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            stats[precision, label] = (mean, std)
            print(
                f"{precision:9s}  {label:18s}  {mean:.3f}  {std:.3f}  "
                f"{min(values):.3f}  {max(values):.3f}   ({len(values)})"
            )
    if not {"fp32", "bf16"} <= results.keys():
        return False
    loses = False
    for label in LEARN_LABELS:
        (m32, s32), (m16, s16) = stats["fp32", label], stats["bf16", label]
        spread = max(s32, s16)
        beyond = m32 - m16 > spread
        loses |= beyond
        print(
            f"{label}: fp32 - bf16 = {m32 - m16:+.3f}, seed spread (larger std) {spread:.3f}: "
            f"{'bf16 LOSES accuracy beyond seed noise' if beyond else 'within seed noise'}"
        )
    return loses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per precision")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"CPU: {cpu_name()} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    results: dict[str, list[dict[str, float]]] = {p: [] for p in args.precisions}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train_set, held_out = learning_datasets(root)
        # Seeds outer, precisions inner: a drift in machine load hits both alike.
        for seed in seeds:
            for precision in args.precisions:
                name = f"{precision}-seed{seed}"
                config = learning_config(
                    train_set, root / "runs", precision=precision, seed=seed, name=name
                )
                start = time.perf_counter()
                aurocs = held_out_aurocs(train(config), held_out)
                results[precision].append(aurocs)
                cells = "  ".join(f"{label} {value:.3f}" for label, value in aurocs.items())
                elapsed = time.perf_counter() - start
                print(f"{precision:5s} seed {seed}: {cells}   ({elapsed:.0f} s)", flush=True)
    summarise(results)


if __name__ == "__main__":
    main()
