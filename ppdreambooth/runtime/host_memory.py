"""Give freed host memory back to the operating system (glibc's `malloc_trim`).

Paddle allocates CPU tensors with the C library's allocator. Tensors under 32 MiB come from its heap, and when
they are freed glibc keeps their pages for reuse instead of returning them: after caching releases SD 1.5's VAE
and text encoder (0.77 GiB of weights, hundreds of tensors of a few MiB), the process's resident memory fell by
only 0.13 GiB (`benchmarks/bench_real_size.py`). `malloc_trim(0)` returns every free page of the heap at once.
Elsewhere (musl, macOS, Windows) this is a no-op.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys


def give_back_freed_memory() -> bool:
    """Return the C heap's free pages to the system; True when glibc did so."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))
