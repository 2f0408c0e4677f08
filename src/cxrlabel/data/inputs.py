"""Input discovery: files, folders (recursive) and CSVs with a `Path` column -> films to label,
and what their paths, CSV columns and DICOM tags say about patient, study and view.

Also the rules for touching a film on disk before it is decoded (:func:`read_film_bytes`: only
regular files, at most ``max_bytes``) and for writing file names into CSVs (:func:`csv_name`,
lossless for names that are not valid UTF-8; :func:`name_bytes` is its inverse).

Whatever the folder walk cannot look at (a folder it cannot list, an entry it cannot stat, a
linked folder it does not follow) becomes an :class:`InputItem` carrying the error, so the
labeller reports it in ``errors.csv`` in walk order instead of skipping it silently.
"""

from __future__ import annotations

import csv
import errno
import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cxrlabel.csvcells import restore
from cxrlabel.data.csvfiles import OutsidePathError, PathGuard, not_utf8_error, outside_message
from cxrlabel.data.images import (
    DICOM_SUFFIXES,
    ImageError,
    ImageTooLargeError,
    MissingImageError,
    UnreadableImageError,
)
from cxrlabel.data.labels import OBSERVATIONS, LabelError, chexpert_ids, parse_label_cell

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"}) | DICOM_SUFFIXES

# DICOM ViewPosition values (and CSV view columns) that mean a lateral projection. Decubitus
# views (LLD/RLD) are frontal projections taken lying on one side, so they are not here.
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLAT", "RLAT"})
FRONTAL_VIEWS = frozenset({"PA", "AP", "APS", "APL", "FRONTAL", "AP SUPINE", "AP ERECT"})
_MIMIC_PATH_RE = re.compile(r"(?:^|/)p\d+/(p\d+)/(s\d+)/")


# A film file larger than this is refused before it is read: twice the largest single-frame
# film the decoder's pixel limit allows at 32 bits per pixel (8192 x 8192 x 4 bytes = 256 MiB).
DEFAULT_MAX_FILE_BYTES = 512 * 2**20
_DICOM_HEAD_BYTES = 132  # preamble (128) + "DICM"
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


# --------------------------------------------------------------------------------------------
# Errors: what the walk or the film reader refuses before any decoding
# --------------------------------------------------------------------------------------------


class InputError(ImageError):
    """An input refused before decoding. `path` names it, `reason` says why."""


class UnreadableFolderError(InputError):
    """A folder the walk cannot list (no permission, gone, I/O error): its films are unknown."""


class UnreadableEntryError(InputError):
    """A folder entry whose type cannot be found (stat fails), so it may be a film or a folder."""


class LinkedFolderError(InputError):
    """A symbolic link to a folder inside a walked folder: not followed (links can loop)."""


class NotARegularFileError(InputError):
    """A named pipe, device, socket or folder where a film was expected: never read (reading
    a pipe or /dev/zero would never end)."""


class FileTooLargeError(InputError, ImageTooLargeError):
    """A film file over the byte limit (``max_file_bytes``, ``label --max-file-mb``)."""


@dataclass(frozen=True)
class InputItem:
    """One film to label: where it is, how outputs name it, and what a CSV said about it.

    `error` is set when the film must not be read: the walk could not look at it, or its CSV
    path leads outside the CSV's root. Labelling reports it in errors.csv instead."""

    path: Path
    display: str
    patient_id: str = ""
    study_id: str = ""
    view: str = ""
    error: InputError | OutsidePathError | None = None


# --------------------------------------------------------------------------------------------
# File names in CSVs
# --------------------------------------------------------------------------------------------


def _raw_name(name: str | os.PathLike[str]) -> bytes:
    try:
        return os.fsencode(name)
    except UnicodeEncodeError:  # a lone surrogate that no file system decoding made
        return os.fspath(name).encode("utf-8", "surrogatepass")


def _starts_escape(text: str, i: int) -> bool:
    """Whether text[i:] would read as an escape if a backslash came before it."""
    if i >= len(text):
        return False
    if text[i] == "\\" or "\udc80" <= text[i] <= "\udcff":
        return True
    return text[i] == "x" and len(text) >= i + 3 and set(text[i + 1 : i + 3]) <= _HEX_DIGITS


def csv_name(name: str | os.PathLike[str]) -> str:
    """A file name (or text holding one) as written to the output CSVs, which are UTF-8.

    A name whose bytes are valid UTF-8 is written unchanged, except that a backslash that
    would read as an escape (one before another backslash, before ``xHH`` or before an escaped
    byte) is doubled. Each byte that is not valid UTF-8 is written ``\\xHH`` (lower-case hex,
    Python's ``backslashreplace`` form). Lossless: :func:`name_bytes` gives the exact bytes back.
    """
    text = _raw_name(name).decode("utf-8", "surrogateescape")
    out = []
    for i, char in enumerate(text):
        if "\udc80" <= char <= "\udcff":  # surrogateescape's stand-in for one raw byte
            out.append(f"\\x{ord(char) - 0xDC00:02x}")
        elif char == "\\" and _starts_escape(text, i + 1):
            out.append("\\\\")
        else:
            out.append(char)
    return "".join(out)


