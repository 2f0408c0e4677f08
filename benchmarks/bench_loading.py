"""Images/s of decode+resize from source files versus reading the preprocessing cache.

Same images, one process. Uses the 497 real NIH JPEGs in ../shared/data/nih-cxr14 when present,
otherwise a synthetic dataset written to a temporary folder. Prints both rates and their ratio
(goal: the cache at least 10x faster per image), for raw uint8 pixels and for full dataset
items (normalised 3-channel tensors). The cache is read with a warm page cache, as it is from
the second epoch on.

    .venv/bin/python benchmarks/bench_loading.py [--size 320] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from cxrlabel.data.cache import load_resized, prepare_cache
from cxrlabel.data.dataset import CXRDataset
from cxrlabel.data.formats import load_table
from cxrlabel.data.transforms import Preprocessing, ResizeGeometry

NIH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nih-cxr14" / "labels.csv"


def rate(n: int, fn) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def best_rate(n: int, fn, repeats: int) -> float:
    return max(rate(n, fn) for _ in range(repeats))


def dataset_table(workdir: Path):
    if NIH.is_file():
        return load_table(NIH), f"{NIH.parent} (real NIH JPEGs)"
    from cxrlabel.synth import write_dataset

    write_dataset(workdir / "synth", patients=300, size=320, seed=0)
    return load_table(workdir / "synth" / "train.csv"), "synthetic 320 px JPEGs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        table, source = dataset_table(Path(tmp))
        paths = table.image_paths()
        settings = ResizeGeometry(args.size)
        prep = Preprocessing(args.size, (0.5,) * 3, (0.5,) * 3, "pad", "bilinear")
        n = len(paths)
        start = time.perf_counter()
        cache = prepare_cache(paths, Path(tmp) / "cache", settings, workers=1)
        build = time.perf_counter() - start

        decode = best_rate(n, lambda: [load_resized(p, settings) for p in paths], args.repeats)
        cached = best_rate(n, lambda: [cache[i] for i in range(n)], args.repeats)
        direct_ds = CXRDataset(table, "all14", prep)
        cached_ds = CXRDataset(table, "all14", prep, cache=cache)
        item_direct = best_rate(n, lambda: [direct_ds[i] for i in range(n)], args.repeats)
        item_cached = best_rate(n, lambda: [cached_ds[i] for i in range(n)], args.repeats)

    print(f"machine: {platform.processor() or platform.machine()}, 1 process, torch 1 thread")
    print(f"data: {n} images from {source}, cached at {args.size} px (build {build:.1f} s)")
    print(f"{'path':<28}{'source files':>14}{'cache':>12}{'ratio':>9}")
    for name, a, b in (
        ("pixels (uint8)", decode, cached),
        ("dataset item", item_direct, item_cached),
    ):
        print(f"{name:<28}{a:>10.0f} i/s{b:>8.0f} i/s{b / a:>8.1f}x")
    goal = cached / decode >= 10
    print(f"goal (cache >= 10x per image on pixels): {'met' if goal else 'NOT met'}")


if __name__ == "__main__":
    main()
