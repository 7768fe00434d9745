"""glibc's allocator told to keep the memory a forward pass frees, for the next one.

A forward or backward pass allocates and frees tens of MB of activations. glibc serves allocations above its mmap
threshold (adaptive, up to 32 MiB) with fresh pages from the kernel and unmaps them on free, and returns the heap's
free top beyond its trim threshold; the next pass then faults every page in again (and the kernel zeroes it).
Here that was ~16 000 page faults per forward pass of a ViT-Ti UNETR on 8 tiles of 128², and the pass ran
1.13-1.37x faster with both thresholds raised (docs/benchmarks.md, "Freed memory kept for the next pass"), at
the same peak RSS: what is kept is what the next pass needs again. PyTorch's CPU tuning guides reach the same with
jemalloc or tcmalloc preloaded; this needs nothing installed.

The ``emfm`` command applies it to its own process (:func:`keep_freed_memory`) and, through the environment, to the
processes it starts (DDP ranks, Dask workers). A user who chose an allocator or its settings (``LD_PRELOAD``,
``GLIBC_TUNABLES``, ``MALLOC_*``) is left alone. This module imports no torch.
"""

from __future__ import annotations

import ctypes
import os
import platform

THRESHOLD = 1 << 30                 # bytes: above any activation of emfm's networks
# glibc's mallopt parameters, and the environment variables by which a process reads them when it starts.
# The mmap threshold first: a trim threshold raised alone fixes the mmap threshold at its default (128 KiB), and a
# pass then faults in 4x more pages than with glibc's defaults.
SETTINGS = {-3: "MALLOC_MMAP_THRESHOLD_", -1: "MALLOC_TRIM_THRESHOLD_"}     # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


def user_chose_allocator() -> bool:
    """Whether the environment already says how memory is allocated: another allocator preloaded, or glibc's
    malloc tuned."""
    return bool(os.environ.get("LD_PRELOAD")) or "malloc" in os.environ.get("GLIBC_TUNABLES", "") \
        or any(key.startswith("MALLOC_") for key in os.environ)


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds in this process and in those it starts, unless the user chose
    otherwise or the C library is not glibc. Returns whether it did."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or user_chose_allocator():
        return False
    libc = ctypes.CDLL(None)
    if not all(libc.mallopt(param, THRESHOLD) for param in SETTINGS):
        return False
    os.environ.update({name: str(THRESHOLD) for name in SETTINGS.values()})
    return True
