"""Batch labelling: films in, CheXpert-format labels and probabilities out.

`label_inputs` walks files, folders (recursively: PNG, JPEG, DICOM) and CSVs with a `Path`
column lazily, reads and predicts one batch at a time, and appends each finished batch to the
run's journal (`cxrlabel.labelling.journal`: partial files in ``<out>/.cxrlabel-partial/`` and a
state file committed after every batch), so an interrupted run started again with the same
arguments goes on where it stopped, with rows neither duplicated nor missing. Each film is
decoded once and, when every model resizes alike, resized once as soon as it is read, in a child
process that is stopped when one film takes longer than the read time limit
(`cxrlabel.labelling.reader`; only regular files under a size cap are read at all). At the
end the output files are written atomically from the partial files and the partial folder is
removed:

    labels.csv               Path + the 14 observations: 1.0 / 0.0 / -1.0 (in the band) /
                             blank (a label the model does not predict)
    probabilities.csv        Path + one probability per predicted label
    images.csv               per image: ids, view and where it came from, laterality, which model
                             labelled it, its labelling note (`flag`), the input checks' flags
                             (`flags`, see cxrlabel.data.sanity), heatmap folder
    errors.csv               unreadable inputs: Path, error, reason (and, with skip_flagged,
                             the films the input checks flagged, error FlaggedInput)
    study_labels.csv,        one row per study (max over its views), when ids come from the
    study_probabilities.csv  patient/study path layout, DICOM tags or CSV id columns
    run.json                 counts, timing, model info, arguments
    heatmaps/                with heatmaps: one Grad-CAM overlay per label and a contact sheet

Memory stays flat: only one batch of films is held at a time (study aggregation at the end
keeps one row per study).

Under torchrun (`env` of `label_inputs`) each rank labels its share into its own journal and
rank 0 merges the journals by input number, so the files above are the one-process run's.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from cxrlabel.csvcells import neutralise_row
from cxrlabel.data.images import (
    DICOM_SUFFIXES,
    ImageError,
    read_dicom_metadata,
    read_image_with_info,
)
from cxrlabel.data.inputs import (
    DEFAULT_MAX_FILE_BYTES,
    InputItem,
    check_csv_input,
    check_inputs,
    csv_name,
    ids_from_path,
    iter_inputs,
    read_film_bytes,
    view_from_name,
    view_from_text,
)
from cxrlabel.data.jpegdevice import (
    DeviceFilm,
    JpegProbe,
    decode_jpegs,
    prepare_films,
    probe_jpeg,
    use_device_decode,
)
from cxrlabel.data.labels import OBSERVATIONS
from cxrlabel.data.sanity import describe_flags, flags_from_stats, join_flags, sanity_flags
from cxrlabel.data.transforms import ResizeGeometry
from cxrlabel.distributed import DistEnv, all_gather_objects, barrier, broadcast_object
from cxrlabel.fileio import atomic_path, atomic_write_bytes, atomic_write_text
from cxrlabel.labelling.heatmaps import contact_sheet_png, gradcams, heatmap_model, overlay_png
from cxrlabel.labelling.journal import (
    PARTIAL_DIR,
    PARTS_DIR,
    Journal,
    MergedRows,
    rank_partial_dir,
)
from cxrlabel.labelling.reader import DEFAULT_READ_TIMEOUT, FilmReader
from cxrlabel.models.predictor import Predictor, shared_resize
from cxrlabel.models.thresholds import combine_thresholds

log = logging.getLogger(__name__)

HEATMAP_DIR = "heatmaps"
STUDY_FILES = ("study_labels.csv", "study_probabilities.csv")
# What an earlier run in the same --out leaves that a fresh run removes (see Journal).
EARLIER_OUTPUTS = (HEATMAP_DIR, *STUDY_FILES)
# 2: images.csv gained `flags` and the manifest `skip_flagged` (a format-1 partial run is
# refused rather than continued with a different header).
RUN_FORMAT = 2
# errors.csv's `error` for a film --skip-flagged kept from labelling.
FLAGGED_ERROR = "FlaggedInput"
# Heatmaps are drawn at most this many pixels on a side (a 3000 px DICOM overlay per label
# would be tens of MB and no easier to read).
HEATMAP_MAX_SIDE = 1024

IMAGE_COLUMNS = (
    "Path",
    "patient_id",
    "study_id",
    "view",
    "view_source",
    "laterality",
    "labelled_by",
    "flag",
    "flags",
    "heatmaps",
)
ERROR_COLUMNS = ("Path", "error", "reason")


class RowSource(Protocol):
    """Where the final files' rows come from: one Journal, or every rank's (MergedRows)."""

    def image_rows(self) -> Iterator[dict[str, str]]: ...

    def error_rows(self) -> Iterator[dict[str, str]]: ...


class CsvWriter(Protocol):
    """What run_batch needs from csv.writer's object (whose class is private to _csv)."""

    def writerow(self, row: Iterable[Any], /) -> Any: ...


