"""Input discovery: the folder walk's order and its failures, the regular-file and size rules
for reading a film, and the lossless CSV form of file names (issue 11: 2, 4, 5)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cxrlabel.data import inputs
from cxrlabel.data.images import MissingImageError
from cxrlabel.data.inputs import (
    FileTooLargeError,
    LinkedFolderError,
    NotARegularFileError,
    UnreadableEntryError,
    UnreadableFolderError,
    csv_name,
    iter_inputs,
    name_bytes,
    read_film_bytes,
)

DICOM_HEAD = bytes(128) + b"DICM"
GUARD_S = 60.0


# --------------------------------------------------------------------------------------------
# File names in CSVs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"good.jpg", "good.jpg"),
        ("r\u00f6ntgen \u80f8.png".encode(), "r\u00f6ntgen \u80f8.png"),  # valid UTF-8: unchanged
        (b"bad_\xff.jpg", "bad_\\xff.jpg"),
        (b"C:\\data\\x.png", "C:\\data\\x.png"),  # a backslash that reads as no escape: kept
        (b"lit\\xff.jpg", "lit\\\\xff.jpg"),  # literal backslash-x-ff: doubled, so unambiguous
        (b"\\\xfe", "\\\\\\xfe"),
    ],
)
def test_csv_name_examples(raw: bytes, text: str) -> None:
    assert csv_name(os.fsdecode(raw)) == text
    assert name_bytes(text) == raw


# Arbitrary bytes, and strings of the characters escapes are made of (where mistakes hide).
ESCAPE_PARTS = st.lists(st.sampled_from([b"\\", b"x", b"f", b"\xff", b"a"])).map(b"".join)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.binary(max_size=40) | ESCAPE_PARTS)
def test_csv_name_is_lossless_utf8_for_any_bytes(raw: bytes) -> None:
    text = csv_name(os.fsdecode(raw))
    text.encode("utf-8")  # strict: the CSVs stay UTF-8
    assert name_bytes(text) == raw


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30))
def test_csv_name_changes_no_utf8_name_without_backslashes(text: str) -> None:
    if "\\" not in text:
        assert csv_name(text) == text


# --------------------------------------------------------------------------------------------
# The walk
# --------------------------------------------------------------------------------------------


def _tree(root: Path) -> Path:
    for rel in ("b.png", "a/z.jpg", "a/y/x.dcm", "a/c.JPG", "c/d.jpeg", "notes.txt", ".hid/e.png"):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    (root / "a" / "dicom_no_suffix").write_bytes(DICOM_HEAD)
    (root / "a" / "README").write_bytes(b"not dicom")
    return root


def _os_walk_order(folder: Path) -> list[str]:
    """The walk as it was (os.walk): resume hashes the input order, so it must not change."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            suffix = path.suffix.lower()
            head = path.read_bytes()[:132] if not suffix else b""
            if suffix in inputs.IMAGE_SUFFIXES or (not suffix and head[128:] == b"DICM"):
                found.append(path.relative_to(folder).as_posix())
    return found


def test_walk_order_is_os_walk_order(tmp_path: Path) -> None:
    folder = _tree(tmp_path / "t")
    items = list(iter_inputs([folder]))
    assert [i.path.relative_to(folder).as_posix() for i in items] == _os_walk_order(folder)
    assert all(i.error is None for i in items)
    assert items[0].display == f"{folder}/b.png"


def test_an_unlistable_folder_is_an_item_with_its_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _tree(tmp_path / "t")
    real = os.scandir

    def scandir(path: Any = ".") -> Any:
        if isinstance(path, str | os.PathLike) and Path(path) in (folder / "a" / "y", folder):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    (top,) = iter_inputs([folder])  # the top folder itself
    assert isinstance(top.error, UnreadableFolderError) and top.path == folder
    assert top.display == str(folder) and "Permission denied" in top.error.reason
    monkeypatch.setattr(os, "scandir", lambda p=".": scandir(p) if Path(p) != folder else real(p))
    items = list(iter_inputs([folder]))
    failed = [i for i in items if i.error is not None]
    assert [(i.display, type(i.error)) for i in failed] == [
        (f"{folder}/a/y", UnreadableFolderError)
    ]
    # In walk order: after a's files, before c's.
    names = [i.path.relative_to(folder).as_posix() for i in items]
    assert names.index("a/y") == names.index("c/d.jpeg") - 1


