"""What the CPU says it can do (from /proc/cpuinfo): decides bf16 for training precision `auto`
and the int8 inference kernels."""

from __future__ import annotations

from pathlib import Path

# /proc/cpuinfo flags that mean bf16 matmuls run in hardware: x86 AVX512-BF16 and AMX, and
# Arm's BF16 extension (listed as "bf16" under Features).
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")
# x86 flags for the int8 dot-product instructions that oneDNN's int8 matmul (torch._int_mm) is
# built on; without them it widens to int16 and loses its edge over a bf16 or fp32 matmul.
NATIVE_INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The first processor's feature flags (x86 `flags`, Arm `Features`); empty where unknown."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return set()


def native_bf16(flags: set[str] | None = None) -> list[str]:
    """The flags (sorted) by which this CPU runs bf16 matmuls natively; empty if none."""
    flags = cpu_flags() if flags is None else flags
    return sorted(set(NATIVE_BF16_FLAGS) & flags)


def native_int8(flags: set[str] | None = None) -> list[str]:
    """The flags (sorted) by which this CPU runs int8 dot products natively; empty if none."""
    flags = cpu_flags() if flags is None else flags
    return sorted(set(NATIVE_INT8_FLAGS) & flags)