def _model_fingerprint(model: Predictor | None) -> dict[str, Any] | None:
    """What identifies a model's outputs (weights' hashes, labels, thresholds, backend), not
    how its path was spelled."""
    if model is None:
        return None
    info = model.model_info()
    fingerprint = {
        "name": model.name,
        "kind": model.kind,
        "labels": list(model.labels),
        "thresholds": model.thresholds.to_dict(),
        "weights": [m.get("sha256") for m in info.get("members", [])],
        "backend": info.get("backend", "torch"),
    }
    # Only with TTA on, so a run interrupted before --tta existed still resumes.
    if info.get("tta", 1) != 1:
        fingerprint["tta"] = info["tta"]
    # Only when not fp32, likewise: a run from before bf16 inference still resumes.
    if info.get("precision", "fp32") != "fp32":
        fingerprint["precision"] = info["precision"]
    return fingerprint


# --------------------------------------------------------------------------------------------
# Reading one batch
# --------------------------------------------------------------------------------------------


@dataclass
class Film:
    """One input after reading: the pixels (or the error) and what we know about it."""

    seq: int
    item: InputItem
    pixels: np.ndarray | None = None  # resized when the models share a resize, else as read
    # Heatmaps only: the film at most HEATMAP_MAX_SIDE px on a side, not the full-resolution
    # original (a 3000 px DICOM is tens of MB, and a batch holds batch_size of them).
    display_image: np.ndarray | None = None
    error: str = ""
    reason: str = ""
    patient_id: str = ""
    study_id: str = ""
    view: str = ""
    view_source: str = ""
    laterality: str = ""
    flags: tuple[str, ...] = ()  # the input checks' (cxrlabel.data.sanity)
    # The device JPEG path (cxrlabel.data.jpegdevice): the checked file's bytes and header,
    # decoded by the labelling process on its device, then dropped.
    encoded: bytes | None = None
    probe: JpegProbe | None = None


def _describe(film: Film, meta: dict[str, Any] | None) -> None:
    """Fill ids, view and laterality: CSV columns first, then DICOM tags, then the path."""
    item = film.item
    film.patient_id, film.study_id = item.patient_id, item.study_id
    if meta:
        if not film.study_id and meta.get("study_instance_uid"):
            film.patient_id = film.patient_id or meta.get("patient_id") or ""
            film.study_id = meta["study_instance_uid"]
        film.laterality = meta.get("laterality") or ""
    if not film.study_id:
        film.patient_id, film.study_id = ids_from_path(item.display)
    for source, value in (
        ("csv", view_from_text(item.view)),
        ("dicom", view_from_text((meta or {}).get("view_position") or "")),
        ("filename", view_from_name(item.display)),
    ):
        if value:
            film.view, film.view_source = value, source
            return


def read_film(
    seq: int,
    item: InputItem,
    resize_to: ResizeGeometry | None,
    keep_display: bool,
    skip_flagged: bool = False,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    jpeg_device: str | None = None,
    force_jpeg_device: bool = False,
) -> Film:
    """Read, check and describe one input; any failure becomes the film's error, never an
    exception. Only a regular file of at most `max_bytes` is read (see `read_film_bytes`).
    With `skip_flagged`, a film the input checks flag becomes an error too.

    `jpeg_device`: the type of the device the run decodes JPEG on ("cuda"), None for none. A
    film `use_device_decode` routes there whose header `probe_jpeg` accepts (within the pixel
    limit, a format the device decodes as Pillow does) comes back undecoded, with `encoded`
    and `probe` set; `DeviceJpeg.finish` decodes it. Any other film is decoded here.
    `force_jpeg_device`: route JPEG there whatever the device type (tests, on CPU)."""
    film = Film(seq, item)
    if item.error is not None:  # the walk or the CSV path rule refused it: reported, not read
        film.error = type(item.error).__name__
        film.reason = getattr(item.error, "reason", str(item.error))
        return film
    try:
        # Read once, then decode the bytes: the file is checked and opened only here.
        data = read_film_bytes(item.path, max_bytes)
        name = str(item.path)
        if jpeg_device is not None and use_device_decode(
            jpeg_device, data, forced=force_jpeg_device
        ):
            probe = probe_jpeg(data, name=name)
            if probe is not None:
                film.encoded, film.probe = data, probe
                _describe(film, None)
                return film
        is_dicom = item.path.suffix.lower() in DICOM_SUFFIXES or data[128:132] == b"DICM"
        meta = read_dicom_metadata(data, name=name) if is_dicom else None
        image, info = read_image_with_info(data, name=name)
    except ImageError as exc:
        film.error, film.reason = type(exc).__name__, exc.reason
        return film
    except Exception as exc:  # a decoder bug must not stop a batch job; the file is reported
        film.error, film.reason = type(exc).__name__, f"{item.path}: {exc}"
        return film
    if _skipped(film, sanity_flags(image, info), skip_flagged):
        return film
    _describe(film, meta)
    film.display_image = _display_film(image) if keep_display else None
    film.pixels = image if resize_to is None else resize_to.apply(image)
    return film


