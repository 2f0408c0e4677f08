"""GPU check: Xception fine-tuned end to end at 299 px on the whole Kermany training set.

The GPU machine has no ../shared, so the script works in two steps:

    # here, beside ../shared/data: a compact copy of what the run needs (films + weights)
    .venv/bin/python benchmarks/gpu_kermany.py pack --out gpu-pack
    # on the GPU machine, from the working tree that carries gpu-pack/ (at most 8 minutes)
    .venv/bin/python benchmarks/gpu_kermany.py run --pack gpu-pack --out $OUT/gpu-kermany

`pack` re-encodes the 5,216 films as greyscale JPEG (longer side at most 299 px) and stores the
local ImageNet Xception weights as float16 (they are loaded into a float32 model; fine-tuning
moves the weights far more than the rounding). It refuses to write more than `--max-mb`, the
device tool's carry budget (64 MiB with the code): the weights alone are 40 MiB in float16, so
the films get JPEG quality 30 (57.3 MiB in all, measured). `run` fine-tunes with the `finetune-
xception-real` recipe on CUDA (bf16 autocast) for `--epochs` epochs and prints the same
validation figures as benchmarks/real_kermany.py (patient split, stored Youden threshold, 95%
patient-bootstrap CIs), the training images/s, the card's name and the checkpoint's path.
"""

from __future__ import annotations

import argparse
import io
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from real_kermany import KERMANY, LABEL, PUBLISHED, WEIGHTS, save_probabilities, score
from safetensors.torch import load_file, save_file

from cxrlabel.config import RunConfig
from cxrlabel.data.formats import load_table
from cxrlabel.data.splits import load_split
from cxrlabel.evaluation.scoring import evaluate_checkpoint
from cxrlabel.fileio import atomic_write_bytes
from cxrlabel.models.run_folder import RunFolder
from cxrlabel.training.finetune import train

log = logging.getLogger("gpu_kermany")
PACK_WEIGHTS = "xception_imagenet_fp16.safetensors"


def pack(out: Path, side: int, quality: int, max_mb: float) -> None:
    frame = pd.read_csv(KERMANY)
    total = 0
    for rel in frame["Path"]:
        image = Image.open(KERMANY.parent / rel).convert("L")
        image.thumbnail((side, side))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        atomic_write_bytes(out / rel, buffer.getvalue())
        total += buffer.tell()
    frame.to_csv(out / "labels.csv", index=False)
    weights = {k: v.half() for k, v in load_file(WEIGHTS).items()}
    save_file(weights, out / PACK_WEIGHTS)
    total += (out / PACK_WEIGHTS).stat().st_size
    print(f"packed {len(frame)} films + weights into {out}: {total / 2**20:.1f} MiB")
    if total > max_mb * 2**20:
        raise SystemExit(f"{out} is {total / 2**20:.1f} MiB, over --max-mb {max_mb}")


def run(pack_dir: Path, out: Path, args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this is the GPU check (benchmarks/real_kermany.py "
                         "is the CPU one)")  # fmt: skip
    # fp16 weights -> a float32 file the factory loads like any local weights file.
    weights = out / "xception_imagenet.safetensors"
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float() for k, v in load_file(pack_dir / PACK_WEIGHTS).items()}, weights)
    labels_csv = pack_dir / "labels.csv"
    config = RunConfig.build(
        "finetune-xception-real",
        [
            "name=gpu-xception-299", f"train_csv={labels_csv}", f"labels={LABEL}", "view=all",
            f"weights={weights}", "size=299", f"epochs={args.epochs}",
            f"batch_size={args.batch_size}", "device=cuda", "precision=auto",
            f"workers={args.workers}", "valid_fraction=0.15", "seed=0",
        ],
    )  # fmt: skip
    start = time.perf_counter()
    result = train(config, run_dir=out / config.name)
    minutes = (time.perf_counter() - start) / 60
    valid = load_split(RunFolder(result.run_dir).split).apply(load_table(labels_csv))[1]
    evaluation = evaluate_checkpoint(result.best_checkpoint, valid, view="all", n_resamples=10,
                                     device="cuda")  # fmt: skip
    pred = evaluation.predictions
    save_probabilities(result.run_dir / "valid_probabilities.csv", np.array(pred.paths),
                       pred.y_score[:, 0])  # fmt: skip
    figures = score(pred.y_true[:, 0], pred.y_score[:, 0], np.array(pred.patient_ids),
                    pred.thresholds.values[0], seed=0)  # fmt: skip
    print(f"device: {torch.cuda.get_device_name(0)}; {config.epochs} epochs in {minutes:.1f} min; "
          f"training {result.metrics['images_per_s']:.0f} images/s (median step)")  # fmt: skip
    for name, published in PUBLISHED.items():
        print(f"{name}: {figures[name]:.3f} ({figures[name + ' low']:.3f}-"
              f"{figures[name + ' high']:.3f})   Kermany et al. {published:.3f}")  # fmt: skip
    print(f"threshold {figures['Threshold']:.3f}; checkpoint {result.best_checkpoint}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="compact copy of the films and weights (needs ../shared)")
    p.add_argument("--out", type=Path, default=Path("gpu-pack"))
    p.add_argument("--side", type=int, default=299)
    p.add_argument("--quality", type=int, default=30)
    p.add_argument("--max-mb", type=float, default=62.0)
    p = sub.add_parser("run", help="fine-tune on the GPU from a pack")
    p.add_argument("--pack", type=Path, default=Path("gpu-pack"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=12)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.command == "pack":
        pack(args.out, args.side, args.quality, args.max_mb)
    else:
        run(args.pack, args.out, args)


if __name__ == "__main__":
    main()