class _UnstatableEntry:
    """A DirEntry whose stat fails (what a folder readable but not searchable gives on file
    systems without d_type, or a link into such a folder)."""

    def __init__(self, entry: os.DirEntry[str]) -> None:
        self.name, self.path = entry.name, entry.path

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        raise PermissionError(13, "Permission denied", self.path)

    is_file = is_symlink = is_dir


def test_an_entry_that_cannot_be_stat_ed_is_an_item_with_its_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _tree(tmp_path / "t")
    real = os.scandir

    class Listing:
        def __init__(self, path: Any) -> None:
            self.inner = real(path)

        def __enter__(self) -> Any:
            entries = list(self.inner.__enter__())
            return [_UnstatableEntry(e) if e.name == "y" else e for e in entries]

        def __exit__(self, *exc: Any) -> None:
            self.inner.__exit__(*exc)

    monkeypatch.setattr(os, "scandir", Listing)
    items = list(iter_inputs([folder]))
    (failed,) = [i for i in items if i.error is not None]
    assert failed.path == folder / "a" / "y" and isinstance(failed.error, UnreadableEntryError)
    assert "cannot stat" in failed.error.reason and "Permission denied" in failed.error.reason


def test_a_linked_folder_is_reported_not_followed(tmp_path: Path) -> None:
    folder = _tree(tmp_path / "t")
    os.symlink(folder / "a", folder / "link")
    (item,) = [i for i in iter_inputs([folder]) if i.error is not None]
    assert item.path == folder / "link" and isinstance(item.error, LinkedFolderError)


def test_the_output_folder_is_skipped_silently(tmp_path: Path) -> None:
    folder = _tree(tmp_path / "t")
    (folder / "out").mkdir()
    (folder / "out" / "f.png").write_bytes(b"x")
    items = list(iter_inputs([folder], exclude=folder / "out"))
    assert all("out" not in i.path.parts for i in items) and all(i.error is None for i in items)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
def test_the_walk_never_opens_a_pipe(tmp_path: Path) -> None:
    folder = _tree(tmp_path / "t")
    os.mkfifo(folder / "pipe")  # suffix-less: opening it to look for DICOM would block
    os.mkfifo(folder / "pipe.png")  # a film by name: listed, refused when read
    found: list[Any] = []
    thread = threading.Thread(target=lambda: found.extend(iter_inputs([folder])), daemon=True)
    thread.start()
    thread.join(GUARD_S)
    assert not thread.is_alive(), "the walk blocked on a named pipe"
    names = [i.path.name for i in found]
    assert "pipe.png" in names and "pipe" not in names


# --------------------------------------------------------------------------------------------
# Reading a film's bytes
# --------------------------------------------------------------------------------------------


def test_read_film_bytes_reads_a_regular_file_and_refuses_the_rest(tmp_path: Path) -> None:
    film = tmp_path / "f.png"
    film.write_bytes(b"0123456789")
    assert read_film_bytes(film) == b"0123456789"
    assert read_film_bytes(film, max_bytes=10) == b"0123456789"
    with pytest.raises(FileTooLargeError, match=r"10 bytes, over the 9 byte limit"):
        read_film_bytes(film, max_bytes=9)
    with pytest.raises(NotARegularFileError, match="a folder"):
        read_film_bytes(tmp_path)
    with pytest.raises(MissingImageError):
        read_film_bytes(tmp_path / "nope.png")
    os.symlink(tmp_path / "nope.png", tmp_path / "broken.png")
    with pytest.raises(MissingImageError):
        read_film_bytes(tmp_path / "broken.png")


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero on this platform")
def test_read_film_bytes_refuses_a_link_to_dev_zero(tmp_path: Path) -> None:
    os.symlink("/dev/zero", tmp_path / "x.dcm")
    with pytest.raises(NotARegularFileError, match="character device"):
        read_film_bytes(tmp_path / "x.dcm")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
def test_read_film_bytes_refuses_a_pipe_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(NotARegularFileError, match="FIFO"):
        read_film_bytes(tmp_path / "pipe.png")
