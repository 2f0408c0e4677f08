"""The film reader's child process: results, errors, the time limit and crashes."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from cxrlabel.data.inputs import InputItem
from cxrlabel.labelling.reader import FilmReader, ReaderCrashedError, ReadTimeoutError

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="closures need a forked child")
ITEM = InputItem(Path("film.png"), "film.png")


def test_results_and_errors_come_back_and_the_child_is_reused() -> None:
    def read(seq: int, item: InputItem) -> tuple[int, int]:
        if seq < 0:
            raise ValueError(f"bad seq {seq}")
        return seq, os.getpid()

    with FilmReader(read, timeout=30) as reader:
        (a, pid_a), (b, pid_b) = reader.read(1, ITEM), reader.read(2, ITEM)
        with pytest.raises(ValueError, match="bad seq -1"):
            reader.read(-1, ITEM)
    assert (a, b) == (1, 2) and pid_a == pid_b != os.getpid()


def test_a_stuck_read_is_stopped_and_the_next_gets_a_fresh_child() -> None:
    def read(seq: int, item: InputItem) -> int:
        if seq == 0:
            time.sleep(3600)
        return os.getpid()

    with FilmReader(read, timeout=0.5) as reader:
        started = time.perf_counter()
        with pytest.raises(ReadTimeoutError, match=r"0.5 s limit") as caught:
            reader.read(0, ITEM)
        assert time.perf_counter() - started < 30  # generous: a loaded machine
        assert caught.value.path == ITEM.path
        assert reader.read(1, ITEM) != os.getpid()


def test_a_crash_is_reported_and_the_next_gets_a_fresh_child() -> None:
    def read(seq: int, item: InputItem) -> int:
        if seq == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return seq

    with FilmReader(read, timeout=30) as reader:
        with pytest.raises(ReaderCrashedError, match=str(-signal.SIGKILL)):
            reader.read(0, ITEM)
        assert reader.read(1, ITEM) == 1


def test_no_timeout_reads_in_this_process_and_bad_timeouts_are_refused() -> None:
    with FilmReader(lambda seq, item: os.getpid(), timeout=None) as reader:
        assert reader.read(0, ITEM) == os.getpid()
    with pytest.raises(ValueError, match="positive"):
        FilmReader(lambda seq, item: None, timeout=0)
