"""Labelling throughput and memory: eager fp32 PyTorch versus our default path and ONNX Runtime.

Speed (DenseNet121, weights 'none', 320 px, all 14 labels, batch 16) on the NIH films in
../shared/data/nih-cxr14 (or synthetic 320 px films where that folder is absent). Every path
reads and decodes the same files itself, so images/s are end to end; the paths take turns batch
by batch, so a change in machine load hits them alike and their ratios stay meaningful:

- eager fp32 (baseline): read_image -> preprocess -> model(x) under no_grad, contiguous tensors
- torch channels_last fp32: `load_model(backend="torch", precision="fp32")` (+ inference_mode)
- torch bf16 + channels_last: `load_model(backend="torch", precision="bf16")` (bf16 autocast;
  native on CPUs with AMX/AVX512-BF16, emulated and slow elsewhere)
- ONNX Runtime fp32: `load_model(backend="onnx")` (the checkpoint exported in memory)
- default: `load_model(backend="auto")`, i.e. what `cxrlabel label` uses on this machine

Then the default path once more through `label_inputs` (the real batch job: CSV outputs,
partial files, fsync per batch). Accuracy: each path's largest probability difference from
eager fp32, and mean AUROC against the NIH labels. A randomly initialised network's AUROC says
nothing about chest films; only its difference between paths is meaningful here.

Reader: `label_inputs` with each film read in the time-limited reader process (the default,
`--read-timeout 120`) against reading in the main process (`--read-timeout 0`), with the tiny
CNN so that reading and decoding dominate; the two take turns, run by run, and the table shows
each one's median and range over the repeats.

Memory: `label_inputs` over N synthetic 64 px films (hard links to a few hundred distinct
synthetic films, so making them is cheap) with the tiny CNN, sampling the process's resident
memory after every batch.

    .venv/bin/python benchmarks/bench_label.py                       # 200 NIH films, 5,000
    .venv/bin/python benchmarks/bench_label.py --images 48 --memory-images 1000
    .venv/bin/python benchmarks/bench_label.py --part reader --images 497 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from cxrlabel.data.images import read_image
from cxrlabel.data.labels import OBSERVATIONS
from cxrlabel.data.transforms import preprocess
from cxrlabel.fileio import atomic_write_text
from cxrlabel.labelling.batch import label_inputs
from cxrlabel.models.checkpoint import save_checkpoint
from cxrlabel.models.factory import CXRModel, create_model
from cxrlabel.models.predictor import inference_plan, load_model
from cxrlabel.training.execution import cpu_flags, cpu_name

NIH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nih-cxr14"
BATCH = 16


def films(n: int, workdir: Path) -> tuple[list[Path], pd.DataFrame | None, str]:
    """The first n NIH films (with their labels), or synthetic ones when NIH is absent."""
    if (NIH / "labels.csv").is_file():
        table = pd.read_csv(NIH / "labels.csv").head(n)
        return [NIH / p for p in table["Path"]], table, f"{len(table)} NIH ChestX-ray14 films"
    from cxrlabel.synth import write_dataset

    write_dataset(workdir / "synth", patients=max(1, n // 2 + 1), size=320, seed=0)
    paths = sorted((workdir / "synth").rglob("*.jpg"))[:n]
    return paths, None, f"{len(paths)} synthetic 320 px films ({NIH} not found)"


def eager_fp32(model: CXRModel) -> Callable[[Sequence[np.ndarray]], np.ndarray]:
    """The textbook path: preprocess, stack, forward under no_grad, sigmoid."""

    def run(images: Sequence[np.ndarray]) -> np.ndarray:
        x = torch.stack([preprocess(img, model.preprocessing) for img in images])
        with torch.no_grad():
            return torch.sigmoid(model(x)).numpy()

    return run


def timed_paths(
    paths: Sequence[Path], predictors: dict[str, Callable[[Sequence[np.ndarray]], np.ndarray]]
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Seconds and probabilities per path; the paths take turns batch by batch."""
    seconds = dict.fromkeys(predictors, 0.0)
    probs: dict[str, list[np.ndarray]] = {name: [] for name in predictors}
    warm = [read_image(p) for p in paths[:2]]
    for predict in predictors.values():
        predict(warm)
    for start in range(0, len(paths), BATCH):
        batch = paths[start : start + BATCH]
        for name, predict in predictors.items():
            began = time.perf_counter()
            with torch.inference_mode() if name != "eager fp32" else torch.no_grad():
                out = predict([read_image(p) for p in batch])
            seconds[name] += time.perf_counter() - began
            probs[name].append(np.asarray(out, dtype=np.float64))
    return seconds, {name: np.concatenate(p) for name, p in probs.items()}


