"""Wall time of a frozen-backbone sweep: feature cache versus recomputing backbone features.

Both sides train the same heads (linear, mlp3, mlp3_dropout) for the same epochs on the same
synthetic films. The difference is the backbone forward passes: once per image with the feature
cache (`heads.sweep`), versus once per image per epoch per head (plus once per head for
validation) without it.

    .venv/bin/python benchmarks/bench_sweep.py [--patients 48] [--epochs 10]

Goal: ratio >= 10x.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from cxrlabel.config import HeadConfig
from cxrlabel.data.cache import prepare_cache
from cxrlabel.data.dataset import CXRDataset, collate_skipping
from cxrlabel.data.formats import load_table
from cxrlabel.data.labels import LABEL_SETS, filter_certain
from cxrlabel.data.splits import patient_split
from cxrlabel.evaluation.metrics import metrics_table
from cxrlabel.models.factory import HEADS, create_backbone, create_head, masked_bce_loss
from cxrlabel.synth import write_dataset
from cxrlabel.training.execution import cpu_name
from cxrlabel.training.features import default_size, extraction_preprocessing
from cxrlabel.training.heads import HeadRun, sweep

LABELS = LABEL_SETS["competition"]


def uncached_sweep(train, valid, backbones, sizes, epochs, workdir: Path) -> dict[str, float]:
    """The naive loop: every epoch of every head runs the frozen backbone over the images again."""
    aurocs = {}
    for backbone in backbones:
        prep = extraction_preprocessing(backbone, sizes[backbone], "pad")
        caches = {
            part: prepare_cache(t.image_paths(), workdir / f"px-{part}-{backbone}", prep.geometry)
            for part, t in (("train", train), ("valid", valid))
        }
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net, _ = create_backbone(backbone, "none")
        net.eval()
        train_ds = CXRDataset(train, LABELS, prep, cache=caches["train"], on_error="skip")
        valid_ds = CXRDataset(valid, LABELS, prep, cache=caches["valid"], on_error="skip")
        dim = int(net(torch.zeros(1, 3, prep.size, prep.size)).shape[1])
        for head_kind in HEADS:
            torch.manual_seed(0)
            head = create_head(head_kind, dim, len(LABELS))
            optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
            loader = DataLoader(train_ds, batch_size=64, shuffle=True, collate_fn=collate_skipping)
            head.train()
            for _ in range(epochs):
                for batch in loader:
                    with torch.no_grad():
                        feats = net(batch["image"])
                    loss = masked_bce_loss(head(feats), batch["target"], batch["mask"])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
            head.eval()
            scores, targets, masks = [], [], []
            with torch.no_grad():
                for batch in DataLoader(valid_ds, batch_size=64, collate_fn=collate_skipping):
                    scores.append(torch.sigmoid(head(net(batch["image"]))).numpy())
                    targets.append(batch["target"].numpy())
                    masks.append(batch["mask"].numpy())
            table = metrics_table(
                np.concatenate(targets), np.concatenate(scores), np.concatenate(masks), LABELS
            )
            aurocs[f"{backbone}/{head_kind}"] = float(table.iloc[-1]["AUROC"])
    return aurocs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--backbones", default="tiny,mobilenet")
    parser.add_argument("--size", type=int, default=96, help="input size (method: 220/224)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads; 1 keeps timings stable on a shared machine (intra-op spin-waits "
        "make small head steps erratic when other processes hold the cores)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backbones = args.backbones.split(",")
    sizes = {b: args.size for b in backbones}

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_dataset(work / "data", patients=args.patients, size=128, seed=0)
        # Synthetic valid.csv is tiny (like CheXpert's); a patient split of train.csv gives a
        # validation part large enough for AUROCs.
        table = filter_certain(load_table(work / "data" / "train.csv"), LABELS)
        train, valid = patient_split(table, valid_fraction=0.25, seed=0).apply(table)
        print(f"CPU: {cpu_name()} ({torch.get_num_threads()} torch threads)")
        method_sizes = [default_size(b) for b in backbones]
        print(f"data: {len(train)} train / {len(valid)} valid images, {args.size} px, "
              f"backbones {backbones} (weights none; method sizes would be {method_sizes}), "
              f"3 heads, {args.epochs} epochs")  # fmt: skip

        # The naive side reads pixels from a preprocessing cache (decoded once), while the cached
        # side decodes JPEGs during its one extraction pass: the ratio is a conservative figure.
        # The first optimizer pays a one-off torch._dynamo import (seconds); keep it out of both.
        torch.optim.Adam([torch.zeros(1, requires_grad=True)])
        start = time.perf_counter()
        naive = uncached_sweep(train, valid, backbones, sizes, args.epochs, work)
        t_naive = time.perf_counter() - start

        start = time.perf_counter()
        config = HeadConfig.build(
            None,
            {"backbones": backbones, "weights": "none", "size": args.size, "epochs": args.epochs,
             "labels": "competition"},
        )  # fmt: skip
        df = sweep(HeadRun(config, train, valid, work / "run"), progress=False)
        t_cached = time.perf_counter() - start

    print(df.round(3).to_string(index=False))
    print(f"recompute features every epoch: {t_naive:8.1f} s  (mean AUROCs "
          f"{np.nanmean(list(naive.values())):.3f})")  # fmt: skip
    print(f"feature cache (extract once):   {t_cached:8.1f} s  (mean AUROCs "
          f"{np.nanmean(df['AUROC']):.3f})")  # fmt: skip
    print(f"speed-up: {t_naive / t_cached:.1f}x (goal >= 10x)")


if __name__ == "__main__":
    main()
