"""The batch labeller's resume journal on its own: start, commit, resume, refusals."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from cxrlabel.labelling.journal import PARTIAL_DIR, RUN_FILE, Journal

HEADER = ("seq", "Path", "p:Edema")
ERRORS = ("seq", "Path", "error", "reason")
MANIFEST = {"format": 1, "inputs": ["/data/a"], "model": {"name": "m"}}


def _journal(out: Path) -> Journal:
    return Journal(out, HEADER, ERRORS, earlier_outputs=("heatmaps", "study_labels.csv"))


def test_fresh_start_writes_headers_manifest_and_an_empty_state(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    state = journal.start(MANIFEST)
    assert journal.dir == tmp_path / PARTIAL_DIR
    assert state["done"] == 0 and state["counts"]["labelled"] == 0
    assert journal.arguments() == MANIFEST
    assert list(journal.image_rows()) == [] and list(journal.error_rows()) == []
    assert journal.images.read_text().strip() == ",".join(HEADER)
    assert journal.errors.read_text().strip() == ",".join(ERRORS)
    saved = json.loads(journal.state_file.read_text())
    assert saved["bytes"] == {
        "images": journal.images.stat().st_size,
        "errors": journal.errors.stat().st_size,
    }


def test_resume_truncates_what_was_written_after_the_last_commit(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    state = journal.start(MANIFEST)
    inputs = [Path(f"/data/{i}.png") for i in range(5)]
    hasher = journal.skip_done(iter(inputs), state)
    with (
        open(journal.images, "a", newline="", encoding="utf-8") as images,
        open(journal.errors, "a", newline="", encoding="utf-8") as errors,
    ):
        for seq, path in enumerate(inputs[:2]):
            csv.writer(images).writerow([seq, str(path), "0.5"])
        journal.advance(state, hasher, inputs[:2])
        journal.commit(state, (images, errors))
        # A batch appended but never committed (the run was killed before its commit).
        csv.writer(images).writerow([2, str(inputs[2]), "0.7"])
        csv.writer(errors).writerow([3, str(inputs[3]), "ImageError", "bad"])
    again = _journal(tmp_path)
    resumed = again.start(MANIFEST)
    assert resumed["done"] == 2
    assert [r["Path"] for r in again.image_rows()] == [str(p) for p in inputs[:2]]
    assert list(again.error_rows()) == []
    # The same inputs: the first two are skipped and the rest go on from there.
    remaining = iter(inputs)
    again.skip_done(remaining, resumed)
    assert next(remaining) == inputs[2]


def test_changed_inputs_and_changed_arguments_are_refused(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    state = journal.start(MANIFEST)
    first = [Path("/data/a.png"), Path("/data/b.png")]
    hasher = journal.skip_done(iter(first), state)
    with open(journal.images, "a") as images, open(journal.errors, "a") as errors:
        journal.advance(state, hasher, first)
        journal.commit(state, (images, errors))
    resumed = _journal(tmp_path).start(MANIFEST)
    with pytest.raises(ValueError, match="inputs changed"):
        journal.skip_done(iter([Path("/data/a.png"), Path("/data/other.png")]), resumed)
    with pytest.raises(ValueError, match="inputs changed"):
        journal.skip_done(iter(first[:1]), resumed)  # fewer inputs than were done
    with pytest.raises(ValueError, match=r"different arguments \(model differ\)"):
        _journal(tmp_path).start({**MANIFEST, "model": {"name": "other"}})


def test_a_damaged_partial_file_is_refused(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    journal.start(MANIFEST)
    journal.images.write_text("")  # shorter than the header the state recorded
    with pytest.raises(ValueError, match="damaged"):
        _journal(tmp_path).start(MANIFEST)


def test_a_fresh_start_removes_an_earlier_runs_outputs_only(tmp_path: Path) -> None:
    (tmp_path / "heatmaps" / "000001_film").mkdir(parents=True)
    (tmp_path / "study_labels.csv").write_text("old")
    (tmp_path / "labels.csv").write_text("kept: rewritten by the run itself")
    _journal(tmp_path).start(MANIFEST)  # no earlier run here: nothing is removed
    assert (tmp_path / "heatmaps").is_dir() and (tmp_path / "study_labels.csv").is_file()

    _journal(tmp_path).remove()
    (tmp_path / RUN_FILE).write_text("{}")  # a finished earlier run
    _journal(tmp_path).start(MANIFEST)
    assert not (tmp_path / "heatmaps").exists()
    assert not (tmp_path / "study_labels.csv").exists()
    assert (tmp_path / "labels.csv").is_file()
