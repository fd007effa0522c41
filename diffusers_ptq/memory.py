"""Process memory: hand what the quantizer freed back to the operating system (issue #22)."""

from __future__ import annotations

import ctypes
import functools
import platform


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library, another OS)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim if platform.system() == "Linux" else None
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc: malloc_trim). glibc serves allocations below its dynamic mmap
    threshold — which rises to the size of the largest block freed, e.g. a float weight — from the heap and keeps
    what is freed there, so without this the float weights dropped while packing still count in the process's
    resident memory (measured: +367 MB instead of −191 MB over 20 layers of 4608×1152)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
