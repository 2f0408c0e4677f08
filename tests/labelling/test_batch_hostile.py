"""Batch labelling on hostile inputs (issue 11): names that are not UTF-8, folders the walk
cannot enter, named pipes and devices, films over the size cap, decoders that spin or crash.
Each case must be reported in errors.csv (or labelled) while the job goes on."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cxrlabel.cli import main
from cxrlabel.data.inputs import name_bytes
from cxrlabel.data.labels import LabelError
from cxrlabel.labelling import batch
from cxrlabel.labelling.batch import label_inputs
from cxrlabel.labelling.journal import PARTIAL_DIR
from cxrlabel.models.predictor import load_model
from tests.labelling.test_batch import LABELS, make_checkpoint

# A run that hangs on today's code must fail the test, not the suite: generous for a loaded
# 2-core machine, yet far below "forever".
GUARD_S = 90.0
BAD_NAME = os.fsdecode(b"bad_\xff.jpg")  # not valid UTF-8: a lone surrogate in Python


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:  # strict: the CSVs must be UTF-8
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "tiny-run"
    return make_checkpoint(run / "checkpoints" / "best.safetensors", labels=LABELS)


@pytest.fixture(scope="module")
def model(checkpoint: Path):
    return load_model([checkpoint], backend="torch", device="cpu")


@pytest.fixture
def film(tiny_dataset: Path) -> Path:
    return sorted((tiny_dataset / "valid").rglob("*.jpg"))[0]


def finishes(fn: Callable[[], Any], seconds: float = GUARD_S) -> Any:
    """fn's result, or a test failure (not a hung suite) when it has not returned in time."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # re-raised below, in the test's thread
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"labelling did not finish within {seconds} s (it hangs)"
    if "error" in result:
        raise result["error"]
    return result["value"]


