"""Throughput of the synthetic chest radiograph generator on one CPU core.

Usage: .venv/bin/python benchmarks/bench_synth.py [--size 320] [--n 200] [--seed 0]

Prints images/s for drawing only and for drawing + JPEG encoding + writing the file, and whether
the project's goal (50 images/s at 320 px on one core) is met. The images are those of a real
planned dataset (frontals and laterals, with the dataset's finding mix), rendered in order.

Single core: the BLAS/OpenMP thread pools are limited to one thread *before* numpy is imported
(they would not change this workload much, but the goal is per core). The generator itself is
single-threaded numpy + Pillow.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from cxrlabel import synth  # noqa: E402
from cxrlabel.data.pictures import encode_jpeg  # noqa: E402

GOAL_IMAGES_PER_S = 50.0


def _jobs(n: int, seed: int) -> list[tuple[synth.StudyPlan, str]]:
    """The first n images of a planned dataset, as (study, view) pairs."""
    jobs: list[tuple[synth.StudyPlan, str]] = []
    patients = max(2, n)
    for plan in synth.plan_dataset(patients, seed=seed):
        jobs.extend((plan, view) for view in plan.views)
        if len(jobs) >= n:
            break
    return jobs[:n]


def _draw(jobs: list[tuple[synth.StudyPlan, str]], size: int, seed: int) -> float:
    start = time.perf_counter()
    for plan, view in jobs:
        rng = synth.image_rng(seed, plan.patient, plan.study, view)
        synth.generate_image(plan.findings, rng, size, view, anatomy=plan.anatomy, ap=plan.ap)
    return time.perf_counter() - start


def _draw_and_write(
    jobs: list[tuple[synth.StudyPlan, str]], size: int, seed: int, out: Path, quality: int
) -> float:
    start = time.perf_counter()
    for i, (plan, view) in enumerate(jobs):
        rng = synth.image_rng(seed, plan.patient, plan.study, view)
        img = synth.generate_image(plan.findings, rng, size, view, anatomy=plan.anatomy, ap=plan.ap)
        (out / f"{i:05d}.jpg").write_bytes(encode_jpeg(img, quality))  # as write_dataset does
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--n", type=int, default=200, help="images per timed pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    jobs = _jobs(args.n, args.seed)
    n_lat = sum(view == "lateral" for _, view in jobs)
    _draw(jobs[:5], args.size, args.seed)  # warm-up: imports, grid caches
    draw_s = [_draw(jobs, args.size, args.seed) for _ in range(args.repeats)]
    with tempfile.TemporaryDirectory() as tmp:
        write_s = [
            _draw_and_write(
                jobs, args.size, args.seed, Path(tmp), synth.DEFAULT_CONFIG.jpeg_quality
            )
            for _ in range(args.repeats)
        ]
    draw_rate = len(jobs) / statistics.median(draw_s)
    write_rate = len(jobs) / statistics.median(write_s)
    best_write = len(jobs) / min(write_s)
    print(f"size {args.size} px, {len(jobs)} images ({n_lat} lateral), {args.repeats} passes")
    print(f"threads: OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} (numpy single-threaded)")
    print(f"generation only         : {draw_rate:7.1f} images/s (median pass)")
    print(
        f"generation + JPEG write : {write_rate:7.1f} images/s (median pass, best {best_write:.1f})"
    )
    met = write_rate >= GOAL_IMAGES_PER_S
    verdict = "MET" if met else "NOT met"
    print(f"goal {GOAL_IMAGES_PER_S:.0f} images/s at 320 px incl. JPEG: {verdict}")
    if args.size != 320:
        print("(note: the goal is defined at --size 320)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
