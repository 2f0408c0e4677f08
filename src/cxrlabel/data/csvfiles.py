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


def outside_reason(root: Path, text: str) -> str | None:
    """Why the `Path` cell `text` leaves `root`, or None when it stays inside."""
    if "\x00" in text:
        return "the path contains a NUL character"
    base = Path(os.path.abspath(root))
    joined = Path(os.path.normpath(base / text))  # an absolute `text` replaces `base`
    if not joined.is_relative_to(base):
        return f"the path leads outside {base}"
    try:
        real, real_base = joined.resolve(), base.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop, an unreadable link
        return f"the path cannot be resolved ({exc})"
    if not real.is_relative_to(real_base):
        return f"the path is a link to {real}, outside {real_base}"
    return None


def outside_message(source: str | Path, line: int | None, text: str, reason: str) -> str:
    where = f"{source}: line {line}" if line is not None else str(source)
    return f"{where}: Path {text!r} refused: {reason} (give {ALLOW_FLAG} to read it anyway)"


def check_path(
    root: Path, text: str, *, source: str | Path, line: int | None, allow_outside: bool
) -> Path:
    """The file a `Path` cell names, or OutsidePathError naming the CSV, line and path."""
    if not allow_outside:
        reason = outside_reason(root, text)
        if reason is not None:
            raise OutsidePathError(outside_message(source, line, text, reason))
    return Path(root) / text


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
