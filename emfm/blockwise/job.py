"""The job of a blockwise command: what each block task receives, and what a process loads for it once.

A job holds the command's settings resolved and checked: small, frozen and picklable, so Dask workers
receive it with each task, and the fingerprint of its store is made of it
(:func:`~emfm.blockwise.store.fingerprint`). A process keeps the model of the one job it serves:
the workers of a running scheduler (``executor.address``) serve one run after another, with other
settings or a retrained ``last.ckpt``, which the job's stamp of the checkpoint files tells apart.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, cast

import torch
from typing_extensions import TypeVar

from emfm.blockwise.grid import BlockGrid
from emfm.checkpoints import checkpoint_stamp, unchanged_checkpoint
from emfm.data.ngff import ZarrFormat, check_zarr_format
from emfm.data.volume import Volume
from emfm.errors import EmfmError
from emfm.inference import inference_precision
from emfm.paths import local_output, resolved
from emfm.requests import Request

J = TypeVar("J", bound="BlockJob[str | None]")
T = TypeVar("T")
C = TypeVar("C", bound=str | None, covariant=True, default=str)    # the model's checkpoint; None: a job without one


@dataclass(frozen=True)
class BlockRequest(Request, Generic[C]):
    """What a blockwise command is asked: the keys all of them share (``BlockRequest[str | None]``: a command that
    can compute without a model, such as ``emfm features source=filters``)."""

    checkpoint: C
    input: str
    output: str
    level: int = 0                # multiscale level of the input
    roi: Any = None               # [z0:z1,y0:y1,x0:x1]; None = the whole volume
    block_shape: Any = None       # output cells per block (= chunk); None = 4 tiles per axis
    overlap: float = 0.25         # tile overlap; overlapping tiles are blended
    blend: str = "linear"         # linear | gaussian
    batch_size: int = 8           # tiles per forward pass
    precision: str = "auto"       # auto | 32 | bf16 (emfm.inference.inference_precision)
    zarr_format: int = 3          # 3: zarr v3 / OME-Zarr 0.5; 2: zarr v2 / OME-Zarr 0.4
    threads: int | None = None    # torch threads of a local run
    missing_chunks: str = "warn"  # chunks absent from the input: warn | error | fill (emfm.data.volume)
    overwrite: bool = False       # replace an output of other settings
    progress: bool = True


@dataclass(frozen=True, kw_only=True)
class BlockJob(Generic[C]):
    """Everything a block task needs; a command's job adds its own settings (``BlockJob[None]``: a job computing
    without a model)."""

    checkpoint: C
    checkpoint_stamp: tuple[tuple[int, int], ...]     # its files' (mtime, size) as the run starts; () without one
    input: str
    output: str
    level: int
    roi: tuple[tuple[int, int], ...]      # (start, stop) per axis of the input volume
    tile: tuple[int, ...]                 # the model's tile over the region's axes (1 in z: a 2-D model)
    block: tuple[int, ...]                # one chunk of the output, in its cells
    overlap: float
    blend: str
    batch_size: int
    precision: str = "32"                 # of the forward passes: 32 | bf16 (auto resolved where the run starts)
    zarr_format: ZarrFormat = 3           # 3: zarr v3 / OME-Zarr 0.5; 2: zarr v2 / OME-Zarr 0.4
    threads: int | None = None            # torch threads per task process (Dask workers); None: torch's default
    missing_chunks: str = "warn"          # what reading a chunk absent from the input does (emfm.data.volume)

    @classmethod
    def of(cls: type[J], request: BlockRequest[str | None], volume: Volume, region: tuple[slice, ...],
           threads: int | None, **own: Any) -> J:
        """The job of ``request`` over ``region`` of ``volume``; ``own``: the fields the command's job adds."""
        if request.batch_size < 1:
            raise EmfmError(f"batch_size={request.batch_size}: expected at least 1 tile per forward pass")
        model = request.checkpoint
        return cls(checkpoint=str(Path(model).resolve()) if model else None,
                   checkpoint_stamp=checkpoint_stamp(model) if model else (), input=resolved(volume.path),
                   output=str(local_output("output", request.output)), level=volume.level,
                   roi=tuple((r.start, r.stop) for r in region), overlap=float(request.overlap),
                   blend=str(request.blend), batch_size=int(request.batch_size),
                   precision=inference_precision(request.precision) if model else "32",
                   zarr_format=check_zarr_format(request.zarr_format), threads=threads,
                   missing_chunks=volume.missing_chunks, **own)

    @property
    def shape(self) -> tuple[int, ...]:
        """The region's shape in voxels."""
        return tuple(b - a for a, b in self.roi)

    @property
    def grid(self) -> BlockGrid:
        """The output's blocks (here one output cell per voxel)."""
        return BlockGrid(self.shape, self.block)

    def volume(self) -> Volume:
        """The input, opened once per process."""
        return input_volume(self.input, self.level, self.missing_chunks)


@functools.lru_cache(maxsize=1)
def input_volume(path: str, level: int, missing_chunks: str) -> Volume:
    """A volume opened once per process (its metadata and stored normalisation are read once); a run clears it,
    as the input may have been rewritten since the previous one."""
    return Volume(path, level, missing_chunks)


_LOADED: dict[BlockJob, Any] = {}     # the one job this process serves, and what it loaded for it


def cached(job: BlockJob, load: Callable[[str], T], loaded: T | None = None) -> T:
    """What ``load`` makes of the job's checkpoint, once per process and job (one model per Dask worker), on
    ``job.threads`` torch threads.

    The checkpoint is loaded only if it is as the run started (a retrained ``last.ckpt`` is refused); ``loaded``:
    made already in this process from that checkpoint, kept instead of loading it again.
    """
    if loaded is not None or job not in _LOADED:
        if job.threads:
            torch.set_num_threads(job.threads)
        _LOADED.clear()
        _LOADED[job] = loaded if loaded is not None else load(unchanged_checkpoint(job.checkpoint,
                                                                                    job.checkpoint_stamp))
    return cast(T, _LOADED[job])
