"""Batch labelling with the device JPEG path forced onto the CPU: the same files as the CPU
reader's run (probabilities within a stated bound), hostile JPEGs still reported, refused
films read by the CPU reader, resume, and when a run takes the path at all."""

from __future__ import annotations

import csv
import io
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxrlabel.data import jpegdevice
from cxrlabel.data.transforms import ResizeGeometry
from cxrlabel.labelling import batch as predict
from cxrlabel.labelling.batch import jpeg_decode_device, label_inputs
from cxrlabel.models.predictor import load_model
from tests.helpers import SHARED_DATA, count_calls
from tests.labelling.test_batch import make_checkpoint

FIXTURES = SHARED_DATA / "fixtures"
# Probabilities of the tiny model, device path vs CPU reader: the resized films differ by
# at most 2e-5 (tests/data/test_jpegdevice.py); measured probability difference < 1e-6.
PROB_TOLERANCE = 1e-5
SAME_FILES = ("labels.csv", "images.csv", "errors.csv")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    run = tmp_path_factory.mktemp("runs") / "tiny-run"
    checkpoint = make_checkpoint(run / "checkpoints" / "best.safetensors")
    return load_model([checkpoint], backend="torch", device="cpu")


@pytest.fixture(scope="module")
def films(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real JPEGs and a PNG, and JPEGs the device path must not take or must refuse."""
    if not FIXTURES.is_dir():
        pytest.skip(f"shared data not found: {FIXTURES}")
    folder = tmp_path_factory.mktemp("films")
    jpegs = sorted((FIXTURES / "nih_320").glob("*.jpg"))
    for path in jpegs:
        shutil.copy(path, folder / path.name)
    shutil.copy(next((FIXTURES / "nih_512").glob("*.png")), folder / "png_named.jpg")
    grey = Image.open(jpegs[0])
    out = io.BytesIO()
    grey.save(out, "JPEG", progressive=True)
    (folder / "progressive.jpg").write_bytes(out.getvalue())
    data = jpegs[1].read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 60000, 60000, 1) + b"\x01\x11\x00"
    (folder / "bomb.jpg").write_bytes(b"\xff\xd8" + sof + b"\xff\xd9")
    (folder / "constant.jpg").write_bytes(_jpeg(Image.new("L", (200, 200), 90)))
    return folder


def _jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _assert_same_outputs(cpu: Path, device: Path) -> None:
    for name in SAME_FILES:
        assert (device / name).read_bytes() == (cpu / name).read_bytes(), name
    a, b = _rows(cpu / "probabilities.csv"), _rows(device / "probabilities.csv")
    assert [r[0] for r in a] == [r[0] for r in b] and a[0] == b[0]
    diff = np.abs(np.array([r[1:] for r in a[1:]], float) - np.array([r[1:] for r in b[1:]], float))
    assert diff.max() <= PROB_TOLERANCE


def _label(films: Path, model, out: Path, **kwargs):
    return label_inputs([films], model, out, progress=False, batch_size=4, **kwargs)


def test_the_device_path_writes_the_cpu_readers_files(
    films: Path, model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu = _label(films, model, tmp_path / "cpu")
    decodes = count_calls(monkeypatch, jpegdevice, "_decode")
    device = _label(
        films, model, tmp_path / "device", decode_device="cpu", force_device_decode=True
    )
    assert decodes.n >= 4  # batches of real JPEGs went through torchvision
    _assert_same_outputs(tmp_path / "cpu", tmp_path / "device")
    assert (device.labelled, device.errors, device.flagged_inputs) == (
        cpu.labelled,
        cpu.errors,
        cpu.flagged_inputs,
    )
    errors = {Path(r[0]).name: r[1] for r in _rows(tmp_path / "device" / "errors.csv")[1:]}
    assert errors["bomb.jpg"] == "ImageTooLargeError"
    assert errors["truncated.jpg"] == "TruncatedImageError"
    flags = {Path(r[0]).name: r[8] for r in _rows(tmp_path / "device" / "images.csv")[1:]}
    assert flags["constant.jpg"] == "constant"
    assert {"png_named.jpg", "progressive.jpg"} <= set(flags)


def test_a_bomb_never_reaches_the_decoder(
    films: Path, model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[int, ...]] = []
    real = jpegdevice._decode

    def recording(encoded: list[torch.Tensor], mode: object, device: str) -> list[torch.Tensor]:
        seen.extend(len(e) for e in encoded)
        return real(encoded, mode, device)

    monkeypatch.setattr(jpegdevice, "_decode", recording)
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(films / "bomb.jpg", folder / "bomb.jpg")
    summary = _label(folder, model, tmp_path / "out", decode_device="cpu", force_device_decode=True)
    assert summary.errors == 1 and seen == []


def test_films_the_device_decoder_refuses_are_read_by_the_cpu_reader(
    films: Path, model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refusing(encoded: list[torch.Tensor], mode: object, device: str) -> list[torch.Tensor]:
        raise RuntimeError("nvjpeg refused it")

    _label(films, model, tmp_path / "cpu")
    monkeypatch.setattr(jpegdevice, "_decode", refusing)
    cpu_reads = count_calls(monkeypatch, predict, "read_image_with_info")
    _label(films, model, tmp_path / "device", decode_device="cpu", force_device_decode=True,
           read_timeout=None)  # fmt: skip
    assert cpu_reads.n >= 13  # every real JPEG, read again by the CPU reader
    _assert_same_outputs(tmp_path / "cpu", tmp_path / "device")


def test_skip_flagged_and_resume_on_the_device_path(films: Path, model, tmp_path: Path) -> None:
    _label(films, model, tmp_path / "cpu", skip_flagged=True)

    def stop(done: int) -> None:
        if done == 8:
            raise KeyboardInterrupt

    kwargs = {"decode_device": "cpu", "force_device_decode": True, "skip_flagged": True}
    with pytest.raises(KeyboardInterrupt):
        _label(films, model, tmp_path / "device", on_batch=stop, **kwargs)
    summary = _label(films, model, tmp_path / "device", **kwargs)
    assert summary.resumed_after == 8 and summary.skipped == 1
    _assert_same_outputs(tmp_path / "cpu", tmp_path / "device")


@pytest.mark.parametrize(
    ("device", "resize_to", "heatmaps", "forced", "expected"),
    [
        ("cuda", ResizeGeometry(64), False, False, "cuda"),
        (torch.device("cuda", 1), ResizeGeometry(64), False, False, "cuda:1"),
        ("cpu", ResizeGeometry(64), False, False, None),  # --device cpu: never
        ("cpu", ResizeGeometry(64), False, True, "cpu"),  # unless a test forces it
        ("cuda", None, False, False, None),  # models resizing differently
        ("cuda", ResizeGeometry(64), True, False, None),  # heatmaps need the full film
        (None, ResizeGeometry(64), False, True, None),
    ],
)
def test_when_a_run_decodes_jpeg_on_the_device(
    device, resize_to, heatmaps: bool, forced: bool, expected: str | None
) -> None:
    chosen = jpeg_decode_device(device, resize_to, heatmaps, forced)
    assert (None if chosen is None else str(chosen)) == expected


def test_a_cpu_run_never_routes_films_to_the_device(
    films: Path, model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probes = count_calls(monkeypatch, predict, "probe_jpeg")
    _label(films, model, tmp_path / "out", decode_device="cpu", read_timeout=None)
    assert probes.n == 0
