"""glibc's allocator keeps freed memory for reuse in the processes emfm runs, unless the user chose otherwise."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's allocator only")

# Allocates, fills and frees 64 MiB with malloc 20 times (above glibc's largest adaptive mmap threshold, 32 MiB;
# numpy would ask for huge pages): prints the page faults of the loop, then of the same loop in a child process.
LOOP = """
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    block = libc.malloc(1 << 26)
    ctypes.memset(block, 1, 1 << 26)
    libc.free(block)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
SCRIPT = f"""
import subprocess, sys
from emfm.allocator import keep_freed_memory
print(keep_freed_memory() if sys.argv[1] == "keep" else False)
{LOOP}
print(subprocess.run([sys.executable, "-c", {LOOP!r}], capture_output=True, text=True, check=True).stdout.strip())
"""
PAGES = (1 << 26) // 4096           # one array's pages


def run(mode: str, **env: str) -> tuple[bool, int, int]:
    """(whether it kept memory, page faults of the loop here, and in a child process)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("LD_PRELOAD",
                                                                                             "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True,
                         env={**clean, **env}).stdout.split()
    return out[0] == "True", int(out[1]), int(out[2])


def test_freed_memory_is_reused_here_and_in_child_processes() -> None:
    kept, here, child = run("keep")
    assert kept
    assert here < 3 * PAGES and child < 3 * PAGES          # the first array's pages, then reuse
    kept, here, child = run("default")
    assert not kept
    assert here > 15 * PAGES and child > 15 * PAGES        # every array faulted in anew


def test_an_allocator_the_user_chose_is_left_alone() -> None:
    kept, here, child = run("keep", MALLOC_ARENA_MAX="2")
    assert not kept
    assert here > 15 * PAGES and child > 15 * PAGES