def _skipped(film: Film, flags: tuple[str, ...], skip_flagged: bool) -> bool:
    """Record the input checks' flags; with `skip_flagged` a flagged film becomes an error."""
    film.flags = flags
    if not (skip_flagged and flags):
        return False
    film.error = FLAGGED_ERROR
    film.reason = (
        f"not labelled (--skip-flagged): the input checks flagged it: {describe_flags(flags)}"
    )
    return True


@dataclass
class DeviceJpeg:
    """Where the device JPEG path of a run decodes (`device`), the one resize its films get,
    and the CPU reader a film the device decoder refuses is read with instead."""

    device: torch.device
    geometry: ResizeGeometry
    fallback: FilmReader[Film]
    skip_flagged: bool = False

    def finish(self, films: list[Film]) -> list[Film]:
        """The batch with its undecoded films (read_film's `encoded`) decoded, checked and
        resized on the device, or read by the fallback reader where the decoder refused."""
        pending = [f for f in films if f.encoded is not None and f.probe is not None]
        if not pending:
            return films
        modes = [f.probe.mode for f in pending if f.probe is not None]
        decoded = decode_jpegs([f.encoded or b"" for f in pending], modes, self.device)
        done = [(f, image) for f, image in zip(pending, decoded, strict=True) if image is not None]
        results = prepare_films([image for _, image in done], self.geometry)
        for (film, _), result in zip(done, results, strict=True):
            _finish_device_film(film, result, self.skip_flagged)
        redo: dict[int, Film] = {}
        for film, image in zip(pending, decoded, strict=True):
            film.encoded = film.probe = None
            if image is None:
                log.info("%s: the device JPEG decoder refused it; reading it on the CPU",
                         csv_name(film.item.display))  # fmt: skip
                redo[film.seq] = _read_with_limit(self.fallback, film.seq, film.item)
        return [redo.get(f.seq, f) for f in films]


def _finish_device_film(film: Film, result: DeviceFilm, skip_flagged: bool) -> None:
    info = result.info
    if _skipped(film, flags_from_stats(info.height, info.width, info, result.stats), skip_flagged):
        return
    film.pixels = result.pixels


def jpeg_decode_device(
    device: str | torch.device | None,
    resize_to: ResizeGeometry | None,
    heatmaps: bool,
    forced: bool = False,
) -> torch.device | None:
    """The device a run decodes JPEG films on, None for the CPU reader alone: CUDA (or any
    device when a test `forced` it), when the models share one resize (the device path
    resizes) and no heatmaps are drawn (they need the full film on the CPU)."""
    if device is None or resize_to is None or heatmaps:
        return None
    device = torch.device(device)
    return device if forced or device.type == "cuda" else None


def _read_with_limit(reader: FilmReader[Film], seq: int, item: InputItem) -> Film:
    """read_film in the reader's child process; a timeout or crash becomes the film's error."""
    try:
        return reader.read(seq, item)
    except ImageError as exc:
        film = Film(seq, item)
        film.error, film.reason = type(exc).__name__, exc.reason
        return film


def _csv_cells(row: Iterable[Any]) -> list[Any]:
    """Text cells as the CSVs hold them: UTF-8, any file name's undecodable bytes escaped
    losslessly (`csv_name`); numbers as they are."""
    return [csv_name(cell) if isinstance(cell, str) else cell for cell in row]


def _batches(
    items: Iterable[tuple[int, InputItem]], size: int
) -> Iterator[list[tuple[int, InputItem]]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


def _fmt_label(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.1f}"


def _fmt_prob(value: float) -> str:
    return "" if math.isnan(value) else repr(float(value))


# --------------------------------------------------------------------------------------------
# Labelling
# --------------------------------------------------------------------------------------------


@dataclass
class LabelSummary:
    """What a labelling run did and wrote."""

    inputs: int = 0
    labelled: int = 0
    errors: int = 0
    flagged: int = 0  # labelled with a note in `flag` (a lateral film by the frontal model)
    flagged_inputs: int = 0  # flagged by the input checks (`flags`), labelled or skipped
    skipped: int = 0  # of those, reported in errors.csv instead (skip_flagged)
    studies: int = 0
    heatmaps: int = 0
    resumed_after: int = 0
    seconds: float = 0.0
    images_per_s: float = 0.0
    model: str = ""
    kind: str = ""
    outputs: dict[str, Path] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "outputs"}
        out["outputs"] = {k: str(v) for k, v in self.outputs.items()}
        return out

    def to_text(self) -> str:
        checks = ""
        if self.flagged_inputs:
            checks = f", {self.flagged_inputs} flagged by the input checks"
            checks += f" ({self.skipped} skipped: see errors.csv)" if self.skipped else ""
        lines = [
            f"{self.labelled} films labelled by {self.model} ({self.kind}), "
            f"{self.errors} unreadable, {self.flagged} flagged"
            + checks
            + (f", {self.studies} studies" if self.studies else "")
            + (f", {self.heatmaps} heatmap PNGs" if self.heatmaps else ""),
            f"{self.images_per_s:.1f} images/s over {self.seconds:.1f} s"
            + (f" (continued after {self.resumed_after} inputs)" if self.resumed_after else ""),
        ]
        lines += [f"  {name}: {path}" for name, path in self.outputs.items()]
        return "\n".join(lines)


