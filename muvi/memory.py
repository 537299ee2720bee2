"""Keeping the process's resident memory to what it uses (glibc; no-ops elsewhere).

PyTorch's CPU tensors come from ``malloc``. glibc serves a request above its mmap threshold with
a fresh mapping that ``free`` returns to the system, and below it from heaps that keep freed
blocks resident; the threshold starts at 128 KB but *rises* to the size of each large block
freed (up to 32 MB), so after the first stage of a run most activations live in heaps that only
grow: the base preset's vocoder then held ~0.6 GB more than its working set.
:func:`return_large_blocks` pins the threshold (so every block of 16 MB or more is mapped and
returned when freed) and :func:`release_freed_memory` trims what the heaps hold.

Weights loaded from a release are mapped from their safetensors files (no copy), so the pages a
stage reads count as resident until the kernel needs them: after a generation all of them would.
:func:`page_out_mapped` drops a module's mapped pages from the process once its stage is done, so
the peak is the largest stage rather than the sum of all. Only pages that are still unmodified
copies of the file are dropped (``/proc/self/pagemap`` says which; ``MADV_DONTNEED``), so nothing
is lost; the page cache keeps them, and the next use maps them again in milliseconds (asking the
kernel to reclaim them outright, ``MADV_PAGEOUT``, made that re-read cost ~1 s per GB).
"""
from __future__ import annotations

import bisect
import ctypes
import functools
import os

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
MADV_DONTNEED = 4      # madvise advice (linux/mman.h): unmap these pages from the process
_PAGEMAP_PRESENT, _PAGEMAP_SWAPPED, _PAGEMAP_FILE = 1 << 63, 1 << 62, 1 << 61  # pagemap entry bits


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


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's file-backed mappings, sorted; empty without /proc."""
    spans = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and fields[4] != "0" and fields[5].startswith("/"):  # inode, path
                    start, end = fields[0].split("-")
                    spans.append((int(start, 16), int(end, 16)))
    except OSError:
        return []
    return sorted(spans)


def _unmodified_runs(pagemap: int, first_page: int, count: int) -> list[tuple[int, int]]:
    """(first page, pages) of each run among ``count`` pages from ``first_page`` that are absent
    or still the file's page (not a private copy made by a write, nor swapped)."""
    entries = memoryview(os.pread(pagemap, 8 * count, 8 * first_page)).cast("Q")
    runs, start = [], None
    for k, entry in enumerate([*entries, _PAGEMAP_PRESENT]):  # a sentinel ends the last run
        written = bool(entry & (_PAGEMAP_PRESENT | _PAGEMAP_SWAPPED)) and not entry & _PAGEMAP_FILE
        if written or k == len(entries):
            if start is not None:
                runs.append((first_page + start, k - start))
            start = None
        elif start is None:
            start = k
    return runs


def page_out_mapped(module) -> int:
    """Drop from this process the pages of ``module``'s parameters and buffers that are mapped
    from files (weights loaded from a release) and unmodified; tensors in ordinary memory, and
    mapped pages written to since, are left alone. Returns the bytes dropped (a page two tensors
    share counts twice; 0 where unsupported: not Linux/glibc). Not to be called while another
    thread writes to those tensors."""
    libc = _libc()
    spans = _file_mappings()
    if libc is None or not spans:
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    starts = [start for start, _ in spans]
    dropped = 0
    try:
        pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)
    except OSError:
        return 0
    try:
        for tensor in [*module.parameters(), *module.buffers()]:
            begin = tensor.data_ptr()
            if tensor.device.type != "cpu" or not tensor.numel():
                continue
            i = bisect.bisect_right(starts, begin) - 1
            if i < 0 or begin >= spans[i][1]:
                continue  # not in a file mapping
            first = begin - begin % page
            last = min(begin + tensor.numel() * tensor.element_size(), spans[i][1])
            for run, pages in _unmodified_runs(pagemap, first // page, -(-(last - first) // page)):
                if libc.madvise(ctypes.c_void_p(run * page), ctypes.c_size_t(pages * page), MADV_DONTNEED) == 0:
                    dropped += pages * page
    finally:
        os.close(pagemap)
    return dropped