def by_name(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {Path(os.fsdecode(name_bytes(r["Path"]))).name: r for r in rows}


# --------------------------------------------------------------------------------------------
# 2. File names that are not valid UTF-8
# --------------------------------------------------------------------------------------------


def test_a_name_that_is_not_utf8_is_labelled_written_losslessly_and_resumes(
    model, film: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "films"
    folder.mkdir()
    shutil.copy(film, folder / BAD_NAME)
    shutil.copy(film, folder / "good.jpg")
    out = tmp_path / "out"

    def stop(done: int) -> None:
        raise KeyboardInterrupt

    # The bad name sorts first: the first batch holds it alone; stop after it, then resume.
    with pytest.raises(KeyboardInterrupt):
        label_inputs([folder], model, out, batch_size=1, progress=False, on_batch=stop)
    assert (out / PARTIAL_DIR / "state.json").is_file()
    summary = label_inputs([folder], model, out, batch_size=1, progress=False)
    assert (summary.resumed_after, summary.labelled, summary.errors) == (1, 2, 0)

    for name in ("labels.csv", "probabilities.csv", "images.csv"):
        rows = read_rows(out / name)
        cells = [r["Path"] for r in rows]
        assert cells == [f"{folder}/bad_\\xff.jpg", f"{folder}/good.jpg"], name
        # Lossless: the cell gives back the file's exact bytes.
        assert name_bytes(cells[0]) == os.fsencode(folder / BAD_NAME)
    assert read_rows(out / "errors.csv") == []


def test_labels_csv_with_an_escaped_name_reads_back_as_an_input(
    model, film: Path, tmp_path: Path
) -> None:
    """labels.csv's `\\xHH` cells name the exact files again when the CSV is an input."""
    folder = tmp_path / "films"
    folder.mkdir()
    shutil.copy(film, folder / BAD_NAME)
    first, again = tmp_path / "first", tmp_path / "again"
    label_inputs([folder], model, first, progress=False)
    shutil.copy(first / "labels.csv", folder / "labels.csv")  # its paths are inside `folder`
    summary = label_inputs([folder / "labels.csv"], model, again, progress=False)
    assert (summary.labelled, summary.errors) == (1, 0)
    assert [r["Path"] for r in read_rows(again / "labels.csv")] == [f"{folder}/bad_\\xff.jpg"]


def test_label_command_succeeds_on_a_name_that_is_not_utf8(
    checkpoint: Path, film: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "films"
    folder.mkdir()
    shutil.copy(film, folder / BAD_NAME)
    shutil.copy(film, folder / "good.jpg")
    out = tmp_path / "out"
    args = ["label", str(folder), "--model", str(checkpoint), "--out", str(out)]
    assert main([*args, "--backend", "torch", "--device", "cpu", "--no-progress"]) == 0
    assert len(read_rows(out / "labels.csv")) == 2


def test_label_command_size_cap_and_time_limit_flags(
    checkpoint: Path, film: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "films"
    folder.mkdir()
    shutil.copy(film, folder / "a.jpg")
    args = ["label", str(folder), "--model", str(checkpoint), "--backend", "torch"]
    args += ["--device", "cpu", "--no-progress", "--out", str(tmp_path / "out")]
    tiny = film.stat().st_size / 2**20 / 2
    assert main([*args, "--max-file-mb", str(tiny), "--read-timeout", "0"]) == 0
    (row,) = read_rows(tmp_path / "out" / "errors.csv")
    assert row["error"] == "FileTooLargeError"
    assert main([*args, "--read-timeout", "-1"]) == 2


def test_an_unreadable_film_with_a_name_that_is_not_utf8_is_reported(model, tmp_path: Path) -> None:
    folder = tmp_path / "films"
    folder.mkdir()
    (folder / BAD_NAME).write_bytes(b"not a jpeg")
    summary = label_inputs([folder], model, tmp_path / "out", progress=False)
    (row,) = read_rows(tmp_path / "out" / "errors.csv")
    assert summary.errors == 1 and row["error"] == "NotAnImageError"
    assert name_bytes(row["Path"]) == os.fsencode(folder / BAD_NAME)


# --------------------------------------------------------------------------------------------
# 4. Folders the walk cannot enter
# --------------------------------------------------------------------------------------------


def _films_with_a_locked_folder(film: Path, root: Path) -> Path:
    folder = root / "films"
    (folder / "locked").mkdir(parents=True)
    shutil.copy(film, folder / "a.jpg")
    shutil.copy(film, folder / "locked" / "b.jpg")
    shutil.copy(film, folder / "z.jpg")
    return folder


def test_a_folder_the_walk_cannot_list_goes_to_errors_and_the_job_goes_on(
    model, film: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _films_with_a_locked_folder(film, tmp_path)
    real_scandir = os.scandir

    def scandir(path: Any = ".") -> Any:
        if isinstance(path, str | os.PathLike) and Path(path) == folder / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    summary = label_inputs([folder], model, tmp_path / "out", progress=False)
    monkeypatch.undo()
    errors = read_rows(tmp_path / "out" / "errors.csv")
    assert [(r["Path"], r["error"]) for r in errors] == [
        (f"{folder}/locked", "UnreadableFolderError")
    ]
    assert "Permission denied" in errors[0]["reason"]
    labelled = [Path(r["Path"]).name for r in read_rows(tmp_path / "out" / "labels.csv")]
    assert labelled == ["a.jpg", "z.jpg"]
    assert (summary.labelled, summary.errors) == (2, 1)


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0,
    reason="running as root: chmod 000 does not stop root reading a folder (the walk's error "
    "handling is tested by injection in the test above)",
)
def test_a_chmod_000_folder_goes_to_errors(model, film: Path, tmp_path: Path) -> None:
    folder = _films_with_a_locked_folder(film, tmp_path)
    (folder / "locked").chmod(0)
    try:
        summary = label_inputs([folder], model, tmp_path / "out", progress=False)
    finally:
        (folder / "locked").chmod(0o755)
    errors = read_rows(tmp_path / "out" / "errors.csv")
    assert [(r["Path"], r["error"]) for r in errors] == [
        (f"{folder}/locked", "UnreadableFolderError")
    ]
    assert summary.labelled == 2


# --------------------------------------------------------------------------------------------
# 5. Named pipes, devices, the size cap and the time limit
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
def test_a_named_pipe_and_a_link_to_dev_zero_are_reported_not_read(
    model, film: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "films"
    folder.mkdir()
    shutil.copy(film, folder / "good.jpg")
    os.mkfifo(folder / "pipe.png")
    os.mkfifo(folder / "pipe")  # suffix-less: not opened to look for DICOM either
    os.symlink("/dev/zero", folder / "x.dcm")
    out = tmp_path / "out"
    summary = finishes(lambda: label_inputs([folder], model, out, progress=False))
    errors = by_name(read_rows(out / "errors.csv"))
    assert set(errors) == {"pipe.png", "x.dcm"}
    assert {r["error"] for r in errors.values()} == {"NotARegularFileError"}
    assert "FIFO" in errors["pipe.png"]["reason"]
    assert "character device" in errors["x.dcm"]["reason"]
    assert (summary.labelled, summary.errors) == (1, 2)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
def test_a_named_pipe_given_as_an_input_is_reported(model, tmp_path: Path) -> None:
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)
    summary = finishes(lambda: label_inputs([pipe], model, tmp_path / "out", progress=False))
    (row,) = read_rows(tmp_path / "out" / "errors.csv")
    assert row["error"] == "NotARegularFileError" and summary.errors == 1


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
def test_a_named_pipe_given_as_a_csv_input_is_refused_naming_it(model, tmp_path: Path) -> None:
    pipe = tmp_path / "labels.csv"
    os.mkfifo(pipe)
    with pytest.raises(LabelError, match=r"labels\.csv: not a regular file \(FIFO"):
        finishes(lambda: label_inputs([pipe], model, tmp_path / "out", progress=False))


def test_a_film_over_the_size_cap_is_reported(model, film: Path, tmp_path: Path) -> None:
    folder = tmp_path / "films"
    folder.mkdir()
    shutil.copy(film, folder / "a.jpg")
    (folder / "big.png").write_bytes(b"\x89PNG" + bytes(film.stat().st_size * 2))
    summary = label_inputs(
        [folder], model, tmp_path / "out", progress=False, max_file_bytes=film.stat().st_size
    )
    (row,) = read_rows(tmp_path / "out" / "errors.csv")
    assert (Path(row["Path"]).name, row["error"]) == ("big.png", "FileTooLargeError")
    assert str(film.stat().st_size) in row["reason"]
    assert (summary.labelled, summary.errors) == (1, 1)


def _films(film: Path, root: Path) -> Path:
    folder = root / "films"
    folder.mkdir()
    for name in ("a.jpg", "b_stuck.jpg", "c.jpg"):
        shutil.copy(film, folder / name)
    return folder


@pytest.mark.skipif(sys.platform != "linux", reason="the spin is injected into a forked reader")
def test_a_decoder_that_spins_is_stopped_by_the_time_limit(
    model, film: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = batch.read_image_with_info

    def spin_on_stuck(source: Any, **kwargs: Any) -> Any:
        if "stuck" in str(kwargs.get("name", source)):
            while True:  # pure Python or C: only stopping the process ends it
                pass
        return real(source, **kwargs)

    monkeypatch.setattr(batch, "read_image_with_info", spin_on_stuck)
    folder = _films(film, tmp_path)
    out = tmp_path / "out"
    summary = finishes(lambda: label_inputs([folder], model, out, progress=False, read_timeout=2.0))
    (row,) = read_rows(out / "errors.csv")
    assert (Path(row["Path"]).name, row["error"]) == ("b_stuck.jpg", "ReadTimeoutError")
    assert "2" in row["reason"]
    labelled = [Path(r["Path"]).name for r in read_rows(out / "labels.csv")]
    assert labelled == ["a.jpg", "c.jpg"] and summary.errors == 1


@pytest.mark.skipif(sys.platform != "linux", reason="the crash is injected into a forked reader")
def test_a_decoder_that_crashes_the_reader_is_reported_and_the_job_goes_on(
    model, film: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = batch.read_image_with_info

    def crash_on_stuck(source: Any, **kwargs: Any) -> Any:
        if "stuck" in str(kwargs.get("name", source)):
            os.kill(os.getpid(), signal.SIGKILL)  # as a segfaulting decoder or the OOM killer
        return real(source, **kwargs)

    monkeypatch.setattr(batch, "read_image_with_info", crash_on_stuck)
    folder = _films(film, tmp_path)
    out = tmp_path / "out"
    summary = finishes(lambda: label_inputs([folder], model, out, progress=False))
    (row,) = read_rows(out / "errors.csv")
    assert (Path(row["Path"]).name, row["error"]) == ("b_stuck.jpg", "ReaderCrashedError")
    assert summary.labelled == 2