def _union_labels(models: Sequence[Predictor]) -> tuple[str, ...]:
    wanted = {name for m in models for name in m.labels}
    return tuple(o for o in OBSERVATIONS if o in wanted)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "film"


def _display_film(image: np.ndarray) -> np.ndarray:
    """The film at most HEATMAP_MAX_SIDE px on a side (aspect kept) for heatmaps."""
    height, width = image.shape
    scale = HEATMAP_MAX_SIDE / max(height, width)
    if scale >= 1:
        return image
    from PIL import Image

    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = Image.fromarray(np.asarray(image, np.float32)).resize(size, Image.Resampling.BILINEAR)
    return np.clip(np.asarray(small, dtype=np.float32), 0.0, 1.0)


class _Heatmapper:
    """Writes each film's Grad-CAM overlays and contact sheet."""

    def __init__(
        self,
        out_dir: Path,
        models: dict[str, Predictor],
        chosen: Sequence[str] | None,
    ) -> None:
        self.dir = out_dir / HEATMAP_DIR
        self.chosen = tuple(chosen) if chosen else None
        self.torch_models: dict[str, tuple[torch.nn.Module, str]] = {}
        self.layers: dict[str, torch.nn.Module] = {}
        for role, model in models.items():
            if self.chosen:
                unknown = [n for n in self.chosen if n not in model.labels]
                if unknown and role == "model":
                    raise ValueError(
                        f"heatmap labels {unknown} are not predicted by {model.name}; "
                        f"it predicts {list(model.labels)}"
                    )
            cam = heatmap_model(model)
            self.torch_models[role] = (cam.model, cam.note)
            self.layers[role] = cam.layer
            log.info("heatmaps (%s): %s", role, self.torch_models[role][1])

    @property
    def notes(self) -> dict[str, str]:
        return {role: note for role, (_, note) in self.torch_models.items()}

    def write(
        self, film: Film, role: str, labels: Sequence[str], probs: np.ndarray, decided: np.ndarray
    ) -> tuple[str, int]:
        model, note = self.torch_models[role]
        image = film.display_image
        if image is None:
            raise RuntimeError(f"{film.item.display}: the film was not kept for its heatmaps")
        if self.chosen:
            names = [n for n in self.chosen if n in labels]
        else:
            names = [n for k, n in enumerate(labels) if decided[k] == 1.0]
        cams = gradcams(model, image, names, target_layer=self.layers[role])
        folder = self.dir / f"{film.seq:06d}_{_safe_name(Path(film.item.display).stem)}"
        for name, cam in cams.items():
            atomic_write_bytes(folder / f"{_safe_name(name)}.png", overlay_png(image, cam))
        sheet = contact_sheet_png(
            image,
            cams,
            probabilities={n: float(probs[labels.index(n)]) for n in names},
            title=f"{csv_name(film.item.display)} | {note}",
        )
        atomic_write_bytes(folder / "contact_sheet.png", sheet)
        return folder.relative_to(self.dir.parent).as_posix(), len(cams) + 1


