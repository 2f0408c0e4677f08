"""Execution planning: where and how a training step runs (device, precision, memory format).

bf16 autocast + channels_last is chosen where it is native (CUDA, CPUs with AMX/AVX512-BF16);
elsewhere bf16 is emulated and slower, so `auto` stays in fp32. bf16 costs no accuracy beyond
seed noise on the learning check (benchmarks/bench_precision.py, seeds 0-4, held-out AUROC:
Pleural Effusion fp32 0.900 +/- 0.019, bf16 0.894 +/- 0.024; Cardiomegaly 0.902 +/- 0.012 and
0.904 +/- 0.017), so where it is native it stays the default; rerun that benchmark on a new kind
of CPU before trusting the default there. Tests inject CPU flags to check the choice, and every
test that trains names its plan, so no outcome depends on the machine that runs it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from cxrlabel.hardware import cpu_flags, cpu_has_amx_bf16, cpu_has_fast_bf16, cpu_name
from cxrlabel.models.factory import resolve_device

# cpu_flags, cpu_name and the bf16 checks live in cxrlabel.hardware (inference plans use them
# too); they are re-exported here for the training plan's callers.
__all__ = [
    "ExecutionPlan",
    "autocast",
    "choose_execution",
    "cpu_flags",
    "cpu_has_amx_bf16",
    "cpu_has_fast_bf16",
    "cpu_name",
    "to_device",
]


@dataclass(frozen=True)
class ExecutionPlan:
    """Where and how the training step runs, and why it was chosen."""

    device: str
    amp_dtype: str | None  # "bfloat16" or None (fp32)
    channels_last: bool
    reason: str

    @property
    def precision(self) -> str:
        return "bf16" if self.amp_dtype else "fp32"

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "precision": self.precision,
            "channels_last": self.channels_last,
            "reason": self.reason,
        }


def choose_execution(
    device: str = "auto", precision: str = "auto", *, flags: frozenset[str] | None = None
) -> ExecutionPlan:
    """device auto|cpu|cuda and precision auto|fp32|bf16 -> what the training step does."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, not {precision!r}")
    device = resolve_device(device).type
    if precision == "fp32":
        return ExecutionPlan(device, None, False, "precision fp32 was asked for")
    if precision == "bf16":
        return ExecutionPlan(device, "bfloat16", True, "precision bf16 was asked for")
    if device == "cuda":
        if torch.cuda.is_bf16_supported():
            return ExecutionPlan(device, "bfloat16", True, "CUDA with bf16 support")
        return ExecutionPlan(device, None, True, "CUDA without bf16 support")
    if cpu_has_fast_bf16(flags):
        return ExecutionPlan(device, "bfloat16", True, "CPU has AMX/AVX512-BF16")
    return ExecutionPlan(device, None, False, "CPU lacks AMX/AVX512-BF16: bf16 would be slower")


def autocast(plan: ExecutionPlan) -> contextlib.AbstractContextManager:
    if plan.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(plan.device, dtype=getattr(torch, plan.amp_dtype))


def to_device(batch: Mapping[str, torch.Tensor], plan: ExecutionPlan) -> dict[str, torch.Tensor]:
    out = {k: v.to(plan.device, non_blocking=True) for k, v in batch.items()}
    if plan.channels_last:
        out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
    return out
