"""The GPU fast path, measured: training, input pipeline and labelling images/s on one device.

One prepared script that needs only the checkout (its films are synthetic, made here in a temp
folder) and keeps within `--budget-s` (default 450 s, under 8 minutes on one GPU; what it had
to skip is printed). It prints the device's name and:

- training images/s, DenseNet121 (weights none) at `--size` px, batch `--batch`: eager fp32
  (the textbook loop) vs our default plan (`choose_execution`: bf16 autocast + channels_last on
  CUDA, the uint8 batch finished on the device as `cxrlabel train` does there) vs default +
  torch.compile (`--no-compile` skips it); `--warmup` steps excluded, `--steps` timed, median
  and min-max spread, and peak GPU memory per path (CUDA) or peak RSS (CPU);
- input pipeline images/s from the uint8 preprocessing cache with `--workers` workers: the
  training loader (`make_loader`, cxr-mild augmentation) plus the move to the device and the
  finishing (`batch_to_device`), in the batch mode the device uses (uint8 on CUDA, float32 on
  the CPU; both are shown), and whether it outruns the training step;
- labelling images/s end to end for `--label-films` 320 px JPEG films (decode included):
  `label_inputs` with `load_model(backend="auto")` on the device, DenseNet121 with random
  weights saved through `save_checkpoint`.

    .venv/bin/python benchmarks/bench_gpu.py                        # on a GPU machine
    .venv/bin/python benchmarks/bench_gpu.py --device cpu --quick   # a CPU check, ~2 minutes
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from cxrlabel.config import build_config
from cxrlabel.data.cache import prepare_cache
from cxrlabel.data.dataset import CXRDataset
from cxrlabel.data.labels import OBSERVATIONS, BlankMeaning, LabelTable, table_from_columns
from cxrlabel.data.transforms import AUGMENT_PRESETS
from cxrlabel.hardware import cpu_name
from cxrlabel.labelling.batch import label_inputs
from cxrlabel.models.checkpoint import save_checkpoint
from cxrlabel.models.factory import CXRModel, create_model, masked_bce_loss
from cxrlabel.models.predictor import load_model
from cxrlabel.training.execution import ExecutionPlan, choose_execution
from cxrlabel.training.finetune import batch_to_device, make_loader, train_step, uint8_batches


class Deadline:
    """The script's time budget: parts ask before starting, timed loops stop at the end."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.end - time.perf_counter()

    def allows(self, part: str, needs_s: float) -> bool:
        if self.left() >= needs_s:
            return True
        self.skipped.append(f"{part} (needs ~{needs_s:.0f} s, {max(self.left(), 0):.0f} s left)")
        return False


