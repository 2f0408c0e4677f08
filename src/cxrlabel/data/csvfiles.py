"""Rules for reading label CSVs safely: their paths stay inside the CSV's root, their text is
UTF-8, and failures name the file, the line and the cell.

Path rule: a `Path` cell is joined to the CSV's root (the CSV's folder, or its parent for
CheXpert's own CSVs whose paths start with the dataset folder's name; see
`formats._dataset_root`) and refused when it lands outside that root, checked twice:
lexically after normalising (`..` and absolute paths) and again after resolving symlinks, so a
link inside the dataset that points elsewhere counts as outside too. `allow_outside_paths`
(`--allow-outside-paths` on the command line, `allow_outside_paths: true` in a config) turns
the rule off for datasets that really do live elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

from cxrlabel.data.labels import LabelError

ALLOW_FLAG = "--allow-outside-paths"


class OutsidePathError(LabelError):
    """A label CSV's `Path` cell that leads outside the CSV's root."""


class NotUtf8Error(LabelError):
    """A label CSV whose bytes are not UTF-8 text."""


def _inside(path: str, folder: str) -> bool:
    # Strings, not pathlib: this runs once per row of CSVs with hundreds of thousands of rows.
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class PathGuard:
    """The path rule for one root, with each directory's real path looked up once (a 200,000
    row CSV has its files in far fewer folders, and realpath per row costs seconds)."""

    def __init__(self, root: Path) -> None:
        self.base = Path(os.path.abspath(root))
        self._base = str(self.base)
        self._real: dict[str, str] = {}
        self._real_base = self._real_path(self._base)

    def _real_path(self, path: str) -> str:
        """os.path.realpath(path) for a normalised absolute path, caching every folder."""
        hit = self._real.get(path)
        if hit is not None:
            return hit
        parent, name = os.path.split(path)
        if not name:  # the file system root
            return path
        real = os.path.join(self._real_path(parent), name)
        if os.path.islink(real):
            real = os.path.realpath(real)
        self._real[path] = real
        return real

    def reason(self, text: str) -> str | None:
        """Why the `Path` cell `text` leaves the root, or None when it stays inside."""
        if "\x00" in text:
            return "the path contains a NUL character"
        # normpath removes `..` lexically; an absolute `text` replaces the root.
        joined = os.path.normpath(os.path.join(self._base, text))
        if not _inside(joined, self._base):
            return f"the path leads outside {self._base}"
        try:
            real = self._real_path(joined)
        except (OSError, RuntimeError, ValueError) as exc:  # a loop, a name too long
            return f"the path cannot be resolved ({exc})"
        if not _inside(real, self._real_base):
            return f"the path is a link to {real}, outside {self._real_base}"
        return None


def outside_reason(root: Path, text: str) -> str | None:
    """Why the `Path` cell `text` leaves `root`, or None when it stays inside."""
    return PathGuard(root).reason(text)


def outside_message(source: str | Path, line: int | None, text: str, reason: str) -> str:
    where = f"{source}: line {line}" if line is not None else str(source)
    return f"{where}: Path {text!r} refused: {reason} (give {ALLOW_FLAG} to read it anyway)"


def check_path(
    root: Path | PathGuard,
    text: str,
    *,
    source: str | Path,
    line: int | None,
    allow_outside: bool,
) -> Path:
    """The file a `Path` cell names, or OutsidePathError naming the CSV, line and path."""
    guard = root if isinstance(root, PathGuard) else PathGuard(root)
    if not allow_outside:
        reason = guard.reason(text)
        if reason is not None:
            raise OutsidePathError(outside_message(source, line, text, reason))
    return guard.base / text


def not_utf8_error(path: Path) -> NotUtf8Error:
    """The error for a CSV that failed to decode, naming its first line that is not UTF-8."""
    with open(path, "rb") as f:
        for line, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return NotUtf8Error(
                    f"{path}: not UTF-8 text: line {line}, byte {exc.start + 1} "
                    f"({raw[exc.start : exc.start + 1]!r}); save the CSV as UTF-8"
                )
    return NotUtf8Error(f"{path}: not UTF-8 text; save the CSV as UTF-8")
