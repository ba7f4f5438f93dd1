"""What the machine offers: the CPU model, native bf16, and the CPU allocator setting.

bf16 autocast pays only where the hardware computes in bf16: AVX512-BF16 / AMX-BF16 on x86, the
BF16 extension on Arm, and CUDA GPUs of compute capability 8.0 or later. Elsewhere oneDNN and
PyTorch emulate it with fp32 conversions, and a training iteration gets about 15x slower (measured:
MiT-B1 AFA at crop 320, batch 2, on an AVX2-only CPU: 4.4 s in fp32, 68 s with bf16).
:func:`resolve_amp` therefore falls back to fp32 there, with a one-time warning that says so.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import warnings
from pathlib import Path

import torch

from wsss.config import AMP_CHOICES  # the values train.amp may hold besides null

log = logging.getLogger("wsss")

#: /proc/cpuinfo flags of native bf16 arithmetic (x86: AVX512-BF16, AMX-BF16; Arm: the BF16 extension).
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
#: measured slowdown of a bf16 training iteration on a CPU that emulates bf16 (see the module docstring).
EMULATED_BF16_SLOWDOWN = 15

_warned: set[str] = set()


def cpu_info(path: str | Path = "/proc/cpuinfo") -> tuple[str, frozenset[str]]:
    """(CPU model name, feature flags) from ``/proc/cpuinfo``; (platform name, empty) where unreadable."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return platform.processor() or platform.machine(), frozenset()
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:  # x86 "flags", Arm "Features"
            flags = frozenset(value.split())
    return model or platform.processor() or platform.machine(), flags


def bf16_native(device: torch.device | str = "cpu") -> bool:
    """True where ``device`` computes in bf16 natively (not emulated through fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # older torch without the keyword
            return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    return bool(cpu_info()[1] & BF16_CPU_FLAGS) and torch.backends.mkldnn.is_available()


def resolve_amp(amp: str | None, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` on ``device``: bfloat16, or None for fp32.

    ``amp="bf16"`` where bf16 is not native falls back to fp32 and warns once per device type
    (emulated bf16 costs about 15x the fp32 time); ``amp="auto"`` is bf16 where native and fp32
    elsewhere without a warning (the demo's setting: results then depend on the machine).
    """
    if amp is None or str(amp).lower() in ("none", "null", "fp32", ""):
        return None
    if str(amp) not in AMP_CHOICES:
        raise ValueError(f"train.amp must be null, 'bf16' or 'auto', got {amp!r}")
    device = torch.device(device)
    if bf16_native(device):
        return torch.bfloat16
    if str(amp) == "auto":  # asked for bf16 only where it pays: fp32 here, silently
        return None
    if device.type not in _warned:
        _warned.add(device.type)
        what = cpu_info()[0] if device.type == "cpu" else str(device)
        msg = (
            f"train.amp=bf16: {what} has no native bf16 (no avx512_bf16 / amx_bf16 / bf16 CPU flag, or a "
            f"GPU before compute capability 8.0); emulated bf16 is about {EMULATED_BF16_SLOWDOWN}x slower "
            f"than fp32, so this run trains in fp32"
        )
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        log.warning(msg)
    return None


def keep_freed_memory() -> bool:
    """Let glibc keep freed large blocks instead of returning them to the OS (CPU training).

    Every iteration allocates and frees tensors of tens of MB; by default glibc maps each one fresh
    and the first touch of every page faults, which makes elementwise CPU ops several times slower.
    Raising the mmap and trim thresholds keeps those pages in the heap for reuse (the resident size
    then stays at its peak). Returns False where glibc's ``mallopt`` is not available.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    # glibc caps the mmap threshold (32 MiB on older versions): fall back to the cap when refused
    mapped = libc.mallopt(m_mmap_threshold, 1 << 30) or libc.mallopt(m_mmap_threshold, 32 << 20)
    return bool(mapped) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