def mean_auroc(table: pd.DataFrame | None, probs: np.ndarray, labels: Sequence[str]) -> float:
    if table is None:
        return float("nan")
    scores = []
    for k, name in enumerate(labels):
        truth = table[name].to_numpy(dtype=float)
        keep = ~np.isnan(truth)
        if keep.any() and len(set(truth[keep])) == 2:
            scores.append(roc_auc_score(truth[keep], probs[keep, k]))
    return float(np.mean(scores))


def speed(n: int, workdir: Path) -> dict:
    paths, table, description = films(n, workdir)
    torch.manual_seed(0)
    net = create_model("densenet121", "linear", OBSERVATIONS, weights="none", size=320).eval()
    ckpt = save_checkpoint(workdir / "dn121" / "best.safetensors", net, config={}, epoch=0, step=0)
    began = time.perf_counter()
    onnx_model = load_model([ckpt], backend="onnx", device="cpu")
    export_s = time.perf_counter() - began
    models = {
        ("torch", "fp32"): load_model([ckpt], backend="torch", device="cpu", precision="fp32"),
        ("torch", "bf16"): load_model([ckpt], backend="torch", device="cpu", precision="bf16"),
        ("onnx", "fp32"): onnx_model,
    }
    names = {
        ("torch", "fp32"): "torch channels_last fp32",
        ("torch", "bf16"): "torch bf16 + channels_last",
        ("onnx", "fp32"): "onnxruntime fp32",
    }
    plan = inference_plan("cpu")  # what backend="auto" loads on this machine
    chosen = (plan.backend, plan.precision)
    default = models[chosen]
    names[chosen] += " (default)"
    predictors = {"eager fp32": eager_fp32(net)}
    predictors |= {names[key]: model.predict_images for key, model in models.items()}
    seconds, probs = timed_paths(paths, predictors)
    base = probs["eager fp32"]
    base_auroc = mean_auroc(table, base, OBSERVATIONS)
    rows = {}
    for name in predictors:
        auroc = mean_auroc(table, probs[name], OBSERVATIONS)
        rows[name] = {
            "images_per_s": len(paths) / seconds[name],
            "ratio": seconds["eager fp32"] / seconds[name],
            "max_abs_prob_diff": float(np.abs(probs[name] - base).max()),
            "mean_auroc": auroc,
            "auroc_diff": abs(auroc - base_auroc),
        }
    out = workdir / "label-out"
    summary = label_inputs(paths, default, out, batch_size=BATCH, progress=False)
    e2e_probs = pd.read_csv(out / "probabilities.csv")[list(OBSERVATIONS)].to_numpy()
    return {
        "data": description,
        "onnx_export_s": export_s,
        "default": {"backend": plan.backend, "precision": plan.precision, "reason": plan.reason},
        "paths": rows,
        "label_inputs_default": {
            "images_per_s": summary.images_per_s,
            "max_abs_prob_diff": float(np.abs(e2e_probs - base).max()),
        },
    }


