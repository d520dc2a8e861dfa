"""Process memory tuning for long pruning runs (glibc `malloc_trim` / `mallopt`); a no-op on other C libraries.

`release_freed_memory` runs after every block (`BlockRunner.block_on_device`); `limit_heap_retention` is switched
on by `offload.BlockOffloader` for models with offloaded weights (docs/scale.md).
"""

from __future__ import annotations

from typing import Any

_LIBC: Any = None


def glibc() -> Any:
    """glibc through ctypes, or `False` when the C library is not glibc (no `malloc_trim`/`mallopt`)."""
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        try:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.malloc_trim, libc.mallopt  # noqa: B018  (AttributeError on other C libraries)
            _LIBC = libc
        except (OSError, AttributeError):
            pass
    return _LIBC


def release_freed_memory() -> None:
    """Give memory freed by the last block back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    Loading a block from the offload store allocates tens of MB per tensor and frees it again. glibc raises its
    mmap threshold after such frees, so later tensors come from the heap and freed heap pages stay resident:
    without trimming, the resident set grows by tens of MB per block (measured: +460 MB over 6 blocks of a
    hidden-1024 Llama) although nothing is referenced.
    """
    libc = glibc()
    if libc:
        libc.malloc_trim(0)


# glibc's defaults (`M_MMAP_THRESHOLD`, `M_TRIM_THRESHOLD`: 128 KiB); setting them with `mallopt` keeps them fixed.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_LARGE_ALLOCATION = 128 * 1024
_HEAP_LIMITED = False
# Set to False before pruning to keep glibc's adaptive thresholds (faster, but the resident set grows, see below).
LIMIT_HEAP_RETENTION = True


def limit_heap_retention() -> bool:
    """Serve every allocation of 128 KiB or more from its own mmap, so a freed tensor leaves the resident set at once.

    glibc starts with this behaviour but raises its mmap threshold (up to 32 MiB) each time a large block is freed;
    from then on tensors of a few MB come from the heap, and freed heap memory stays resident until `malloc_trim`,
    and fragments. Inside one block (forward activations, scores, the next forward) the heap then grew 100-200 MB
    above what was alive (hidden-1024 Llama, 8 x 128 tokens). Fixing the thresholds at their defaults with `mallopt`
    turns the dynamic adjustment off for the rest of the process: large allocations cost an mmap/munmap and fresh
    zero pages each: on the `bench/memory.py` model the offloaded prune took ~35 s instead of ~29 s (+19%) and
    peaked at 547 MB instead of 606-698 MB. Called by `BlockOffloader` for models with offloaded weights, where
    memory is what the user is short of, unless `LIMIT_HEAP_RETENTION` is False; a no-op for C libraries other
    than glibc. Returns whether the setting is (now) in effect.
    """
    global _HEAP_LIMITED
    libc = glibc()
    if libc and not _HEAP_LIMITED and LIMIT_HEAP_RETENTION:
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _LARGE_ALLOCATION) and libc.mallopt(_M_TRIM_THRESHOLD, _LARGE_ALLOCATION)
        _HEAP_LIMITED = bool(ok)
        release_freed_memory()
    return _HEAP_LIMITED
