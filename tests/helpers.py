"""Small helpers shared by tests (not fixtures: plain functions)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cxrlabel.data.labels import OBSERVATIONS

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *OBSERVATIONS]


def chexpert_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    """Write a CheXpert-format CSV; rows give Path/metadata and any observations (rest blank)."""
    lines = [",".join(CHEXPERT_HEADER)]
    for row in rows:
        lines.append(",".join(str(row.get(c, "")) for c in CHEXPERT_HEADER))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def banded_checkpoint(path: Path, film: Path, run_name: str) -> Path:
    """A tiny all-labels checkpoint whose thresholds are set around its own scores on `film`:
    the first label comes out positive, the second negative, the third uncertain (inside its
    band), so one film exercises all three label values."""
    import torch

    from cxrlabel.data.images import read_image
    from cxrlabel.models.checkpoint import save_checkpoint
    from cxrlabel.models.ensemble import load_ensemble
    from cxrlabel.models.factory import create_model
    from cxrlabel.models.thresholds import Thresholds

    torch.manual_seed(0)
    model = create_model("tiny", "linear", OBSERVATIONS, weights="none", size=64)
    save_checkpoint(path, model, config={"name": run_name}, epoch=0, step=0)
    probs = load_ensemble([path], device="cpu").predict_images([read_image(film)])[0]
    values = [float(p) for p in probs]
    values[0], values[1] = values[0] - 0.01, values[1] + 0.01
    band = [(v, v) for v in values]
    band[2] = (values[2] - 0.02, values[2] + 0.02)
    thresholds = Thresholds(OBSERVATIONS, tuple(values), "youden", tuple(band), "test scores")
    save_checkpoint(path, model, config={"name": run_name}, epoch=0, step=0, thresholds=thresholds)
    return path


class CallCount:
    """How many times a function patched by `count_calls` has been called."""

    def __init__(self) -> None:
        self.n = 0


def count_calls(monkeypatch: Any, owner: object, name: str) -> CallCount:
    """Replace `owner.name` (a module function or a class's method) for the test with a wrapper
    that counts its calls, e.g. decodes (`read_image`) or resamplings (`Image.Image.resize`)."""
    real = getattr(owner, name)
    count = CallCount()

    def counting(*args: Any, **kwargs: Any) -> Any:
        count.n += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return count


def copy_checkpoint(checkpoint: Path, folder: Path) -> Path:
    """A checkpoint's files (weights, metadata, state) copied into `folder`; the copy's path."""
    import shutil

    from cxrlabel.models.checkpoint import checkpoint_paths

    folder.mkdir(parents=True, exist_ok=True)
    for path in checkpoint_paths(checkpoint):
        if path.is_file():
            shutil.copy2(path, folder / path.name)
    return folder / checkpoint.name


def tearing_save(save: Any, *, epoch: int, on_torn: Any) -> Any:
    """A stand-in for `save_checkpoint` that, for `last` at `epoch`, writes the new tensor files
    but leaves the old metadata (a kill between the two), then calls `on_torn()`, which
    raises to end the run there. Every other save goes through unchanged."""

    def dying_save(path: Path, *args: Any, **kwargs: Any) -> Path:
        progress = kwargs.get("extra", {}).get("progress", {})
        if Path(path).name != "last.safetensors" or progress.get("epoch") != epoch:
            return save(path, *args, **kwargs)
        meta = Path(path).with_suffix(".json")
        old = meta.read_bytes()
        save(path, *args, **kwargs)
        meta.write_bytes(old)
        on_torn()
        raise AssertionError("on_torn() must raise")

    return dying_save


def local_client(app: Any, **kwargs: Any) -> Any:
    """A TestClient for the service that calls it as http://localhost, a Host the service
    allows by default (TestClient's own default, "testserver", is refused like any other
    name the service was not told about)."""
    from fastapi.testclient import TestClient

    return TestClient(app, base_url="http://localhost", **kwargs)


def write_dicom(
    path: Path,
    pixels: Any,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    **elements: object,
) -> Path:
    """A minimal secondary-capture DICOM file of `pixels` (None: no pixel data) with the given
    data elements (keyword=value), written with its file meta."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    if pixels is not None:
        ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path