class _Labeller:
    """One labelling run: models, outputs and the per-batch work."""

    def __init__(
        self,
        model: Predictor,
        lateral_model: Predictor | None,
        out_dir: Path,
        heatmapper: _Heatmapper | None,
        skip_flagged: bool = False,
        env: DistEnv | None = None,
    ) -> None:
        self.skip_flagged = skip_flagged
        self.env = env or DistEnv.single()
        self.models = {"model": model}
        if lateral_model is not None:
            self.models["lateral model"] = lateral_model
        self.labels = _union_labels(list(self.models.values()))
        header = (
            "seq",
            *IMAGE_COLUMNS,
            *(f"p:{k}" for k in self.labels),
            *(f"y:{k}" for k in self.labels),
        )
        self.journal = self.rank_journal(out_dir, header, self.env.rank)
        self.heatmapper = heatmapper
        self.resize_to = shared_resize(list(self.models.values()))

    def rank_journal(self, out_dir: Path, header: Sequence[str], rank: int) -> Journal:
        """Rank `rank`'s journal (the one journal of a single process). Only rank 0 removes
        an earlier run's outputs, before the others start writing (a barrier follows)."""
        if not self.env.distributed:
            return Journal(out_dir, header, ("seq", *ERROR_COLUMNS), EARLIER_OUTPUTS)
        earlier = EARLIER_OUTPUTS if rank == 0 else ()
        return Journal(
            out_dir, header, ("seq", *ERROR_COLUMNS), earlier, partial_dir=rank_partial_dir(rank)
        )

    def all_journals(self, out_dir: Path) -> list[Journal]:
        """Every rank's journal, in rank order (rank 0 merges them)."""
        header = self.journal.image_header
        return [self.rank_journal(out_dir, header, k) for k in range(self.env.world_size)]

    def route(self, film: Film) -> tuple[str, str]:
        """Which model labels a film, and the flag to record."""
        if film.view != "lateral":
            return "model", ""
        if "lateral model" in self.models:
            return "lateral model", ""
        return "model", "lateral view, no lateral model given: labelled by the frontal model"

    def predict(self, films: Sequence[Film]) -> dict[int, tuple[str, str, np.ndarray]]:
        """seq -> (role, flag, probabilities in that model's label order)."""
        routes = {f.seq: self.route(f) for f in films}
        out: dict[int, tuple[str, str, np.ndarray]] = {}
        for role, model in self.models.items():
            group = [f for f in films if routes[f.seq][0] == role]
            if not group:
                continue
            with torch.inference_mode():
                probs = np.asarray(model.predict_images([f.pixels for f in group]))
            for film, p in zip(group, probs, strict=True):
                out[film.seq] = (role, routes[film.seq][1], p)
        return out

    def image_row(
        self, film: Film, role: str, flag: str, probs: np.ndarray, heatmaps: str
    ) -> list[str]:
        model = self.models[role]
        decided = model.thresholds.apply(probs[None])[0]
        p_cells, y_cells = [], []
        for name in self.labels:
            if name in model.labels:
                k = model.labels.index(name)
                p_cells.append(_fmt_prob(probs[k]))
                y_cells.append(_fmt_label(decided[k]))
            else:
                p_cells.append("")
                y_cells.append("")
        return [
            str(film.seq),
            film.item.display,
            film.patient_id,
            film.study_id,
            film.view,
            film.view_source,
            film.laterality,
            role,
            flag,
            join_flags(film.flags),
            heatmaps,
            *p_cells,
            *y_cells,
        ]

    def run_batch(
        self, films: Sequence[Film], writers: tuple[CsvWriter, CsvWriter], counts: dict[str, int]
    ) -> None:
        images_out, errors_out = writers
        good = [f for f in films if f.pixels is not None]
        results = self.predict(good) if good else {}
        for film in films:
            counts["flagged_inputs"] += bool(film.flags)
            if film.pixels is None:
                errors_out.writerow(
                    _csv_cells([film.seq, film.item.display, film.error, film.reason])
                )
                counts["skipped" if film.error == FLAGGED_ERROR else "errors"] += 1
                continue
            role, flag, probs = results[film.seq]
            folder = ""
            if self.heatmapper is not None:
                model = self.models[role]
                decided = model.thresholds.apply(probs[None])[0]
                folder, n = self.heatmapper.write(film, role, model.labels, probs, decided)
                counts["heatmaps"] += n
            images_out.writerow(_csv_cells(self.image_row(film, role, flag, probs, folder)))
            counts["labelled"] += 1
            counts["flagged"] += bool(flag)


def _manifest(
    inputs: Sequence[Path],
    model: Predictor,
    lateral_model: Predictor | None,
    heatmaps: bool,
    heatmap_labels: Sequence[str] | None,
    skip_flagged: bool,
    allow_outside_paths: bool,
    env: DistEnv,
) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "format": RUN_FORMAT,
        "skip_flagged": skip_flagged,
        "inputs": [str(p.resolve()) for p in inputs],
        "model": _model_fingerprint(model),
        "lateral_model": _model_fingerprint(lateral_model),
        "heatmaps": bool(heatmaps),
        "heatmap_labels": list(heatmap_labels) if heatmap_labels else None,
    }
    # Only when on, so a run interrupted before the option existed still resumes.
    if allow_outside_paths:
        manifest["allow_outside_paths"] = True
    # Under torchrun: which share this rank labels, so a rerun with another number of
    # processes is refused rather than resumed with different shares.
    if env.distributed:
        manifest["shard"] = {"rank": env.rank, "world_size": env.world_size}
    return manifest


