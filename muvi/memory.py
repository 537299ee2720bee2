"""Keeping the process's resident memory to what it uses (glibc; no-ops elsewhere).

PyTorch's CPU tensors come from ``malloc``. glibc serves a request above its mmap threshold with
a fresh mapping that ``free`` returns to the system, and below it from heaps that keep freed
blocks resident; the threshold starts at 128 KB but *rises* to the size of each large block
freed (up to 32 MB), so after the first stage of a run most activations live in heaps that only
grow: the base preset's vocoder then held ~0.6 GB more than its working set.
:func:`return_large_blocks` pins the threshold (so every block of 16 MB or more is mapped and
returned when freed) and :func:`release_freed_memory` trims what the heaps hold.
"""
from __future__ import annotations

import ctypes
import functools

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None  # glibc only


def release_freed_memory() -> None:
    """Hand memory the process freed back to the system (``malloc_trim``)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def return_large_blocks(threshold: int = 16 << 20) -> bool:
    """Serve every allocation of ``threshold`` bytes or more by its own mapping, returned to the
    system when freed (glibc's ``M_MMAP_THRESHOLD``; setting it also stops the threshold's rise).
    Process-wide: the CLI and the benchmarks call it; a program embedding muvi may. Returns
    whether it took effect."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, threshold))