def name_bytes(text: str) -> bytes:
    """The exact bytes of a name that :func:`csv_name` wrote (``os.fsdecode`` makes it a path)."""
    out = bytearray()
    i = 0
    while i < len(text):
        if text.startswith("\\\\", i):
            out += b"\\"
            i += 2
        elif text.startswith("\\x", i) and _starts_escape(text, i + 1):
            out.append(int(text[i + 2 : i + 4], 16))
            i += 4
        else:
            out += text[i].encode("utf-8", "surrogateescape")
            i += 1
    return bytes(out)


# --------------------------------------------------------------------------------------------
# Touching a film on disk
# --------------------------------------------------------------------------------------------


def _why(exc: OSError) -> str:
    return exc.strerror or errno.errorcode.get(exc.errno or 0, "") or str(exc)


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "FIFO (named pipe)"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return kind
    return f"file type {stat.S_IFMT(mode):o}"


def _check_regular(path: Path, mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise NotARegularFileError(path, f"not a regular file ({_file_kind(mode)})")


def _open_regular(path: Path) -> int:
    """A descriptor of `path`, which must be a regular file (symlinks followed).

    Checked with stat before opening (opening a device can have side effects) and again on
    the open descriptor (the path may change in between); opened non-blocking so that even a
    pipe swapped in between cannot block the open.
    """
    try:
        _check_regular(path, os.stat(path).st_mode)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise MissingImageError(path, "file does not exist") from None
    except OSError as exc:
        raise UnreadableImageError(path, f"cannot open the file ({_why(exc)})") from exc
    try:
        _check_regular(path, os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_film_bytes(path: Path, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """The whole content of the film file at `path`, refused unless it is a regular file of
    at most `max_bytes` bytes (so a pipe, /dev/zero or a huge file can never stall a job).

    Raises:
        MissingImageError, UnreadableImageError, NotARegularFileError, FileTooLargeError.
    """
    fd = _open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise FileTooLargeError(path, f"file is {size} bytes, over the {max_bytes} byte limit")
        chunks, total = [], 0
        while chunk := os.read(fd, min(max_bytes + 1 - total, 2**24)):
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:  # it grew while being read
                raise FileTooLargeError(path, f"file grew past the {max_bytes} byte limit")
        return b"".join(chunks)
    except OSError as exc:
        raise UnreadableImageError(path, f"cannot read the file ({_why(exc)})") from exc
    finally:
        os.close(fd)


def _has_dicom_preamble(path: Path) -> bool:
    fd = _open_regular(path)
    try:
        return os.read(fd, _DICOM_HEAD_BYTES)[128:] == b"DICM"
    except OSError as exc:
        raise UnreadableImageError(path, f"cannot read the file ({_why(exc)})") from exc
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# The folder walk
# --------------------------------------------------------------------------------------------


def _item(folder: Path, display: str, path: Path, error: InputError | None = None) -> InputItem:
    rel = path.relative_to(folder).as_posix()
    if rel == ".":  # the walked folder itself (it could not be listed)
        return InputItem(path, display or ".", error=error)
    return InputItem(path, f"{display.rstrip('/')}/{rel}" if display else rel, error=error)


def _entry_kind(entry: os.DirEntry[str], path: Path, excluded: Path | None) -> str:
    """'folder' (walk into it), 'film' (an input) or 'skip'; InputError if it cannot be told."""
    try:
        if entry.is_dir():  # follows links, as os.walk did
            if path.resolve() == excluded:
                return "skip"
            if entry.is_symlink():
                raise LinkedFolderError(
                    path, "a link to a folder is not followed (give its target as an input)"
                )
            return "folder"
    except OSError as exc:
        raise UnreadableEntryError(path, f"cannot stat the entry ({_why(exc)})") from exc
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "film"  # a pipe or device with such a name is reported when it is read
    if suffix:
        return "skip"
    try:
        if not entry.is_file():  # a suffix-less pipe or device is not opened to look
            return "skip"
    except OSError as exc:
        raise UnreadableEntryError(path, f"cannot stat the entry ({_why(exc)})") from exc
    return "film" if _has_dicom_preamble(path) else "skip"


def _walk_folder(folder: Path, display: str, exclude: Path | None) -> Iterator[InputItem]:
    """Image files under `folder`, lazily, in os.walk's top-down order (each folder's files by
    name, then its subfolders by name). Hidden entries and `exclude` are skipped; what cannot be
    looked at is yielded with its error."""
    excluded = exclude.resolve() if exclude is not None else None
    pending = [folder]  # a stack, not recursion: trees deeper than Python's recursion limit
    while pending:
        here = pending.pop()
        try:
            with os.scandir(here) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            reason = f"cannot list the folder ({_why(exc)})"
            yield _item(folder, display, here, UnreadableFolderError(here, reason))
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = here / entry.name
            try:
                kind = _entry_kind(entry, path, excluded)
            except InputError as exc:
                yield _item(folder, display, path, exc)
                continue
            if kind == "folder":
                subfolders.append(path)
            elif kind == "film":
                yield _item(folder, display, path)
        pending.extend(reversed(subfolders))


def _csv_value(row: dict[str, str], *names: str) -> str:
    for name in names:
        value = restore((row.get(name) or "").strip())
        if value:
            return value
    return ""


def _csv_rows(csv_path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line, row) of a CSV input with a `Path` column, lazily; text that is not UTF-8 is a
    NotUtf8Error naming the file and line. Only a regular file is opened (a named pipe
    called `x.csv` would block the job forever)."""
    try:
        fd = _open_regular(csv_path)
    except ImageError as exc:
        raise LabelError(f"{csv_path}: {exc.reason}") from None
    try:
        with open(fd, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "Path" not in reader.fieldnames:
                raise LabelError(f"{csv_path}: a CSV input needs a 'Path' column")
            try:
                for row in reader:
                    yield reader.line_num, row
            except csv.Error as exc:  # e.g. a cell over csv's field size limit
                raise LabelError(f"{csv_path}: line {reader.line_num}: {exc}") from None
    except UnicodeDecodeError:
        raise not_utf8_error(csv_path) from None


def check_csv_input(csv_path: Path) -> None:
    """Fail now, naming the file, line and column, on a CSV input that is not UTF-8, has no
    `Path` column or holds a label value that stats, prepare and training would reject; one
    streaming pass, so a 200,000-row CSV costs a second, not an hour of labelling first."""
    for line, row in _csv_rows(csv_path):
        for column in OBSERVATIONS:
            cell = row.get(column)
            if cell:  # also None for a short row
                parse_label_cell(restore(cell), column, source=str(csv_path), line=line)


def _walk_csv(csv_path: Path, allow_outside_paths: bool = False) -> Iterator[InputItem]:
    """Rows of a CSV with a `Path` column (relative to the CSV's folder, or its parent for
    CheXpert's own CSVs), lazily. A path that leads outside that root comes back with an
    OutsidePathError (see cxrlabel.data.csvfiles) unless `allow_outside_paths`."""
    from cxrlabel.data.formats import _dataset_root

    root: Path | None = None
    guard: PathGuard | None = None
    for line, row in _csv_rows(csv_path):
        text = restore((row.get("Path") or "").strip())
        if not text:
            continue
        if root is None or guard is None:
            root = _dataset_root(csv_path, text)
            guard = PathGuard(root)
        # A name `label` wrote (undecodable bytes escaped, see csv_name) reads back exactly.
        name = os.fsdecode(name_bytes(text))
        path = Path(name) if Path(name).is_absolute() else root / name
        reason = None if allow_outside_paths else guard.reason(text)
        error = OutsidePathError(outside_message(csv_path, line, text, reason)) if reason else None
        view = _csv_value(row, "Frontal/Lateral", "View Position", "ViewPosition")
        patient = _csv_value(row, "patient_id", "Patient ID", "subject_id")
        study = _csv_value(row, "study_id", "Study ID", "StudyInstanceUID")
        yield InputItem(path, name, patient, f"{patient}/{study}" if study else "", view, error)


def check_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Every input must exist (a typo fails now, not after an hour of labelling)."""
    if not inputs:
        raise ValueError("no input given: name image files, folders or a CSV")
    paths = [Path(p) for p in inputs]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"input not found: {', '.join(missing)}")
    return paths


def iter_inputs(
    inputs: Sequence[str | Path],
    *,
    exclude: Path | None = None,
    allow_outside_paths: bool = False,
) -> Iterator[InputItem]:
    """Files, folders (recursive) and CSVs -> films to label, in a fixed order, lazily.
    A CSV's rows whose paths leave its root come back with an OutsidePathError unless
    `allow_outside_paths`."""
    for path in check_inputs(inputs):
        if path.is_dir():
            yield from _walk_folder(path, str(path) if str(path) != "." else "", exclude)
        elif path.suffix.lower() == ".csv":
            yield from _walk_csv(path, allow_outside_paths)
        else:
            yield InputItem(path, str(path))


def view_from_text(value: str) -> str:
    """'frontal', 'lateral' or '' from a view column or DICOM ViewPosition value."""
    text = value.strip().upper()
    if text in LATERAL_VIEWS:
        return "lateral"
    if text in FRONTAL_VIEWS:
        return "frontal"
    return ""


def view_from_name(path: str) -> str:
    """CheXpert names files view1_frontal.jpg / view2_lateral.jpg."""
    stem = Path(path).stem.lower()
    if "lateral" in stem:
        return "lateral"
    if "frontal" in stem:
        return "frontal"
    return ""


def ids_from_path(path: str) -> tuple[str, str]:
    """(patient, study) from a CheXpert (patientN/studyM/) or MIMIC (pXX/pN/sM/) path."""
    found = chexpert_ids(path)
    if found is not None:
        return found
    match = _MIMIC_PATH_RE.search(path.replace("\\", "/"))
    if match is not None:
        patient, study = match.groups()
        return patient, f"{patient}/{study}"
    return "", ""