def _check_layout(out_dir: Path, env: DistEnv) -> None:
    """Refuse to start a single-process run over an interrupted torchrun run and the reverse
    (neither could continue the other's journal)."""
    other = out_dir / (PARTIAL_DIR if env.distributed else PARTS_DIR)
    if other.is_dir():
        kind = "single-process" if env.distributed else "torchrun"
        raise ValueError(
            f"{out_dir} holds an interrupted {kind} labelling run ({other}); rerun it the same "
            f"way to continue it, or choose another --out, or delete {other} to start over"
        )


def label_inputs(
    inputs: Sequence[str | Path],
    model: Predictor,
    out_dir: Path,
    *,
    batch_size: int = 16,
    heatmaps: bool = False,
    heatmap_labels: Sequence[str] | None = None,
    lateral_model: Predictor | None = None,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
    skip_flagged: bool = False,
    allow_outside_paths: bool = False,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    read_timeout: float | None = DEFAULT_READ_TIMEOUT,
    env: DistEnv | None = None,
    decode_device: str | torch.device | None = None,
    force_device_decode: bool = False,
) -> LabelSummary:
    """Label every film in `inputs` into `out_dir` (see the module doc for the files).

    Every film gets the input checks of :mod:`cxrlabel.data.sanity`; their flags go to
    images.csv's `flags` column, or, with `skip_flagged`, the film goes to errors.csv
    (error ``FlaggedInput``, the reason naming the flags) instead of being labelled.

    A CSV input's rows whose paths lead outside its root are reported in errors.csv, not
    read, unless `allow_outside_paths` (cxrlabel.data.csvfiles). A CSV input that is not
    UTF-8 or holds an invalid label value fails before anything is labelled.

    `on_batch(done)` is called after each batch is safely on disk with the number of inputs
    done so far (progress reporting, memory sampling; raising from it stops the run, which a
    later call with the same arguments continues).

    Reading one film is limited to `max_file_bytes` (larger files are reported) and to
    `read_timeout` seconds, enforced by reading in a child process that is killed when it runs
    over (`cxrlabel.labelling.reader`; None: read in this process, no time limit). Neither
    limit is part of the resume check: a rerun may change them.

    `env` (cxrlabel.distributed.dist_env(), with the process group initialised): under
    torchrun each rank labels every world_size-th input (input number ``seq % world_size ==
    rank``) into its own journal, ``<out>/.cxrlabel-parts/rank-K/``; rank 0 then merges the
    parts by input number and writes the final files, byte-identical to a one-process run.
    Every rank returns the merged summary.

    `decode_device` (the model's device): on CUDA, JPEG films are decoded and resized there
    (cxrlabel.data.jpegdevice; `jpeg_decode_device` says when), the rest by the CPU reader.
    `force_device_decode` takes that path on any device (tests run it on the CPU).
    """
    env = env or DistEnv.single()
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_file_bytes < 1:
        raise ValueError(f"max_file_bytes must be at least 1, got {max_file_bytes}")
    out_dir = Path(out_dir)
    _check_layout(out_dir, env)
    paths = check_inputs(inputs)
    for path in paths:
        if not path.is_dir() and path.suffix.lower() == ".csv":
            check_csv_input(path)
    models = {"model": model, **({"lateral model": lateral_model} if lateral_model else {})}
    heatmapper = _Heatmapper(out_dir, models, heatmap_labels) if heatmaps else None
    labeller = _Labeller(model, lateral_model, out_dir, heatmapper, skip_flagged, env)
    journal = labeller.journal
    manifest = _manifest(
        paths, model, lateral_model, heatmaps, heatmap_labels, skip_flagged, allow_outside_paths,
        env,
    )  # fmt: skip
    state = journal.start(manifest)
    barrier(env)  # rank 0 has removed an earlier run's heatmaps before any rank writes one
    summary = LabelSummary(resumed_after=state["done"], model=model.name, kind=model.kind)
    started = time.perf_counter()
    cpu_read = partial(
        read_film,
        resize_to=labeller.resize_to,
        keep_display=heatmapper is not None,
        skip_flagged=skip_flagged,
        max_bytes=max_file_bytes,
    )
    device = jpeg_decode_device(
        decode_device, labeller.resize_to, heatmapper is not None, force_device_decode
    )
    read = cpu_read
    if device is not None:
        read = partial(cpu_read, jpeg_device=device.type, force_jpeg_device=force_device_decode)
        log.info("JPEG films are decoded on %s, the others on the CPU", device)
    # The fallback reader's child starts only if a film needs it.
    with FilmReader(read, read_timeout) as reader, FilmReader(cpu_read, read_timeout) as cpu:
        finish = None
        if device is not None and labeller.resize_to is not None:
            finish = DeviceJpeg(device, labeller.resize_to, cpu, skip_flagged).finish
        processed = _label_stream(
            paths, out_dir, labeller, state, batch_size, progress, on_batch, reader,
            allow_outside_paths, finish,
        )  # fmt: skip
    elapsed = time.perf_counter() - started
    state["seconds"] += elapsed
    if not env.distributed:
        summary.seconds = state["seconds"]
        summary.images_per_s = processed / elapsed if elapsed > 0 else 0.0
        _finish(out_dir, labeller, journal, state, summary, heatmapper)
        journal.remove()
        return summary
    # Every rank's committed state (this is also the barrier before the merge).
    ranks = all_gather_objects(env, {"state": state, "processed": processed, "seconds": elapsed})
    if env.is_main:
        _merge_ranks(out_dir, labeller, ranks, summary, heatmapper)
    return broadcast_object(env, summary)


