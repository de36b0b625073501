"""What a wall time was measured on (dpdm.utils.machine), and the bf16-on-CPU warning dpdm-train gives."""
from __future__ import annotations

import os

import pytest
import torch
from omegaconf import OmegaConf

from dpdm.cli.train import slow_precision_warning
from dpdm.utils import machine


def test_bf16_flags_are_read_from_the_cpu_flags(monkeypatch):
    flags = {"flags": "fpu sse2 avx2 avx512f avx512_bf16 amx_tile"}
    monkeypatch.setattr(machine, "_cpuinfo_field", flags.get)
    assert machine.cpu_bf16_flags() == ["avx512_bf16"]
    monkeypatch.setattr(machine, "_cpuinfo_field", {"flags": "fpu sse2 avx2 fma"}.get)
    assert machine.cpu_bf16_flags() == []
    monkeypatch.setattr(machine, "_cpuinfo_field", {}.get)  # no /proc/cpuinfo (macOS, Windows)
    assert machine.cpu_bf16_flags() == []


def test_bf16_kernels_need_avx512_on_x86():
    """oneDNN's bf16 kernels need AVX-512 (or its bf16 extensions): where PyTorch dispatches to AVX2 or less,
    the check must say none, whichever way it is answered."""
    if not machine.cpu_isa().startswith(("AVX2", "DEFAULT")):
        pytest.skip(f"this CPU dispatches to {machine.cpu_isa()}")
    assert not machine.has_cpu_bf16_kernels()


def test_without_onednns_check_the_isa_decides(monkeypatch):
    monkeypatch.setattr(machine, "_onednn_bf16_check", lambda: None)
    monkeypatch.setattr(machine, "cpu_isa", lambda: "AVX512")
    assert machine.has_cpu_bf16_kernels()
    monkeypatch.setattr(machine, "cpu_isa", lambda: "AVX2")
    assert not machine.has_cpu_bf16_kernels()


def test_the_machine_line_names_cpu_isa_and_cores(monkeypatch):
    monkeypatch.setattr(machine, "cpu_model", lambda: "Some CPU")
    monkeypatch.setattr(machine, "cpu_isa", lambda: "AVX512")
    monkeypatch.setattr(machine, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    assert machine.machine_line() == f"Some CPU (AVX512, avx512_bf16), {os.cpu_count()} cpus{gpu}"
    facts = machine.machine_facts()
    assert facts["cpu_count"] == os.cpu_count() and facts["torch"] == torch.__version__


@pytest.mark.parametrize("precision,accelerator,kernels,warns", [
    ("bf16-mixed", "cpu", False, True),
    ("bf16-true", "cpu", False, True),
    ("bf16-mixed", "cpu", True, False),    # a CPU with bf16 kernels: the opt-in trade docs/performance.md measures
    ("32-true", "cpu", False, False),
    ("bf16-mixed", "gpu", False, False),
])
def test_bf16_on_a_cpu_without_bf16_kernels_is_warned_about(monkeypatch, precision, accelerator, kernels, warns):
    monkeypatch.setattr(machine, "has_cpu_bf16_kernels", lambda: kernels)
    message = slow_precision_warning(OmegaConf.create({"precision": precision, "accelerator": accelerator}))
    assert (message is not None) == warns
    if warns:
        assert "trainer.precision=32-true" in message and precision in message
