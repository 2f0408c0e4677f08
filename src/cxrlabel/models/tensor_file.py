"""Reading a safetensors file that may be hostile: a named error, never a library traceback.

A weights file is refused with `WeightsError` naming it and the problem when it is not a
safetensors file at all (random bytes, a pickle renamed, a truncated copy, a header whose
tensors the file does not hold: safetensors' own header checks catch these), and, given the
model's state dict, when its keys, shapes or dtypes do not fit. Keys and shapes are checked
from the header, before any tensor is read, so a file of wrong, huge tensors costs no memory.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

log = logging.getLogger(__name__)


class WeightsError(ValueError):
    """A weights file that is unreadable or does not fit the model, with what did not match."""


def _dtype_fits(saved: torch.dtype, wanted: torch.dtype) -> bool:
    # Equal, or both floating point (a float16 file into a float32 model loads losslessly
    # enough); an integer or bool tensor in place of a float parameter, or back, is refused.
    return saved == wanted or (saved.is_floating_point and wanted.is_floating_point)


def describe_mismatch(
    saved: Mapping[str, tuple[int, ...]], expected: Mapping[str, torch.Tensor]
) -> str | None:
    """What keeps tensors of these shapes from loading strictly into `expected`; None: fits."""
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    wrong_shape = sorted(
        f"{k}: file {tuple(saved[k])} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(saved)
        if tuple(saved[k]) != tuple(expected[k].shape)
    )
    if not (missing or unexpected or wrong_shape):
        return None
    return (
        f"{len(missing)} missing (e.g. {missing[:3]}), "
        f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
        f"{len(wrong_shape)} wrong shape (e.g. {wrong_shape[:3]})"
    )


def check_dtypes(
    path: Path, tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> None:
    wrong = sorted(
        f"{k}: file {tensors[k].dtype} vs model {expected[k].dtype}"
        for k in set(tensors) & set(expected)
        if not _dtype_fits(tensors[k].dtype, expected[k].dtype)
    )
    if wrong:
        raise WeightsError(f"{path}: {len(wrong)} tensor(s) of the wrong dtype (e.g. {wrong[:3]})")


def read_safetensors(
    path: Path, expected: Mapping[str, torch.Tensor] | None = None, *, what: str = "weights"
) -> dict[str, torch.Tensor]:
    """The tensors of safetensors file `path` on the CPU.

    expected: a model's state dict; the file must then hold exactly its keys, with its shapes
    (checked from the header, before reading any data) and compatible dtypes.
    what: the file's part in the message ("weights", "training state").
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            if expected is not None:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
                problem = describe_mismatch(shapes, expected)
                if problem:
                    raise WeightsError(f"{path} does not fit the model: {problem}")
            tensors = {k: f.get_tensor(k) for k in keys}
    except SafetensorError as exc:
        raise WeightsError(f"{path}: not a readable safetensors {what} file ({exc})") from exc
    except (OSError, RuntimeError, TypeError) as exc:  # unreadable, or a dtype torch lacks
        raise WeightsError(f"{path}: cannot read {what} ({exc})") from exc
    if expected is not None:
        check_dtypes(path, tensors, expected)
    return tensors
