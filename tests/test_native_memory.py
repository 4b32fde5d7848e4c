"""The server's native-heap hygiene: the malloc arena cap respects $MALLOC_ARENA_MAX, and the
trimmer hands freed pages back at most once per interval."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llava_lite.serve import native_memory
from llava_lite.serve.native_memory import MallocTrimmer, limit_malloc_arenas

glibc = pytest.mark.skipif(native_memory._libc() is None, reason="needs glibc")


def test_malloc_settings_leave_explicit_ones_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert limit_malloc_arenas() is False


@glibc
def test_trimmer_is_rate_limited_and_returns_freed_pages(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(native_memory.time, "monotonic", lambda: clock[0])
    trimmer = MallocTrimmer(min_interval_s=5.0)
    assert trimmer.available
    assert trimmer(object()) is True  # any argument: it is an engine on_finish callback
    assert trimmer() is False
    clock[0] += 4.9
    assert trimmer() is False
    clock[0] += 0.2
    assert trimmer() is True
    assert trimmer.trims == 2


CHILD = """
import ctypes
from llava_lite.serve.native_memory import MallocTrimmer

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: free() never trims, only the trimmer can
libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: these blocks live on the heap
blocks = [libc.malloc(64 * 1024) for _ in range(800)]  # 50 MB
for b in blocks:
    ctypes.memset(b, 1, 64 * 1024)
keep = libc.malloc(16)  # above them: their space is a hole in the heap, not its tail
for b in blocks:
    libc.free(b)
before = rss_mb()
assert MallocTrimmer(min_interval_s=0)()
print(before - rss_mb())
"""


@glibc
def test_trim_gives_freed_heap_back_to_the_kernel():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    assert float(out.stdout) > 30  # MB handed back of the 50 MB freed
