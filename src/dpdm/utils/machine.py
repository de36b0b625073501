"""What a timing was measured on: CPU model, the vector ISA PyTorch dispatches to, bf16 support, GPUs.

Wall times in dpdm's rows come from 2-core machines whose speed differed by up to 3x between sessions for
the same run, and the ISA decides whether bf16-mixed is a speed-up (a CPU with avx512_bf16) or a 9-11x
slow-down (an AVX2-only AMD EPYC; docs/performance.md). So every run's summary and every study row says
what it ran on.
"""
from __future__ import annotations

import os
import platform

import torch

__all__ = ["cpu_bf16_flags", "cpu_isa", "cpu_model", "has_cpu_bf16_kernels", "machine_facts", "machine_line"]

# CPU flags (Linux /proc/cpuinfo) of native bf16 arithmetic on x86
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo_field(name: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_bf16_flags() -> list[str]:
    """The native bf16 instruction sets this CPU reports (empty where it reports none, or off Linux)."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return [f for f in _BF16_FLAGS if f in flags]


def cpu_isa() -> str:
    """The widest vector ISA PyTorch's CPU kernels dispatch to here: AVX512, AVX2, DEFAULT, ..."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return "unknown"


def has_cpu_bf16_kernels() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (x86: AVX-512 BW/VL/DQ, native with avx512_bf16 or
    AMX; Arm: the bf16 extensions). Without them bf16 convolutions run on slow fallbacks: the DP step of
    the CPU presets' network ran 9-11x slower in bf16-mixed than in fp32 on an AVX2-only AMD EPYC."""
    answer = _onednn_bf16_check()
    return cpu_isa().startswith("AVX512") if answer is None else answer


def _onednn_bf16_check() -> bool | None:
    """oneDNN's own answer (what PyTorch's tests ask), or None where this build does not expose it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


def machine_facts() -> dict:
    """The facts a wall time needs beside it (summary.json, benchmark records)."""
    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    return {"cpu": cpu_model(), "cpu_isa": cpu_isa(), "cpu_bf16_flags": cpu_bf16_flags(),
            "cpu_bf16_kernels": has_cpu_bf16_kernels(),
            "cpu_count": os.cpu_count(), "gpus": gpus, "torch": torch.__version__}


def machine_line() -> str:
    """One line for a study row, e.g. 'AMD EPYC (AVX2), 2 cpus' or '... (AVX512, avx512_bf16), 2 cpus'."""
    isa = ", ".join([cpu_isa(), *cpu_bf16_flags()])
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu_model()} ({isa}), {os.cpu_count()} cpus{gpu}"
