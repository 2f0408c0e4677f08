"""What the CPU can do: its feature flags and name (from /proc/cpuinfo), and whether bf16 is
native on it. Used by the training plan (cxrlabel.training.execution) and the inference plan
(cxrlabel.models.predictor); tests pass `flags` explicitly so no outcome depends on the CPU.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU feature flags Linux reports (empty where /proc/cpuinfo does not exist)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    import platform

    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_fast_bf16(flags: frozenset[str] | None = None) -> bool:
    """True where bf16 matmuls/convolutions are native (AMX or AVX512-BF16).

    Elsewhere bf16 on a CPU is emulated and slower than fp32, so "auto" must not pick it.
    """
    flags = cpu_flags() if flags is None else flags
    if flags & {"amx_bf16", "avx512_bf16"}:
        return True
    # Without /proc/cpuinfo (macOS, Windows) oneDNN's own view is the best available.
    if not flags:
        with contextlib.suppress(Exception):
            return torch.backends.cpu.get_cpu_capability() == "AVX512_BF16"
    return False


def cpu_has_amx_bf16(flags: frozenset[str] | None = None) -> bool:
    """True where the CPU has AMX bf16 tiles (Intel Sapphire Rapids and later), the only CPUs
    where bf16 inference measured faster than ONNX Runtime fp32 (see
    cxrlabel.models.predictor.inference_plan)."""
    flags = cpu_flags() if flags is None else flags
    return "amx_bf16" in flags
