"""Labelling under torchrun (gloo, 2 CPU processes): each rank labels its share into its own
journal and rank 0 merges; the outputs are byte-identical to a one-process run, and a run
with a rank that died is continued without duplicate or missing rows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cxrlabel.cli import main as cli_main
from cxrlabel.distributed import DistEnv
from cxrlabel.labelling.batch import label_inputs
from cxrlabel.labelling.journal import PARTS_DIR, rank_partial_dir
from tests.labelling.test_batch import make_checkpoint

ROOT = Path(__file__).resolve().parents[2]
JOB = Path(__file__).with_name("dist_label_job.py")
CSV_FILES = (
    "labels.csv",
    "probabilities.csv",
    "images.csv",
    "errors.csv",
    "study_labels.csv",
    "study_probabilities.csv",
)
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def films(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Nine films in patient/study folders (study files are written) and one broken file, so
    the ranks' shares differ in size and errors.csv has a row."""
    out = tmp_path_factory.mktemp("dist") / "films"
    for k, film in enumerate(sorted((tiny_dataset / "train").rglob("*.jpg"))[:9]):
        target = out / film.relative_to(tiny_dataset / "train")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(film, target)
        if k == 4:
            (target.parent / "broken.jpg").write_bytes(b"not an image")
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("dist-runs") / "tiny-run"
    return make_checkpoint(run / "checkpoints" / "best.safetensors")


def _label_args(films: Path, checkpoint: Path, out: Path, *, heatmaps: bool) -> list[str]:
    return [
        "label", str(films), "--model", str(checkpoint), "--out", str(out), "--device", "cpu",
        "--backend", "torch", "--batch-size", "2", "--no-progress", "--read-timeout", "0",
        *(["--heatmaps"] if heatmaps else []),
    ]  # fmt: skip


def _single(films: Path, checkpoint: Path, out: Path, *, heatmaps: bool) -> Path:
    """The one-process run a distributed run must equal."""
    assert cli_main(_label_args(films, checkpoint, out, heatmaps=heatmaps)) == 0
    return out


def _torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + str(ROOT)}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return subprocess.run(
        [*command, "--nproc-per-node", "2", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def _assert_same_outputs(out: Path, single: Path) -> None:
    for name in CSV_FILES:
        assert (out / name).read_bytes() == (single / name).read_bytes(), name
    # Heatmap folders are named by the global input number, so they match too.
    heatmaps = sorted(p.relative_to(out).as_posix() for p in out.glob("heatmaps/*/*.png"))
    assert heatmaps == sorted(
        p.relative_to(single).as_posix() for p in single.glob("heatmaps/*/*.png")
    )
    assert not (out / PARTS_DIR).exists()


def test_two_ranks_write_the_one_process_outputs(
    films: Path, checkpoint: Path, tmp_path: Path
) -> None:
    single = _single(films, checkpoint, tmp_path / "single", heatmaps=True)
    out = tmp_path / "out"
    done = _torchrun("-m", "cxrlabel", *_label_args(films, checkpoint, out, heatmaps=True))
    assert done.returncode == 0, done.stderr[-3000:]
    assert any(single.glob("heatmaps/*/*.png"))
    _assert_same_outputs(out, single)
    run = json.loads((out / "run.json").read_text())
    alone = json.loads((single / "run.json").read_text())
    for key in ("inputs", "labelled", "errors", "studies", "heatmaps"):
        assert run["summary"][key] == alone["summary"][key], key
    assert [r["inputs"] for r in run["ranks"]] == [5, 5]  # 10 inputs, every other one
    assert run["arguments"] == alone["arguments"]  # the rank's share is not an argument
    assert "films labelled" in done.stdout and done.stdout.count("films labelled") == 1


def test_a_rank_that_died_is_continued_without_duplicates(
    films: Path, checkpoint: Path, tmp_path: Path
) -> None:
    single = _single(films, checkpoint, tmp_path / "single", heatmaps=False)
    out = tmp_path / "out"
    failed = _torchrun(str(JOB), str(checkpoint), str(out), "1", str(films))
    assert failed.returncode != 0 and "RankKilled" in failed.stderr, failed.stderr[-3000:]
    state = json.loads((out / rank_partial_dir(1) / "state.json").read_text())
    assert state["done"] == 2  # rank 1 committed its first batch, then died
    assert not (out / "labels.csv").exists()
    # The same run again, through the CLI (the same arguments), no rank failing this time.
    done = _torchrun("-m", "cxrlabel", *_label_args(films, checkpoint, out, heatmaps=False))
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_outputs(out, single)
    run = json.loads((out / "run.json").read_text())
    assert run["summary"]["resumed_after"] >= 2  # rank 1's committed batch was not redone


def test_a_single_process_run_refuses_an_interrupted_torchrun_run(
    films: Path, checkpoint: Path, tmp_path: Path
) -> None:
    from cxrlabel.models.predictor import load_model

    (tmp_path / rank_partial_dir(0)).mkdir(parents=True)
    model = load_model([checkpoint], backend="torch", device="cpu")
    with pytest.raises(ValueError, match="interrupted torchrun labelling run"):
        label_inputs([films], model, tmp_path, progress=False, env=DistEnv.single())


def test_a_rank_journal_refuses_another_number_of_processes(checkpoint: Path, tmp_path: Path):
    """A rank's manifest names its share, so continuing with 3 processes what 2 started (the
    shares would differ) is refused by the journal, naming what changed."""
    from cxrlabel.labelling import batch
    from cxrlabel.models.predictor import load_model

    model = load_model([checkpoint], backend="torch", device="cpu")

    def start(world: int) -> None:
        env = DistEnv(rank=0, world_size=world)
        labeller = batch._Labeller(model, None, tmp_path, None, env=env)
        assert labeller.journal.dir == tmp_path / rank_partial_dir(0)
        labeller.journal.start(
            batch._manifest([tmp_path], model, None, False, None, False, False, env)
        )

    start(2)
    start(2)  # the same share resumes
    with pytest.raises(ValueError, match="shard differ"):
        start(3)