def write_films(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    """n random-ish grey JPEG films: smooth blobs plus noise (so JPEG has work to do); a few
    distinct ones, hard-linked to n names so that making thousands is cheap."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    distinct = []
    for i in range(min(n, 64)):
        coarse = rng.integers(0, 256, (size // 16 + 1, size // 16 + 1)).astype(np.float32)
        smooth = np.kron(coarse, np.ones((16, 16), np.float32))[:size, :size]
        film = np.clip(smooth + rng.normal(0, 12, (size, size)), 0, 255).astype(np.uint8)
        path = folder / f"distinct-{i:03d}.jpg"
        Image.fromarray(film).save(path, quality=90)
        distinct.append(path)
    paths = []
    for i in range(n):
        path = folder / f"film-{i:06d}.jpg"
        os.link(distinct[i % len(distinct)], path)
        paths.append(path)
    return paths


def film_table(paths: list[Path], root: Path) -> LabelTable:
    rng = np.random.default_rng(1)
    rows = [{"Path": p.name, "patient_id": f"p{i}", "study_id": f"p{i}/s1"} for i, p in
            enumerate(paths)]  # fmt: skip
    values = {label: rng.integers(0, 2, len(paths)).astype(float) for label in OBSERVATIONS}
    return table_from_columns(
        pd.DataFrame(rows), root=root, source="bench", blank=BlankMeaning.NEGATIVE,
        label_values=values,
    )  # fmt: skip


def peak_memory(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"


def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def train_paths(
    base: CXRModel, dataset: CXRDataset, args: argparse.Namespace, device: str, clock: Deadline
) -> dict[str, float]:
    """Training images/s per path (median); prints the table."""
    sync = _sync(device)
    films = [dataset[i % len(dataset)] for i in range(args.batch)]
    raw = {k: torch.stack([f[k] for f in films]) for k in films[0]}
    default = choose_execution(device, "auto")
    fp32 = choose_execution(device, "fp32")
    paths: list[tuple[str, ExecutionPlan | None, bool]] = [
        ("eager fp32", None, False),
        (f"default ({default.precision}, channels_last={default.channels_last})", default, False),
    ]
    if args.no_compile:
        clock.skipped.append("default + compile (--no-compile)")
    else:
        paths.append(("default + torch.compile", default, True))
    print(f"\ntraining: DenseNet121 (weights none) at {args.size} px, batch {args.batch}, "
          f"{args.warmup} warm-up + {args.steps} timed steps per path")  # fmt: skip
    print("path                                         first s  median ms  min-max ms  img/s"
          "    peak memory")  # fmt: skip
    rates = {}
    for name, plan, compiled in paths:
        if not clock.allows(f"training: {name}", 240 if compiled else 30):
            continue
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step = make_step(base, raw, dataset, device, fp32 if plan is None else plan,
                         textbook=plan is None, compiled=compiled)  # fmt: skip
        times = []
        for i in range(args.warmup + args.steps):
            if i > args.warmup and clock.left() < 5:
                clock.skipped.append(f"training: {name} after {len(times) - 1} timed steps")
                break
            sync()
            began = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - began)
        timed = times[args.warmup :] or times[-1:]
        median = statistics.median(timed)
        rates[name] = args.batch / median
        print(f"{name:44s} {times[0]:7.1f} {median * 1e3:10.1f} {min(timed) * 1e3:6.0f}-"
              f"{max(timed) * 1e3:<6.0f} {rates[name]:7.1f}    {peak_memory(device)}")  # fmt: skip
        del step
    return rates


def make_step(
    base: CXRModel,
    raw: dict[str, torch.Tensor],
    dataset: CXRDataset,
    device: str,
    plan: ExecutionPlan,
    *,
    textbook: bool,
    compiled: bool,
) -> Callable[[], None]:
    """One training step of a fresh copy of `base`: the textbook eager fp32 loop on a float
    batch already on the device, or ours (move the pinned uint8 batch, finish it on the
    device, `train_step` under `plan`, optionally through torch.compile)."""
    model = copy.deepcopy(base).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    if textbook:
        ready = batch_to_device(raw, plan, dataset)

        def plain() -> None:
            optimizer.zero_grad()
            masked_bce_loss(model(ready["image"]), ready["target"], ready["mask"]).backward()
            optimizer.step()

        return plain
    if plan.channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if compiled else model
    pinned = {k: v.pin_memory() for k, v in raw.items()} if device == "cuda" else raw
    return lambda: train_step(step_model, batch_to_device(pinned, plan, dataset), optimizer, plan)


def input_pipeline(
    dataset: CXRDataset, args: argparse.Namespace, device: str, uint8: bool, clock: Deadline
) -> float | None:
    """Loader + move + finish images/s over `args.loader_batches` batches (the first, with
    the workers' start, excluded)."""
    if not clock.allows(f"input pipeline ({'uint8' if uint8 else 'float32'})", 20):
        return None
    dataset.uint8 = uint8
    dataset.augmentation = AUGMENT_PRESETS["cxr-mild"]
    plan = choose_execution(device, "auto")
    config = build_config(None, {"batch_size": args.batch, "workers": args.workers})
    order = [i % len(dataset) for i in range((args.loader_batches + 1) * args.batch)]
    sync = _sync(device)
    count, began = 0, 0.0
    for i, raw in enumerate(make_loader(dataset, order, config, plan)):
        batch = batch_to_device(raw, plan, dataset)
        if i == 0:
            sync()
            began = time.perf_counter()
            continue
        count += int(batch["image"].shape[0])
        if clock.left() < 3:
            clock.skipped.append(f"input pipeline: stopped after {i} batches")
            break
    sync()
    return count / max(time.perf_counter() - began, 1e-9) if count else None


def labelling(args: argparse.Namespace, device: str, workdir: Path, clock: Deadline) -> None:
    if not clock.allows("labelling", 30):
        return
    paths = write_films(workdir / "label-films", args.label_films, 320, seed=2)
    torch.manual_seed(0)
    net = create_model("densenet121", "linear", OBSERVATIONS, weights="none", size=320).eval()
    ckpt = save_checkpoint(workdir / "dn121" / "best.safetensors", net, config={}, epoch=0, step=0)
    model = load_model([ckpt], backend="auto", device=device)
    info = model.model_info()
    done = [0]

    def guard(count: int) -> None:
        done[0] = count
        if clock.left() < 3:
            raise TimeoutError(count)

    began = time.perf_counter()
    try:
        # decode_device as `cxrlabel label --device` passes it: JPEG decoded on CUDA there.
        summary = label_inputs(paths, model, workdir / "label-out", batch_size=args.batch,
                               progress=False, on_batch=guard, decode_device=device)  # fmt: skip
    except TimeoutError:
        wall = time.perf_counter() - began
        clock.skipped.append(f"labelling stopped after {done[0]} of {len(paths)} films")
        print(f"\nlabelling: {done[0]} films in {wall:.1f} s: {done[0] / wall:.1f} films/s")
        return
    wall = time.perf_counter() - began
    print(f"\nlabelling: {summary.labelled} JPEG films at 320 px, batch {args.batch}, "
          f"{info.get('backend', 'torch')} {info.get('precision')}: "
          f"{summary.labelled / wall:.1f} films/s end to end (decode, sanity checks, CSVs; "
          f"{wall:.1f} s), label_inputs' own figure {summary.images_per_s:.1f}; "
          f"peak {peak_memory(device)}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per path")
    parser.add_argument("--warmup", type=int, default=5, help="untimed training steps first")
    parser.add_argument("--label-films", type=int, default=4096)
    parser.add_argument("--cache-films", type=int, default=1024, help="films in the uint8 cache")
    parser.add_argument("--loader-batches", type=int, default=40)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="total time guard (default 450; --quick: 120)")  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true",
        help="CPU-sized: --size 128 --batch 8 --steps 3 --warmup 1, 64 cache films, 6 loader "
        "batches, 48 label films, 2 workers, a 120 s budget",
    )  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.size, args.batch, args.steps, args.warmup = 128, 8, 3, 1
        args.cache_films, args.loader_batches, args.label_films = 64, 6, 48
        args.workers = min(args.workers, 2)
    clock = Deadline(args.budget_s or (120.0 if args.quick else 450.0))
    device = choose_execution(args.device, "fp32").device
    name = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    print(f"device: {device}: {name}; CPU: {cpu_name()} ({os.cpu_count()} cores, "
          f"{torch.get_num_threads()} threads); torch {torch.__version__}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        workdir = Path(tmp)
        torch.manual_seed(0)
        base = create_model("densenet121", "linear", OBSERVATIONS, weights="none", size=args.size)
        films = write_films(workdir / "films", args.cache_films, args.size)
        cache = prepare_cache(films, workdir / "cache", base.preprocessing.geometry,
                              workers=args.workers)  # fmt: skip
        dataset = CXRDataset(film_table(films, workdir / "films"), OBSERVATIONS,
                             base.preprocessing, cache=cache, uint8=True)  # fmt: skip
        rates = train_paths(base, dataset, args, device, clock)
        print(f"\ninput pipeline: uint8 cache of {len(dataset)} films, {args.workers} workers, "
              f"batch {args.batch}, cxr-mild augmentation, loader + move + finish")  # fmt: skip
        for uint8 in (True, False):
            rate = input_pipeline(dataset, args, device, uint8, clock)
            mode = "uint8 (finished on the device)" if uint8 else "float32 (finished in workers)"
            used = " <- what train uses here" if uint8 == uint8_batches(device) else ""
            if rate is not None:
                fastest = max(rates.values(), default=None)
                versus = f", {rate / fastest:.2f}x the fastest training path" if fastest else ""
                print(f"  {mode:32s} {rate:8.1f} images/s{versus}{used}")
        labelling(args, device, workdir, clock)
    print(f"\nskipped: {'; '.join(clock.skipped) if clock.skipped else 'nothing'}")


if __name__ == "__main__":
    main()