def rss_mib() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MiB, from /proc/self/status."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def memory(n: int, workdir: Path) -> dict:
    from cxrlabel.synth import write_dataset

    write_dataset(workdir / "mem-src", patients=150, size=64, seed=1)
    sources = sorted((workdir / "mem-src").rglob("*.jpg"))
    folder = workdir / "mem-films"
    for i in range(n):
        target = folder / f"d{i // 1000:02d}" / f"film{i:05d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(sources[i % len(sources)], target)
    torch.manual_seed(0)
    tiny = create_model("tiny", "linear", OBSERVATIONS, weights="none", size=64)
    ckpt = save_checkpoint(workdir / "tiny" / "best.safetensors", tiny, config={}, epoch=0, step=0)
    model = load_model([ckpt], backend="auto", device="cpu")
    samples: list[tuple[int, float]] = []
    summary = label_inputs(
        [folder], model, workdir / "mem-out", batch_size=BATCH, progress=False,
        on_batch=lambda done: samples.append((done, rss_mib()[0])),
    )  # fmt: skip
    at = {done: rss for done, rss in samples}
    marks = [d for d in (BATCH * 4, n // 10, n // 2, n) if d in at] or [samples[-1][0]]
    first, last = samples[min(3, len(samples) - 1)], samples[-1]
    return {
        "images": summary.labelled,
        "images_per_s": summary.images_per_s,
        "rss_mib_at": {str(d): round(at[d], 1) for d in sorted(set(marks))},
        "rss_growth_mib": round(last[1] - first[1], 1),
        "rss_growth_window": [first[0], last[0]],
        "peak_rss_mib": round(rss_mib()[1], 1),
        "distinct_source_films": len(sources),
    }


def reader(n: int, repeats: int, workdir: Path) -> dict:
    """images/s of label_inputs with the reader process against reading in-process."""
    paths, _, description = films(n, workdir)
    torch.manual_seed(0)
    tiny = create_model("tiny", "linear", OBSERVATIONS, weights="none", size=224)
    ckpt = save_checkpoint(workdir / "tiny" / "best.safetensors", tiny, config={}, epoch=0, step=0)
    model = load_model([ckpt], backend="auto", device="cpu")
    modes = {"in-process (--read-timeout 0)": None, "reader process (default)": 120.0}
    rates: dict[str, list[float]] = {name: [] for name in modes}
    for rep in range(repeats + 1):  # the first round warms caches and is not counted
        for name, timeout in modes.items():
            out = workdir / f"reader-{rep}-{timeout}"
            summary = label_inputs(
                paths, model, out, batch_size=BATCH, progress=False, read_timeout=timeout
            )
            if rep:
                rates[name].append(summary.images_per_s)
    base = float(np.median(rates["in-process (--read-timeout 0)"]))
    return {
        "data": description,
        "repeats": repeats,
        "modes": {
            name: {
                "median_images_per_s": float(np.median(r)),
                "min": min(r),
                "max": max(r),
                "ratio": float(np.median(r)) / base,
            }
            for name, r in rates.items()
        },
    }


def print_reader(r: dict) -> None:
    print(f"\nreading films: tiny CNN 224 px, batch {BATCH}, {r['data']}, {r['repeats']} runs each")
    print(f"{'mode':<32}{'images/s (median)':>18}{'range':>18}{'vs in-process':>15}")
    for name, row in r["modes"].items():
        spread = f"{row['min']:.1f}-{row['max']:.1f}"
        print(f"{name:<32}{row['median_images_per_s']:>18.1f}{spread:>18}{row['ratio']:>14.2f}x")


def print_speed(s: dict) -> None:
    print(f"\nDenseNet121 320 px, batch {BATCH}, {s['data']}, end to end (decode included)")
    print(f"ONNX export in memory: {s['onnx_export_s']:.1f} s (once per model load)")
    d = s["default"]
    print(f"default (--backend auto): {d['backend']} {d['precision']} ({d['reason']})")
    header = f"{'path':<38}{'images/s':>10}{'vs eager':>10}{'max |dp|':>12}{'AUROC':>8}"
    print(f"{header}{'|dAUROC|':>10}")
    for name, row in s["paths"].items():
        print(
            f"{name:<38}{row['images_per_s']:>10.2f}{row['ratio']:>9.2f}x"
            f"{row['max_abs_prob_diff']:>12.2e}{row['mean_auroc']:>8.3f}{row['auroc_diff']:>10.1e}"
        )
    e2e = s["label_inputs_default"]
    print(
        f"label_inputs, default backend (the whole job, run after the above): "
        f"{e2e['images_per_s']:.2f} images/s, max |dp| vs eager {e2e['max_abs_prob_diff']:.2e}"
    )


def print_memory(m: dict) -> None:
    print(
        f"\nmemory (own process): {m['images']} synthetic 64 px films, tiny CNN, default "
        f"backend: {m['images_per_s']:.0f} images/s; RSS MiB after N films {m['rss_mib_at']}; "
        f"growth {m['rss_growth_mib']} MiB from film {m['rss_growth_window'][0]} to "
        f"{m['rss_growth_window'][1]}; peak RSS {m['peak_rss_mib']} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="NIH films for the speed part")
    parser.add_argument("--memory-images", type=int, default=5000)
    parser.add_argument("--part", choices=["all", "speed", "memory", "reader"], default="all")
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode (reader part)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    args = parser.parse_args()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.part == "reader":
            results["reader"] = reader(args.images, args.repeats, Path(tmp))
            print_reader(results["reader"])
        elif args.part == "memory":
            # Run alone so the peak resident memory is this job's, not the speed part's.
            results["memory"] = memory(args.memory_images, Path(tmp))
            print_memory(results["memory"])
        else:
            flags = cpu_flags()
            print(
                f"machine: {cpu_name()}, {os.cpu_count()} cores, torch threads "
                f"{torch.get_num_threads()}, AMX: {'amx_bf16' in flags}, "
                f"AVX512-BF16: {'avx512_bf16' in flags}, CUDA: {torch.cuda.is_available()}"
            )
            results["speed"] = speed(args.images, Path(tmp))
            print_speed(results["speed"])
        if args.part == "all":
            out = Path(tmp) / "memory.json"
            command = [sys.executable, __file__, "--part", "memory", "--memory-images",
                       str(args.memory_images), "--out", str(out)]  # fmt: skip
            subprocess.run(command, check=True)
            results["memory"] = json.loads(out.read_text())["memory"]
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
