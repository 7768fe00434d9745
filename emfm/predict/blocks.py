"""Blocks of an output volume, the record of which are finished, and the executors that run them.

A blockwise job writes each output block (aligned to the output chunks, so no two blocks share a
chunk file) and then marks it done in a one-chunk-per-block boolean array; zarr's local store
writes every chunk atomically. A rerun skips the marked blocks, so a crash costs at most the
blocks that were in flight, and the result equals an uninterrupted run.
"""

from __future__ import annotations

import itertools
import math
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

from emfm.errors import EmfmError

Block = tuple[int, ...]          # index of a block in the grid
EXECUTORS = ("local", "dask")


@dataclass(frozen=True)
class BlockGrid:
    """A region of ``shape`` cut into blocks of ``block`` (the last ones may be smaller)."""

    shape: tuple[int, ...]
    block: tuple[int, ...]

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(math.ceil(s / b) for s, b in zip(self.shape, self.block))

    def __len__(self) -> int:
        return math.prod(self.grid)

    def __iter__(self) -> Iterator[Block]:
        return itertools.product(*(range(n) for n in self.grid))

    def region(self, index: Block, halo: Sequence[int] | None = None) -> tuple[slice, ...]:
        """The block's slices, grown by ``halo`` per axis and clipped to the region."""
        halo = halo or (0,) * len(self.shape)
        return tuple(slice(max(0, i * b - h), min(s, (i + 1) * b + h))
                     for i, b, s, h in zip(index, self.block, self.shape, halo))


def parse_roi(roi: Any, shape: Sequence[int], key: str = "roi") -> tuple[slice, ...]:
    """``[z0:z1,y0:y1,x0:x1]`` (a list of "start:stop" strings or [start, stop] pairs, or one
    comma-separated string) as slices inside ``shape``; an empty start or stop means the volume's edge."""
    if roi is None:
        return tuple(slice(0, s) for s in shape)
    parts = roi.split(",") if isinstance(roi, str) else list(roi)
    roi = "[" + ",".join(p if isinstance(p, str) else ":".join(map(str, p)) for p in parts) + "]"
    if len(parts) != len(shape):
        raise EmfmError(f"{key}={roi}: {len(parts)} ranges for a volume of {len(shape)} axes {list(shape)}")
    region = []
    for axis, (part, size) in enumerate(zip(parts, shape)):
        try:
            start, stop = (part.split(":") if isinstance(part, str) else part)
            start, stop = int(start or 0), int(stop or size)
        except (TypeError, ValueError):
            raise EmfmError(f"{key}={roi}: range {part!r} of axis {axis} is not start:stop") from None
        if not 0 <= start < stop <= size:
            raise EmfmError(f"{key}={roi}: range {start}:{stop} of axis {axis} is outside the volume (0:{size})")
        region.append(slice(start, stop))
    return tuple(region)


class Progress:
    """Which blocks of a phase are finished: ``group[phase][index]`` is True once the block is written."""

    def __init__(self, group: zarr.Group, phase: str, grid: BlockGrid) -> None:
        if phase in group:
            self.done = group[phase]
        else:
            self.done = group.create_array(phase, shape=grid.grid, chunks=(1,) * len(grid.grid), dtype=bool,
                                           fill_value=False, compressors=None)

    def pending(self, grid: BlockGrid) -> list[Block]:
        finished = np.asarray(self.done[...])
        return [index for index in grid if not finished[index]]

    def mark(self, index: Block) -> None:
        self.done[index] = True


def run_blocks(task: Callable[..., Block], blocks: Sequence[Block], *args: Any, executor: str = "local",
               client: Any = None, desc: str = "blocks", progress: bool = True) -> float:
    """Run ``task(*args, block)`` for every block, locally in order or as Dask tasks; returns the seconds.

    The task writes its block and marks it done itself, so whatever finished survives a crash.
    """
    start = time.perf_counter()
    bar = tqdm(total=len(blocks), desc=desc, unit="block", disable=not progress, smoothing=0.1)
    with bar:
        for _ in _completed(task, blocks, args, executor, client):
            bar.update()
    return time.perf_counter() - start


def _completed(task: Callable[..., Block], blocks: Sequence[Block], args: tuple, executor: str,
               client: Any) -> Iterable[Block]:
    if executor == "local":
        return (task(*args, block) for block in blocks)
    if executor == "dask":
        from dask.distributed import as_completed

        shared = [client.scatter(a, broadcast=True) if isinstance(a, np.ndarray) else a for a in args]
        run = uuid.uuid4().hex[:8]      # keys unique to this run on a long-lived scheduler
        futures = [client.submit(task, *shared, block, pure=False, key=f"{task.__name__}-{run}-{'-'.join(map(str, block))}")
                   for block in blocks]
        return (future.result() for future in as_completed(futures))
    raise EmfmError(f"executor={executor}: expected one of {', '.join(EXECUTORS)}")


@contextmanager
def executor_client(cfg: Any) -> Iterator[Any]:
    """The Dask client of ``cfg.executor=dask`` (None for local); afterwards a LocalCluster started here
    is closed, and this process is left as it was: torch's thread count (tasks may set it) and the
    environment, into which Dask's nanny writes ``OMP_NUM_THREADS=1`` & co. for the workers it starts
    (later subprocesses of this process would otherwise run torch on one thread, and compute other bits)."""
    threads, environ = torch.get_num_threads(), dict(os.environ)
    client = dask_client(cfg.dask.address, cfg.dask.n_workers, cfg.dask.threads_per_worker) \
        if cfg.executor == "dask" else None
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
    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                           dashboard_address=None)
    return Client(cluster)
