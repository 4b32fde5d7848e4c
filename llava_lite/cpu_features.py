"""What the CPU says it can do (from /proc/cpuinfo): decides bf16 for training precision `auto`
and the int8 inference kernels."""

from __future__ import annotations

from pathlib import Path

# /proc/cpuinfo flags that mean bf16 matmuls run in hardware: x86 AVX512-BF16 and AMX, and
# Arm's BF16 extension (listed as "bf16" under Features).
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")
# torch's CPU int8 matmul (torch._int_mm) calls oneDNN only where AVX512-VNNI is present (AMX
# parts have it too) and runs a scalar loop otherwise, AVX-VNNI-only CPUs included.
NATIVE_INT8_FLAGS = ("avx512_vnni",)


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
    """The flags by which torch runs this CPU's int8 matmuls natively; empty if none."""
    flags = cpu_flags() if flags is None else flags
    return sorted(set(NATIVE_INT8_FLAGS) & flags)
