"""Wall time of a full evaluation at scale: metrics table, bootstrap CIs and calibration.

Random predictions for 100,000 images x 14 labels in 20,000 studies (5 images each), ~10% of
entries masked, scores correlated with the targets. Times `metrics_table`, `bootstrap_auroc`
(1,000 study resamples by default) and `calibration_table` separately and in total.

    .venv/bin/python benchmarks/bench_eval.py [--images 100000] [--studies 20000]
                                              [--resamples 1000] [--seed 0]

Goal: seconds, not minutes.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import numpy as np

from cxrlabel.data.labels import OBSERVATIONS
from cxrlabel.evaluation.metrics import bootstrap_auroc, calibration_table, metrics_table
from cxrlabel.training.execution import cpu_name


def random_predictions(
    n_images: int, n_studies: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    k = len(OBSERVATIONS)
    prevalence = rng.uniform(0.02, 0.5, size=k)
    y_true = (rng.random((n_images, k)) < prevalence).astype(np.float64)
    y_score = np.clip(0.3 * y_true + 0.7 * rng.random((n_images, k)), 0.0, 1.0)
    y_score = np.round(y_score, 3)  # model outputs at limited precision tie
    mask = rng.random((n_images, k)) > 0.1
    groups = np.repeat(np.arange(n_studies), -(-n_images // n_studies))[:n_images]
    return y_true, y_score, mask, groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--studies", type=int, default=20_000)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    y_true, y_score, mask, groups = random_predictions(args.images, args.studies, args.seed)
    labels = OBSERVATIONS
    # Wall and CPU seconds: on a shared machine the CPU time shows the work done.
    times: dict[str, tuple[float, float]] = {}

    def timed(name: str, run: Callable[[], object]) -> object:
        wall, cpu = time.perf_counter(), time.process_time()
        out = run()
        times[name] = (time.perf_counter() - wall, time.process_time() - cpu)
        return out

    table = timed("metrics_table", lambda: metrics_table(y_true, y_score, mask, labels))
    ci = timed(
        f"bootstrap_auroc ({args.resamples} resamples)",
        lambda: bootstrap_auroc(
            y_true, y_score, mask, groups, labels, n_resamples=args.resamples, seed=args.seed
        ),
    )
    timed("calibration_table", lambda: calibration_table(y_true, y_score, mask, labels))

    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, {platform.platform()}")
    print(
        f"data: {args.images:,} predictions x {len(labels)} labels, "
        f"{len(np.unique(groups)):,} studies, {int(mask.sum()):,} counted entries"
    )
    print(f"  {'':<36s} {'wall':>8s} {'cpu':>8s}")
    for name, (wall, cpu) in times.items():
        print(f"  {name:<36s} {wall:7.2f}s {cpu:7.2f}s")
    wall = sum(t[0] for t in times.values())
    cpu = sum(t[1] for t in times.values())
    print(f"  {'total':<36s} {wall:7.2f}s {cpu:7.2f}s")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    mean = ci.iloc[-1]
    print(
        f"mean AUROC {table['AUROC'].iloc[-1]:.4f} "
        f"(95% CI {mean['Low']:.4f}-{mean['High']:.4f}, {int(mean['Resamples'])} resamples)"
    )


if __name__ == "__main__":
    main()