def _merge_ranks(
    out_dir: Path,
    labeller: _Labeller,
    ranks: Sequence[dict[str, Any]],
    summary: LabelSummary,
    heatmapper: _Heatmapper | None,
) -> None:
    """Rank 0: the final files from every rank's journal; counts summed, timing per rank."""
    states = [r["state"] for r in ranks]
    total: dict[str, Any] = {
        "done": sum(s["done"] for s in states),
        "counts": {k: sum(s["counts"][k] for s in states) for k in states[0]["counts"]},
    }
    summary.resumed_after = sum(r["state"]["done"] - r["processed"] for r in ranks)
    # The ranks ran side by side: the run took as long as its slowest rank.
    summary.seconds = max(s["seconds"] for s in states)
    slowest = max(r["seconds"] for r in ranks)
    processed = sum(r["processed"] for r in ranks)
    summary.images_per_s = processed / slowest if slowest > 0 else 0.0
    per_rank = [
        {
            "rank": k,
            "inputs": r["state"]["done"],
            "seconds": r["state"]["seconds"],
            "images_per_s": r["processed"] / r["seconds"] if r["seconds"] > 0 else 0.0,
        }
        for k, r in enumerate(ranks)
    ]
    rows = MergedRows(labeller.all_journals(out_dir))
    _finish(out_dir, labeller, rows, total, summary, heatmapper, per_rank)
    shutil.rmtree(out_dir / PARTS_DIR)


def _label_stream(
    paths: Sequence[Path],
    out_dir: Path,
    labeller: _Labeller,
    state: dict[str, Any],
    batch_size: int,
    progress: bool,
    on_batch: Callable[[int], None] | None,
    reader: FilmReader[Film],
    allow_outside_paths: bool = False,
    finish: Callable[[list[Film]], list[Film]] | None = None,
) -> int:
    """Read, predict and append batch after batch; returns how many inputs this call did.
    `finish`: what completes a read batch in this process (DeviceJpeg.finish)."""
    from tqdm.auto import tqdm

    journal = labeller.journal
    done = state["done"]
    inputs = iter_inputs(paths, exclude=out_dir, allow_outside_paths=allow_outside_paths)
    # This rank's inputs, numbered in the whole input order: every world_size-th one, so the
    # walk stays lazy (no count first) and the ranks' shares differ by at most one film.
    env = labeller.env
    items = ((s, it) for s, it in enumerate(inputs) if s % env.world_size == env.rank)
    # Skip what an interrupted run finished, checking it is the same (the path generator
    # takes exactly `done` items from `items`; the batches go on with the rest).
    hasher = journal.skip_done((item.path for _, item in items), state)
    processed = 0
    bar = tqdm(desc="label", unit="img", initial=done, disable=not progress, dynamic_ncols=True)
    with (
        open(journal.images, "a", newline="", encoding="utf-8") as images_f,
        open(journal.errors, "a", newline="", encoding="utf-8") as errors_f,
        bar,
    ):
        writers = (csv.writer(images_f), csv.writer(errors_f))
        for batch in _batches(items, batch_size):
            films = [_read_with_limit(reader, s, it) for s, it in batch]
            if finish is not None:
                films = finish(films)
            labeller.run_batch(films, writers, state["counts"])
            journal.advance(state, hasher, [item.path for _, item in batch])
            journal.commit(state, (images_f, errors_f))
            processed += len(batch)
            bar.update(len(batch))
            if on_batch is not None:
                on_batch(state["done"])
    return processed


