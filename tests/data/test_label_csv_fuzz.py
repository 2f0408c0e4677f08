"""Property tests of the label CSV parsers: any bytes, any text and mutated real label files
either parse or raise a named LabelError (OutsidePathError, NotUtf8Error, ...), quickly and
in bounded memory. Both readers are fuzzed: `load_table` (stats, prepare, training,
evaluation) and the streaming reader `label` uses for a CSV input.

Deterministic (derandomize) and bounded (max_examples) so the file runs in well under 20 s.
"""

from __future__ import annotations

import tempfile
import tracemalloc
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cxrlabel.data.formats import load_table
from cxrlabel.data.inputs import _walk_csv, check_csv_input
from cxrlabel.data.labels import OBSERVATIONS, LabelError, LabelTable
from tests.helpers import SHARED_DATA

# Real label files from ../shared/data, their first lines (enough rows, fast to parse).
REAL_CSVS = (
    SHARED_DATA / "fixtures" / "labels.csv",
    SHARED_DATA / "nih-cxr14" / "labels.csv",
    SHARED_DATA / "kermany-pneumonia" / "labels.csv",
)
HEAD_LINES = 12
PEAK_BYTES = 64 * 2**20  # a few-kB CSV must never need more than this

FUZZ = settings(
    max_examples=100,
    deadline=timedelta(seconds=3),  # generous: a loaded 2-core machine
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)

# Cells an attacker or a broken export would put in a label file.
NASTY_CELLS = st.sampled_from(
    [
        "",
        "2",
        "yes",
        "-1.0",
        "1.0",
        "nan",
        "../../etc/passwd",
        "/etc/passwd",
        "=cmd()+x",
        "'=x",
        "a\x00b",
        '"',
        '"unterminated',
        "\r\n",
        "x" * 5000,
        "\udcff".encode("utf-8", "surrogatepass").decode("latin-1"),
        "p1/p1/s1/",
        "Path",
        "Image Index",
    ]
)


def _real_heads() -> list[bytes]:
    found = [p for p in REAL_CSVS if p.is_file()]
    if not found:
        pytest.skip(f"no real label CSVs under {SHARED_DATA} (see its README)")
    return [b"".join(p.read_bytes().splitlines(keepends=True)[:HEAD_LINES]) for p in found]


def _parse_all(data: bytes, name: str = "labels.csv") -> None:
    """Every reader on `data`: success or a LabelError, within the memory bound."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        tracemalloc.start()
        try:
            for read in (
                lambda: load_table(path),
                lambda: load_table(path, allow_outside_paths=True),
                lambda: (check_csv_input(path), list(_walk_csv(path))),
            ):
                try:
                    result = read()
                except LabelError as exc:
                    assert str(path) in str(exc) or path.name in str(exc), exc
                else:
                    if isinstance(result, LabelTable):
                        assert list(result.frame.columns[-len(OBSERVATIONS) :]) == list(
                            OBSERVATIONS
                        )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < PEAK_BYTES


@FUZZ
@given(st.binary(max_size=2000))
def test_arbitrary_bytes(data: bytes) -> None:
    _parse_all(data)


_HEADER = st.lists(
    st.sampled_from(
        [
            "Path",
            "Image Index",
            "Finding Labels",
            "Patient ID",
            "subject_id",
            "study_id",
            "dicom_id",
            "Sex",
            "Age",
            "Frontal/Lateral",
            "AP/PA",
            *OBSERVATIONS,
        ]
    ),
    min_size=1,
    max_size=8,
)


@FUZZ
@given(_HEADER, st.lists(st.lists(st.one_of(NASTY_CELLS, st.text(max_size=20)), max_size=8),
                         max_size=6))  # fmt: skip
def test_csv_shaped_text(header: list[str], rows: list[list[str]]) -> None:
    lines = [",".join(header), *(",".join(row) for row in rows)]
    _parse_all(("\n".join(lines) + "\n").encode("utf-8", "surrogatepass"))


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    heads = _real_heads()
    data = bytearray(draw(st.sampled_from(heads)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "cell", "line", "truncate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 40))]
        elif op == "cell":
            lines = bytes(data).split(b"\n")
            row = draw(st.integers(0, len(lines) - 1))
            cells = lines[row].split(b",")
            cells[draw(st.integers(0, len(cells) - 1))] = draw(NASTY_CELLS).encode(
                "utf-8", "surrogatepass"
            )
            lines[row] = b",".join(cells)
            data = bytearray(b"\n".join(lines))
        elif op == "line":
            lines = bytes(data).split(b"\n")
            lines.insert(at % len(lines), lines[draw(st.integers(0, len(lines) - 1))])
            data = bytearray(b"\n".join(lines))
        else:
            del data[at:]
    return bytes(data)


@FUZZ
@given(_mutated())
def test_mutated_real_label_files(data: bytes) -> None:
    _parse_all(data)


def test_the_unmutated_real_files_parse() -> None:
    """The fuzz starts from files that do parse (else every mutation would be an error)."""
    for head in _real_heads():
        _parse_all(head)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "labels.csv"
            path.write_bytes(head)
            assert len(load_table(path)) == HEAD_LINES - 1


def test_a_cell_over_the_csv_field_limit_is_a_named_error() -> None:
    _parse_all(b"Path,Edema\n" + b"a" * 200_000 + b".png,1.0\n")
