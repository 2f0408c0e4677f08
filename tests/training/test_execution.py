"""Execution planning: the choice is made from injected CPU flags, never the machine's own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cxrlabel.training.execution import (
    autocast,
    choose_execution,
    cpu_flags,
    cpu_has_fast_bf16,
    to_device,
)

AMX = frozenset({"avx2", "amx_bf16"})
AVX2 = frozenset({"avx2", "fma"})


def test_fast_bf16_is_read_from_the_flags() -> None:
    assert cpu_has_fast_bf16(AMX)
    assert cpu_has_fast_bf16(frozenset({"avx512_bf16"}))
    assert not cpu_has_fast_bf16(AVX2)


def test_auto_on_cpu_follows_the_flags() -> None:
    # bench_precision.py found bf16 within seed noise of fp32, so native bf16 stays the default.
    fast = choose_execution("cpu", "auto", flags=AMX)
    assert (fast.device, fast.precision, fast.channels_last) == ("cpu", "bf16", True)
    slow = choose_execution("cpu", "auto", flags=AVX2)
    assert (slow.device, slow.precision, slow.channels_last) == ("cpu", "fp32", False)
    assert "lacks" in slow.reason


def test_an_asked_for_precision_ignores_the_flags() -> None:
    forced = choose_execution("cpu", "fp32", flags=AMX)
    assert (forced.precision, forced.channels_last) == ("fp32", False)
    emulated = choose_execution("cpu", "bf16", flags=AVX2)
    assert (emulated.precision, emulated.channels_last) == ("bf16", True)
    assert forced.to_dict() == {
        "device": "cpu", "precision": "fp32", "channels_last": False, "reason": forced.reason,
    }  # fmt: skip


def test_bad_device_or_precision_is_an_error() -> None:
    with pytest.raises(ValueError, match="device"):
        choose_execution("tpu", "fp32")
    with pytest.raises(ValueError, match="precision"):
        choose_execution("cpu", "fp16")


def test_cpu_flags_reads_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu avx2 amx_bf16\n")
    assert cpu_flags(info) == frozenset({"fpu", "avx2", "amx_bf16"})
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_the_plan_sets_autocast_and_memory_format() -> None:
    x = torch.randn(2, 3, 4, 4)
    bf16 = choose_execution("cpu", "bf16", flags=AVX2)
    fp32 = choose_execution("cpu", "fp32", flags=AMX)
    weight = torch.randn(4, 4)
    with autocast(bf16):
        assert (x @ weight).dtype == torch.bfloat16
    with autocast(fp32):
        assert (x @ weight).dtype == torch.float32
    batch = {"image": x, "target": torch.ones(2, 1)}
    assert to_device(batch, bf16)["image"].is_contiguous(memory_format=torch.channels_last)
    assert not to_device(batch, fp32)["image"].is_contiguous(memory_format=torch.channels_last)
