"""The batch labeller's resume journal: append-only partial files plus a small state file.

A run appends each finished batch's rows to ``<out>/.cxrlabel-partial/images.csv`` and
``errors.csv``, then :meth:`Journal.commit` flushes them to disk and atomically rewrites
``state.json``: how many inputs are done, the partial files' byte sizes and a hash of the input
paths so far. ``manifest.json`` holds the run's arguments. A run started again with the same
arguments truncates the partial files to the recorded sizes (dropping a batch that was being
written when it stopped), checks the inputs hash (:meth:`Journal.skip_done`) and goes on, so
rows are neither duplicated nor missing; a restart with different arguments is refused.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

from cxrlabel.fileio import atomic_write_text

log = logging.getLogger(__name__)

PARTIAL_DIR = ".cxrlabel-partial"
# Under torchrun each rank keeps its own journal in PARTS_DIR/rank-K (see `rank_partial_dir`).
PARTS_DIR = ".cxrlabel-parts"
RUN_FILE = "run.json"  # what a finished run leaves in its --out folder


def _path_line(path: Path) -> bytes:
    # The path's exact bytes (os.fsencode), so any name the file system allows hashes, and a
    # UTF-8 name hashes as before.
    return os.fsencode(path) + b"\n"


class Journal:
    """The partial files and state of one labelling run, in ``<out>/.cxrlabel-partial``.

    `earlier_outputs` names what an earlier run left in the output folder that a fresh run
    must remove rather than mix with its own (files or folders, relative to it).
    `partial_dir` is the journal's folder relative to `out_dir` (one rank's part, under
    torchrun).
    """

    def __init__(
        self,
        out_dir: Path,
        image_header: Sequence[str],
        error_header: Sequence[str],
        earlier_outputs: Sequence[str] = (),
        partial_dir: str | Path = PARTIAL_DIR,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.dir = self.out_dir / partial_dir
        self.images = self.dir / "images.csv"
        self.errors = self.dir / "errors.csv"
        self.manifest = self.dir / "manifest.json"
        self.state_file = self.dir / "state.json"
        self.image_header = tuple(image_header)
        self.error_header = tuple(error_header)
        self.earlier_outputs = tuple(earlier_outputs)

    def start(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """A fresh run's empty state, or an interrupted one's (refused if arguments differ)."""
        if self.manifest.is_file():
            old = json.loads(self.manifest.read_text(encoding="utf-8"))
            if old != manifest:
                diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
                raise ValueError(
                    f"{self.out_dir} holds an interrupted labelling run with different "
                    f"arguments ({', '.join(diff)} differ); rerun with the same arguments to "
                    f"continue it, or choose another --out, or delete {self.dir} to start over"
                )
            if self.state_file.is_file():
                return self._resume_state()
        self._remove_earlier_outputs()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        atomic_write_text(self.manifest, json.dumps(manifest, indent=2))
        for path, header in ((self.images, self.image_header), (self.errors, self.error_header)):
            with open(path, "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerow(header)
        state = {
            "done": 0,
            "paths_sha256": hashlib.sha256().hexdigest(),
            "bytes": self._sizes(),
            "counts": {
                "labelled": 0,
                "errors": 0,
                "flagged": 0,
                "flagged_inputs": 0,
                "skipped": 0,
                "heatmaps": 0,
            },
            "seconds": 0.0,
        }
        atomic_write_text(self.state_file, json.dumps(state))
        return state

    def _remove_earlier_outputs(self) -> None:
        """A fresh run into a folder that holds an earlier run (its run.json or partial folder)
        removes that run's `earlier_outputs` (heatmaps are named by input number, so they would
        mix with the new ones; a run whose films have no study ids writes no study files, and
        the old ones must not pass for its own). Someone else's files are left alone."""
        out_dir = self.out_dir
        if not ((out_dir / RUN_FILE).is_file() or self.dir.is_dir()):
            return
        for name in self.earlier_outputs:
            old = out_dir / name
            if old.is_dir():
                log.info("removing %s from an earlier run", old)
                shutil.rmtree(old)
            else:
                old.unlink(missing_ok=True)

    def _sizes(self) -> dict[str, int]:
        return {"images": self.images.stat().st_size, "errors": self.errors.stat().st_size}

    def _resume_state(self) -> dict[str, Any]:
        state = json.loads(self.state_file.read_text(encoding="utf-8"))
        for key, path in (("images", self.images), ("errors", self.errors)):
            size = state["bytes"][key]
            if not path.is_file() or path.stat().st_size < size:
                raise ValueError(
                    f"{path} is shorter than its recorded {size} bytes: the partial run is "
                    f"damaged; delete {self.dir} to start over"
                )
            # Drop whatever a batch that did not finish had written after the last commit.
            with open(path, "r+b") as f:
                f.truncate(size)
        log.info("continuing an interrupted run after %d inputs", state["done"])
        return state

    def skip_done(self, paths: Iterator[Path], state: dict[str, Any]) -> Any:
        """Consume the input paths an interrupted run finished, checking they are the same
        ones; returns the running hash of the paths, for :meth:`advance`."""
        hasher = hashlib.sha256()
        done = state["done"]
        for path in islice(paths, done):
            hasher.update(_path_line(path))
        if hasher.hexdigest() != state["paths_sha256"]:
            raise ValueError(
                f"the inputs changed since the interrupted run in {self.dir} (its first {done} "
                f"files differ now); delete {self.dir} to start over"
            )
        return hasher

    @staticmethod
    def advance(state: dict[str, Any], hasher: Any, paths: Sequence[Path]) -> None:
        """Count a finished batch's inputs as done (in memory; :meth:`commit` records it)."""
        for path in paths:
            hasher.update(_path_line(path))
        state["done"] += len(paths)
        state["paths_sha256"] = hasher.hexdigest()

    def commit(self, state: dict[str, Any], files: Sequence[Any]) -> None:
        """Make the rows appended so far durable, then record them in the state."""
        for f in files:
            f.flush()
            os.fsync(f.fileno())
        state["bytes"] = self._sizes()
        atomic_write_text(self.state_file, json.dumps(state))

    def image_rows(self) -> Iterator[dict[str, str]]:
        return _read_rows(self.images)

    def error_rows(self) -> Iterator[dict[str, str]]:
        return _read_rows(self.errors)

    def arguments(self) -> dict[str, Any]:
        """The manifest the run was started with."""
        return json.loads(self.manifest.read_text(encoding="utf-8"))

    def remove(self) -> None:
        """Delete the partial folder once the final files are written."""
        shutil.rmtree(self.dir)


def rank_partial_dir(rank: int) -> Path:
    """Rank `rank`'s journal folder, relative to the output folder."""
    return Path(PARTS_DIR) / f"rank-{rank}"


class MergedRows:
    """The rows of several ranks' journals as one run's, in input order (by `seq`).

    Each rank's partial files are in `seq` order already, so a streaming merge keeps memory
    flat; the final-file writers read this exactly as they read one :class:`Journal`."""

    def __init__(self, journals: Sequence[Journal]) -> None:
        self.journals = tuple(journals)

    def image_rows(self) -> Iterator[dict[str, str]]:
        return heapq.merge(*(j.image_rows() for j in self.journals), key=_seq)

    def error_rows(self) -> Iterator[dict[str, str]]:
        return heapq.merge(*(j.error_rows() for j in self.journals), key=_seq)


def _seq(row: dict[str, str]) -> int:
    return int(row["seq"])


def _read_rows(path: Path) -> Iterator[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        yield from csv.DictReader(f)
