"""The executors that run block tasks, here or on a Dask cluster.

A blockwise job writes each output block (aligned to the output chunks, so no two blocks share a
chunk file) and then marks it done in its store (:class:`~emfm.blockwise.store.Progress`). A rerun
skips the marked blocks, so a crash costs at most the blocks that were in flight, and the result
equals an uninterrupted run.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from emfm.blockwise.grid import Block
from emfm.errors import EmfmError
from emfm.threads import task_threads

EXECUTORS = ("local", "dask")


@dataclass(frozen=True)
class Executor:
    """Where block tasks run: ``local`` (this process, in order) or ``dask`` (the scheduler at ``address``, or
    a LocalCluster of ``n_workers`` processes started here)."""

    kind: str = "local"
    address: str | None = None
    n_workers: int = 2
    threads_per_worker: int = 1

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise EmfmError(f"executor={self.kind}: expected one of {', '.join(EXECUTORS)}")
        if self.kind == "dask" and (self.n_workers < 1 or self.threads_per_worker < 1):
            raise EmfmError(f"dask.n_workers={self.n_workers}, dask.threads_per_worker={self.threads_per_worker}: "
                            f"expected at least 1 each")

    def threads(self, local: int | None) -> int | None:
        """torch threads of each task process: a Dask worker's threads (on a LocalCluster started here, fewer where
        the workers' threads would be more than the cores: :func:`~emfm.threads.task_threads`), or ``local`` here
        (None: torch's default)."""
        if self.kind == "local":
            return local
        return self.threads_per_worker if self.address else task_threads(self.n_workers, self.threads_per_worker)


def run_blocks(task: Callable[..., Block], blocks: Sequence[Block], *args: Any, client: Any = None,
               desc: str = "blocks", progress: bool = True) -> float:
    """Run ``task(*args, block)`` for every block, here in order or as tasks of a Dask ``client``; returns
    the seconds.

    The task writes its block and marks it done itself, so whatever finished survives a crash.
    """
    start = time.perf_counter()
    bar = tqdm(total=len(blocks), desc=desc, unit="block", disable=not progress, smoothing=0.1)
    with bar:
        for _ in _completed(task, blocks, args, client):
            bar.update()
    return time.perf_counter() - start


def _completed(task: Callable[..., Block], blocks: Sequence[Block], args: tuple[Any, ...],
               client: Any) -> Iterable[Block]:
    if client is None:
        return (task(*args, block) for block in blocks)
    from dask.distributed import as_completed

    shared = [client.scatter(a, broadcast=True) if isinstance(a, np.ndarray) else a for a in args]
    run = uuid.uuid4().hex[:8]      # keys unique to this run on a long-lived scheduler
    futures = [client.submit(task, *shared, block, pure=False, key=f"{task.__name__}-{run}-{'-'.join(map(str, block))}")
               for block in blocks]
    return (future.result() for future in as_completed(futures))


@contextmanager
def executor_client(executor: Executor) -> Iterator[Any]:
    """The Dask client of a ``dask`` executor (None for local); afterwards a LocalCluster started here
    is closed, and this process is left as it was: torch's thread count (tasks may set it) and the
    environment, into which Dask's nanny writes ``OMP_NUM_THREADS=1`` & co. for the workers it starts
    (later subprocesses of this process would otherwise run torch on one thread, and compute other bits)."""
    threads, environ = torch.get_num_threads(), dict(os.environ)
    client = dask_client(executor.address, executor.n_workers, executor.threads_per_worker) \
        if executor.kind == "dask" else None
    try:
        yield client
    finally:
        torch.set_num_threads(threads)
        if client is not None:
            cluster = getattr(client, "cluster", None)
            client.close()
            if cluster is not None:
                cluster.close()
        for key in os.environ.keys() - environ.keys():
            del os.environ[key]
        os.environ.update(environ)


def dask_client(address: str | None, n_workers: int, threads_per_worker: int) -> Any:
    """A client of the scheduler at ``address``, or of a new LocalCluster of worker processes."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise EmfmError("executor=dask needs dask.distributed: pip install 'emfm[dask]'") from None

    if address:
        return Client(address)
    with sigint_ignored():
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                               dashboard_address=None)
    client = Client(cluster)
    client.run(quiet_close)
    return client


def quiet_close() -> None:
    """In a worker of our LocalCluster: closed with a task running (after a Ctrl-C or another block's error), a
    worker logs a warning per task cancelled; this process says what happened, in one line."""
    logging.getLogger("distributed.worker.state_machine").setLevel(logging.ERROR)


@contextmanager
def sigint_ignored() -> Iterator[None]:
    """SIGINT ignored meanwhile, and so in the processes started meanwhile (they inherit it): Ctrl-C reaches every
    process of the terminal's group, and this one, interrupted, closes its LocalCluster, whose workers would
    otherwise each print a traceback. (A Ctrl-C while the workers start is lost.)"""
    if threading.current_thread() is not threading.main_thread():      # only the main thread sets handlers
        yield
        return
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
