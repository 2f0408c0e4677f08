"""Reading films in a child process, so that one film's read has a time limit that holds.

A decoder stuck on a hostile file (a loop in pure Python or in C) cannot be stopped from
another thread, so :class:`FilmReader` runs the read function in one child process and waits
for each film at most `timeout` seconds. On a timeout it kills the child and raises
:class:`ReadTimeoutError`; when the child dies (a decoder crash, the kernel's OOM killer) it
raises :class:`ReaderCrashedError`. Either way the next film starts a fresh child, so one bad
file costs the job that file only.

On Linux the child is forked: it starts in milliseconds and inherits the loaded modules (and a
test's monkeypatches). It only decodes and resizes (Pillow, pydicom, NumPy), never runs torch,
so the parent's torch threads do not matter to it. Elsewhere it is spawned. The child ignores
SIGINT: Ctrl-C stops the parent, which then kills the child.

With ``timeout=None`` films are read in this process, with no time limit.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any, Generic, TypeVar

from cxrlabel.data.inputs import InputError, InputItem

log = logging.getLogger(__name__)

# Per film. A 4000 x 4000 JPEG 2000 DICOM decodes in a few seconds even on a loaded machine;
# two minutes leaves a wide margin and still ends a stuck read.
DEFAULT_READ_TIMEOUT = 120.0
_START_METHOD = "fork" if sys.platform == "linux" else "spawn"
_KILL_WAIT_S = 10.0

T = TypeVar("T")
ReadFn = Callable[[int, InputItem], T]


class ReadTimeoutError(InputError):
    """Reading one film took longer than the time limit; the reading process was stopped."""


class ReaderCrashedError(InputError):
    """The process reading a film died (a decoder crash, or killed for lack of memory)."""


def _serve(conn: Connection, read: ReadFn[Any]) -> None:
    """The child: read each (seq, item) sent, send back (True, film) or (False, exception)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the parent closed its end
            return
        try:
            result: tuple[bool, Any] = (True, read(*job))
        except Exception as exc:  # sent to the parent, which raises it there
            result = (False, exc)
        conn.send(result)


class FilmReader(Generic[T]):
    """``read(seq, item)`` with a time limit per film (see the module doc). Use as a context
    manager so the child is always stopped."""

    def __init__(self, read: ReadFn[T], timeout: float | None = DEFAULT_READ_TIMEOUT) -> None:
        if timeout is not None and timeout <= 0:
            raise ValueError(f"the read timeout must be positive seconds, got {timeout}")
        self._read = read
        self.timeout = timeout
        self._context = multiprocessing.get_context(_START_METHOD)
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None

    def __enter__(self) -> FilmReader[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def read(self, seq: int, item: InputItem) -> T:
        """The read function's result for one film.

        Raises:
            ReadTimeoutError: it ran longer than the timeout (the child was killed).
            ReaderCrashedError: the child died while reading it.
            Exception: whatever the read function raised.
        """
        if self.timeout is None:
            return self._read(seq, item)
        conn = self._start()
        conn.send((seq, item))
        if not conn.poll(self.timeout):
            self.close()
            raise ReadTimeoutError(
                item.path, f"reading took longer than the {self.timeout:g} s limit; stopped"
            )
        try:
            ok, value = conn.recv()
        except (EOFError, OSError):
            code = self._exit_code()
            self.close()
            raise ReaderCrashedError(
                item.path, f"the reading process died while reading it (exit code {code})"
            ) from None
        if not ok:
            raise value
        return value

    def _start(self) -> Connection:
        if self._conn is None:
            parent, child = self._context.Pipe()
            process = self._context.Process(
                target=_serve, args=(child, self._read), name="cxrlabel-reader", daemon=True
            )
            process.start()
            child.close()
            self._process, self._conn = process, parent
        return self._conn

    def _exit_code(self) -> int | None:
        if self._process is None:
            return None
        self._process.join(_KILL_WAIT_S)
        return self._process.exitcode

    def close(self) -> None:
        """Stop the child (killed: it may be stuck) and forget it."""
        if self._conn is not None:
            self._conn.close()
        if self._process is not None:
            if self._process.is_alive():
                self._process.kill()
            self._process.join(_KILL_WAIT_S)
            if self._process.is_alive():
                log.warning("the film reader process %d did not stop", self._process.pid)
            else:
                self._process.close()
        self._process, self._conn = None, None
