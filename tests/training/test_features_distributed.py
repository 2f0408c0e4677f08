"""Feature extraction under torchrun: 2 gloo processes on the CPU against one process.

Each run is a real ``python -m torch.distributed.run --standalone --nproc-per-node 2`` job:
`cxrlabel extract` through tests/training/ddp_entry.py (which records rank 1's file writes), or
tests/training/dist_extract_job.py, which stops rank 1 after its first batch as if it were
killed. Batches of 3 over the tiny tables give several batches per rank, shared unevenly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from cxrlabel.config import HeadConfig
from cxrlabel.data.formats import load_table
from cxrlabel.models.factory import TINY_PREPROCESSING
from cxrlabel.training.features import PARTS_DIR, extract_features
from cxrlabel.training.heads import run_extract

HERE = Path(__file__).parent
SRC = HERE.parents[1] / "src"

# Module-wide: see conftest.one_thread (the torchrun processes get OMP_NUM_THREADS=1).
pytestmark = pytest.mark.usefixtures("one_thread")


def _torchrun(script: Path, *args: str, env: dict[str, str] | None = None):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(script), *args,
    ]  # fmt: skip
    environ = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{SRC.parent}", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        command, env={**environ, **(env or {})}, capture_output=True, text=True, timeout=240
    )


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_cli_extract_on_two_processes_writes_the_one_process_files(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    values = {"train_csv": str(tiny_dataset / "train.csv"), "valid_fraction": 0.3,
              "extract_batch_size": 3, "runs_dir": str(tmp_path)}  # fmt: skip
    one = tmp_path / "one"
    run_extract(HeadConfig.build("tiny-heads", values), one, progress=False)
    two = tmp_path / "two"
    overrides = [f"{k}={v}" for k, v in values.items()]
    done = _torchrun(
        HERE / "ddp_entry.py", "extract", "--preset", "tiny-heads", "--run-dir", str(two),
        *overrides, env={"CXR_AUDIT_ROOT": str(two)},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "rank 1 of 2 joined (gloo)" in done.stderr  # the job did run distributed
    assert done.stdout.count("tiny train: extracted 17 x 128") == 1  # rank 0 reports alone

    expected, got = _files(one), _files(two)
    assert any(name.endswith("features.safetensors") for name in expected)
    assert got.keys() == expected.keys()  # config, split, both caches; no parts left
    for name in expected:
        assert got[name] == expected[name], name

    # Rank 1 wrote only its parts (and made the folders above them).
    (audit,) = [json.loads(line[6:]) for line in done.stdout.splitlines() if line[:6] == "AUDIT "]
    parts_dirs = [p.parent / PARTS_DIR for p in two.rglob("meta.json")]
    writes = [e.split(" ", 1) for e in audit]
    assert any(event == "open" and PARTS_DIR in Path(p).parts for event, p in writes)
    for event, path in writes:
        inside = PARTS_DIR in Path(path).parts
        above = event == "os.mkdir" and any(d.is_relative_to(path) for d in parts_dirs)
        assert inside or above, f"rank 1: {event} {path}"


def _dataset_with_a_broken_film(tiny_dataset: Path, root: Path) -> Path:
    """A copy of the tiny train table with an unreadable film as row 4 (in rank 1's batch 1)."""
    shutil.copytree(tiny_dataset, root)
    film = Path("train/patient99999/study1/broken.jpg")
    (root / film).parent.mkdir(parents=True)
    (root / film).write_bytes(b"not an image")
    lines = (root / "train.csv").read_text().splitlines(keepends=True)
    broken = f"{film.as_posix()}," + lines[1].split(",", 1)[1]
    (root / "train.csv").write_text("".join([*lines[:5], broken, *lines[5:]]))
    return root / "train.csv"


def test_killed_rank_resumes_to_the_one_process_files(tiny_dataset: Path, tmp_path: Path) -> None:
    csv = _dataset_with_a_broken_film(tiny_dataset, tmp_path / "data")
    single = tmp_path / "one"
    extract_features(load_table(csv), "tiny", "none", replace(TINY_PREPROCESSING, size=32),
                     single, batch_size=3, progress=False)  # fmt: skip
    meta = json.loads((single / "meta.json").read_text())
    assert [s["path"].endswith("broken.jpg") for s in meta["skipped"]] == [True]
    batches = -(-meta["table_rows"] // 3)

    cache = tmp_path / "two"
    killed = _torchrun(HERE / "dist_extract_job.py", str(csv), str(cache), "3", "1")
    assert killed.returncode != 0 and "RankKilled: rank 1 stopped after batch 1" in killed.stderr
    assert not (cache / "meta.json").exists() and not (cache / "features.safetensors").exists()
    parts = sorted(p.name for p in (cache / PARTS_DIR).glob("batch-*.safetensors"))
    assert "batch-000001.safetensors" in parts and "batch-000003.safetensors" not in parts
    assert len(parts) < batches

    resumed = _torchrun(HERE / "dist_extract_job.py", str(csv), str(cache), "3", "-1")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "rank 1: 1 of its 4 batches were journaled already" in resumed.stderr
    assert _files(cache) == _files(single)  # same rows once each, same skipped; parts removed
