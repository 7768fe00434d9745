"""CPU threads of the processes emfm runs side by side on one machine.

torch runs each process's operations on an OpenMP team of up to one thread per core, and OpenMP lets a thread
that reaches the end of a parallel region spin before it sleeps. When other processes want the same cores
(DataLoader workers, Dask workers, other jobs), a spinning thread holds the core its partner needs to finish,
and a step runs many times slower (docs/benchmarks.md, "Shared machine": a ViT-S MAE step fell from 26 to
2.5-3.2 images/s). emfm keeps its processes from meeting that, unless the user chose otherwise:

- ``OMP_WAIT_POLICY=PASSIVE`` (a waiting thread sleeps at once) when a command's processes would run more threads
  than there are cores. OpenMP reads it once, when torch loads, so the ``emfm`` command decides before it imports
  torch (:func:`wait_passively`), and the processes it starts (Dask and DDP workers) inherit it.
- Torch threads that fit the cores: DataLoader workers run one each (torch's rule, kept by a test), CPU DDP ranks
  share the cores (Lightning's rule), and each task of a local Dask cluster gets :func:`task_threads`.

This module imports no torch.
"""

from __future__ import annotations

import os

MAX_WORKERS = 4
# Settings by which a user has chosen how OpenMP threads wait (libgomp's, and Intel's OpenMP's): left alone.
WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def cores() -> int:
    """CPU cores this process may run on (its share of the machine under affinity or a cgroup cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers(trainings: int = 1) -> int:
    """DataLoader workers when ``data.num_workers`` is null: up to 4, leaving a core to the training process;
    for each of ``trainings`` run side by side, out of its share of the cores (none with one core each)."""
    return max(0, min(MAX_WORKERS, cores() // trainings - 1))


def wait_passively(processes: int) -> bool:
    """Have OpenMP threads sleep while they wait, when the main process's torch threads (``OMP_NUM_THREADS``, or
    torch's default of up to one per core) and one thread for each of the other ``processes - 1`` are more than
    the cores, and the user set no wait policy. Returns whether it set one.

    It takes effect in this process only if torch is not imported yet, and in every process started afterwards.
    """
    threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or cores()
    if processes < 2 or threads + processes - 1 <= cores() or any(key in os.environ for key in WAIT_SETTINGS):
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def task_threads(n_workers: int, threads_per_worker: int) -> int:
    """Torch threads of each task of a local Dask cluster: ``threads_per_worker``, fewer where the cluster's
    tasks (workers x threads each) would otherwise run more threads than the cores, at least 1."""
    return min(threads_per_worker, max(1, cores() // (n_workers * threads_per_worker)))
