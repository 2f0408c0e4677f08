"""Distributed training under torchrun: 2 gloo processes on the CPU against one process.

Each run is a real ``python -m torch.distributed.run --standalone --nproc-per-node 2`` job
(tests/training/ddp_entry.py in each process), so the test covers the launcher's environment
too. The tiny CNN's backbone is frozen here (freeze_stages=4): BatchNorm statistics are per
process under DDP on the CPU (SyncBatchNorm needs CUDA), so only a model without training
BatchNorm can match one process exactly; the head, the optimizer, the data order and the
gradient averaging are what is compared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from cxrlabel.config import build_config
from cxrlabel.distributed import DistEnv, DistributedError, per_process_batch, step_batches
from cxrlabel.models.checkpoint import load_checkpoint
from cxrlabel.training.finetune import train

ENTRY = Path(__file__).with_name("ddp_entry.py")
SRC = Path(__file__).resolve().parents[2] / "src"
# Float sums over two half batches instead of one batch: rounding differs, nothing else.
TOLERANCE = 1e-5


def _values(dataset: Path, runs: Path, **extra: object) -> dict[str, object]:
    return {
        "train_csv": str(dataset / "train.csv"),
        "size": 32,
        "epochs": 2,
        # 6 does not divide the training set: the last step's global batch is partial.
        "batch_size": 6,
        "valid_fraction": 0.25,
        "deterministic": True,
        "seed": 3,
        "lr": 0.01,
        "lr_schedule": "cosine",
        "freeze_stages": 4,
        "threshold_rule": "youden",
        "device": "cpu",
        "precision": "fp32",
        "runs_dir": str(runs),
        "name": "run",
        **extra,
    }


def _torchrun(values: dict[str, object], *args: str, env: dict[str, str] | None = None) -> str:
    overrides = [f"{k}={v}" for k, v in values.items()]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(ENTRY), *args, *overrides,
    ]  # fmt: skip
    environ = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{SRC.parent}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, env={**environ, **(env or {})}, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "rank 1 of 2 joined (gloo)" in done.stderr  # the job did run distributed
    return done.stdout


def _audits(stdout: str) -> list[list[str]]:
    return [json.loads(line[6:]) for line in stdout.splitlines() if line.startswith("AUDIT ")]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    model, _ = load_checkpoint(path)
    return model.state_dict()


def _assert_close(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key].float(), wb[key].float(), atol=TOLERANCE, rtol=0), key


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_step_batches_split_each_global_batch() -> None:
    order = list(range(100, 111))  # 11 images, global batch 4: 4, 4, 3
    ranks = [step_batches(order, 4, DistEnv(rank=r, world_size=2)) for r in range(2)]
    assert [b.indices for b in ranks[0]] == [[100, 101], [104, 105], [108, 109]]
    assert [b.indices for b in ranks[1]] == [[102, 103], [106, 107], [110]]
    assert [b.indices for b in step_batches(order, 4, DistEnv(1, 2), start_step=2)] == [[110]]
    # A last batch smaller than the world: the rank without an image gets a placeholder.
    last = step_batches([1, 2, 3, 4, 5], 4, DistEnv(rank=1, world_size=4))[-1]
    assert last.placeholder and last.indices == [5]


def test_global_batch_must_split_evenly() -> None:
    assert per_process_batch(8, DistEnv(rank=0, world_size=4)) == 2
    with pytest.raises(DistributedError, match=r"batch_size 6 .* 4 processes"):
        per_process_batch(6, DistEnv(rank=0, world_size=4))


@pytest.fixture(scope="module")
def two_runs(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """(a 1-process run, an uninterrupted 2-process run's folder, rank 1's file writes)."""
    tmp = tmp_path_factory.mktemp("ddp")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(build_config("tiny-cpu", _values(tiny_dataset, tmp / "one")))
    finally:
        torch.set_num_threads(previous)
    runs = tmp / "two"
    out = _torchrun(
        _values(tiny_dataset, runs), "train", "--preset", "tiny-cpu",
        env={"CXR_AUDIT_ROOT": str(runs)},
    )  # fmt: skip
    return single, runs / "run", _audits(out)


def test_two_processes_equal_one_and_only_rank0_writes(two_runs: tuple) -> None:
    single, two, audits = two_runs
    assert single.metrics["train_images"] % 6, "the test wants a partial last batch"
    assert audits == [[]], f"rank 1 wrote files: {audits}"
    _assert_close(single.last_checkpoint, two / "checkpoints" / "last")
    _assert_close(single.best_checkpoint, two / "checkpoints" / "best")
    # The same run folder, and validation on the whole set: same AUROCs, same best epoch.
    assert _files(two) == _files(single.run_dir)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["best_epoch"] == single.metrics["best_epoch"]
    assert summary["valid_images"] == single.metrics["valid_images"]
    assert summary["val_auroc_mean"] == pytest.approx(single.metrics["val_auroc_mean"], abs=1e-6)
    a, b = pd.read_csv(single.run_dir / "metrics.csv"), pd.read_csv(two / "metrics.csv")
    for column in ("step", "epoch", "lr", "train_loss", "val_loss"):
        pd.testing.assert_series_equal(a[column], b[column], atol=TOLERANCE, check_exact=False)


def test_two_processes_killed_mid_epoch_resume_exactly(
    two_runs: tuple, tiny_dataset: Path, tmp_path: Path
) -> None:
    _, uninterrupted, _ = two_runs
    values = _values(tiny_dataset, tmp_path)
    run = tmp_path / "run"
    # 17 training images in global batches of 6: 3 steps an epoch; step 4 is inside epoch 1,
    # and `last` was saved at step 2 (epoch 0) and at the stop.
    _torchrun(values, env={"CXR_STOP_AFTER_STEPS": "4", "CXR_EVERY": "2"})
    progress = json.loads((run / "checkpoints" / "last.json").read_text())["extra"]["progress"]
    assert (progress["epoch"], progress["batch"], progress["step"]) == (1, 1, 4)
    _torchrun(values, "train", "--preset", "tiny-cpu", "--resume")
    a = _weights(uninterrupted / "checkpoints" / "last")
    b = _weights(run / "checkpoints" / "last")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    speed = ["images_per_s", "loader_images_per_s"]
    pd.testing.assert_frame_equal(
        pd.read_csv(uninterrupted / "metrics.csv").drop(columns=speed),
        pd.read_csv(run / "metrics.csv").drop(columns=speed),
    )