# --------------------------------------------------------------------------------------------
# Final files
# --------------------------------------------------------------------------------------------


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """An output CSV, every cell spreadsheet-safe (cxrlabel.csvcells; the partial files of
    the journal keep the raw text, so resume compares what was really read)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(neutralise_row(header))
        writer.writerows(neutralise_row(row) for row in rows)
    return path


def _prob_cell(text: str) -> str:
    return f"{float(text):.6f}" if text else ""


def _study_rows(rows: RowSource, labels: Sequence[str]) -> dict[str, list[Any]]:
    """study -> [patient, number of films, per-label max probability (NaN: not predicted)]."""
    studies: dict[str, list[Any]] = {}
    for row in rows.image_rows():
        study = row["study_id"]
        if not study:
            continue
        probs = np.array([float(row[f"p:{k}"] or "nan") for k in labels])
        entry = studies.setdefault(study, [row["patient_id"], 0, np.full(len(probs), np.nan)])
        entry[1] += 1
        entry[2] = np.fmax(entry[2], probs)  # fmax: a label one view lacks does not blank it
    return studies


def _study_label_row(
    study: str, probs: np.ndarray, decided: np.ndarray, labels: Sequence[str]
) -> list[str]:
    cells = []
    for name in OBSERVATIONS:
        k = labels.index(name) if name in labels else -1
        cells.append("" if k < 0 or math.isnan(probs[k]) else _fmt_label(decided[k]))
    return [study, *cells]


def _write_studies(
    out_dir: Path, labeller: _Labeller, rows: RowSource
) -> tuple[dict[str, Path], int]:
    """Study-level files (max over each study's films); none when no film has a study id."""
    labels = labeller.labels
    studies = _study_rows(rows, labels)
    if not studies:
        return {}, 0
    # Per label, the thresholds of the first model that predicts it (the frontal model first).
    parts = [m.thresholds for m in labeller.models.values()]
    thresholds = combine_thresholds(parts, labels, how="first")
    label_rows = (
        _study_label_row(s, v[2], thresholds.apply(np.nan_to_num(v[2])[None])[0], labels)
        for s, v in studies.items()
    )
    prob_rows = (
        [s, v[0], v[1], *("" if math.isnan(p) else f"{p:.6f}" for p in v[2])]
        for s, v in studies.items()
    )
    outputs = {
        "study_labels": _write_csv(
            out_dir / "study_labels.csv", ["Path", *OBSERVATIONS], label_rows
        ),
        "study_probabilities": _write_csv(
            out_dir / "study_probabilities.csv",
            ["Path", "patient_id", "images", *labels],
            prob_rows,
        ),
    }
    return outputs, len(studies)


def _finish(
    out_dir: Path,
    labeller: _Labeller,
    journal: RowSource,
    state: dict[str, Any],
    summary: LabelSummary,
    heatmapper: _Heatmapper | None,
    ranks: list[dict[str, Any]] | None = None,
) -> None:
    """The output files from `journal`'s rows (one Journal, or all ranks' merged) and run.json
    from `state`'s counts; `ranks`: each rank's timing, under torchrun."""
    labels = labeller.labels
    outputs = {
        "labels": _write_csv(
            out_dir / "labels.csv",
            ["Path", *OBSERVATIONS],
            (
                [r["Path"], *(r.get(f"y:{o}", "") for o in OBSERVATIONS)]
                for r in journal.image_rows()
            ),
        ),
        "probabilities": _write_csv(
            out_dir / "probabilities.csv",
            ["Path", *labels],
            ([r["Path"], *(_prob_cell(r[f"p:{k}"]) for k in labels)] for r in journal.image_rows()),
        ),
        "images": _write_csv(
            out_dir / "images.csv",
            IMAGE_COLUMNS,
            ([r[c] for c in IMAGE_COLUMNS] for r in journal.image_rows()),
        ),
        "errors": _write_csv(
            out_dir / "errors.csv",
            ERROR_COLUMNS,
            ([r[c] for c in ERROR_COLUMNS] for r in journal.error_rows()),
        ),
    }
    study_outputs, summary.studies = _write_studies(out_dir, labeller, journal)
    outputs.update(study_outputs)
    counts = state["counts"]
    summary.inputs = state["done"]
    summary.labelled, summary.errors = counts["labelled"], counts["errors"]
    summary.flagged, summary.heatmaps = counts["flagged"], counts["heatmaps"]
    summary.flagged_inputs, summary.skipped = counts["flagged_inputs"], counts["skipped"]
    if heatmapper is not None:
        outputs["heatmaps"] = heatmapper.dir
    run_json = out_dir / "run.json"
    summary.outputs = {**outputs, "run": run_json}
    manifest = labeller.journal.arguments()
    manifest.pop("shard", None)  # this rank's share; `ranks` below says how the run was split
    record: dict[str, Any] = {
        "summary": summary.to_dict(),
        "arguments": manifest,
        "model": labeller.models["model"].model_info(),
        "lateral_model": labeller.models["lateral model"].model_info()
        if "lateral model" in labeller.models
        else None,
        "heatmaps": heatmapper.notes if heatmapper is not None else None,
        "notes": [
            "labels: 1.0 positive, 0.0 negative, -1.0 inside the stored uncertainty band, "
            "blank where the model does not predict the observation",
            "study rows: the maximum probability over the study's films",
        ],
    }
    if ranks is not None:
        record["ranks"] = ranks
    atomic_write_text(run_json, json.dumps(record, indent=2, default=str))
