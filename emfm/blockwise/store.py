"""The output stores of blockwise commands (``emfm predict``, ``emfm features``, ``emfm cluster``).

A store is an OME-Zarr group whose ``emfm`` attributes say what it holds (``kind``), the fingerprint
of the job that writes it (settings and checkpoint digest) and whether it is ``complete``. While a
job runs, ``_progress`` records the finished blocks (one chunk per block; zarr's local store writes
every chunk atomically), so a rerun of the same job continues it and a store of another job is
never mixed into. ``finish`` marks the store complete last, so an unfinished store never looks
complete.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from emfm.blockwise.grid import Block, BlockGrid
from emfm.blockwise.job import BlockJob
from emfm.checkpoints import checkpoint_digest
from emfm.data import ngff
from emfm.data.ngff import Level, ZarrFormat, pyramid_plan, read_attrs
from emfm.data.volume import Volume
from emfm.errors import EmfmError
from emfm.paths import refuse_foreign, refuse_overlap, remove

PROGRESS, WORK = "_progress", "_work"    # removed when the store is complete
DTYPES = ("uint8", "float32", "float16")  # how probabilities are stored (uint8: 255 = probability 1)


def fingerprint(job: BlockJob[str | None], leave_out: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    """What makes two stores the same, as stored in their attributes: the settings of ``job``, without where it
    is written and ``leave_out`` (how fast), with the checkpoint's digest in place of its files'
    ``checkpoint_stamp`` (a copy is the same checkpoint; None without one) and ``extra``."""
    settings = {k: v for k, v in asdict(job).items() if k not in ("output", "checkpoint_stamp", *leave_out)}
    digest = checkpoint_digest(job.checkpoint) if job.checkpoint else None
    return json.loads(json.dumps({**settings, "checkpoint_sha256": digest, **extra}))


def add_attrs(group: zarr.Group, **attrs: Any) -> None:
    """Merge ``attrs`` into the ``emfm`` attributes of ``group``, keeping what other steps wrote there."""
    emfm = group.attrs.get("emfm")
    group.attrs["emfm"] = {**(emfm if isinstance(emfm, dict) else {}), **attrs}


def claim(output: str | Path, key: str, stamp: Mapping[str, Any], overwrite: bool, *,
          inputs: Mapping[str, str | Path | None], describe: str, replace_same: bool = False) -> bool | None:
    """Make ``output`` ready for the job of fingerprint ``stamp`` (stored under attribute ``key``).

    Returns whether an existing store of this job is complete (it is continued or reused as it is),
    or ``None`` once the path is free for :func:`create`. A store of another job of this command
    (its attributes hold ``key``, finished or not) is replaced only with ``overwrite`` (``replace_same``:
    also one of this job); anything else, and one of ``inputs``, never. ``describe`` names the kind of
    store in messages ("prediction").
    """
    refuse_overlap("output", output, inputs)
    out = Path(output)
    previous = read_attrs(out)
    if not refuse_foreign("output", out, describe, lambda _: key in previous):
        return None
    laid_out = bool(previous.get("complete")) or (out / PROGRESS).is_dir()
    if previous[key] == stamp and laid_out and not (overwrite and replace_same):
        return bool(previous.get("complete"))
    if previous[key] == stamp and not laid_out:       # interrupted while its arrays were being made: no result yet
        remove(out)
        return None
    if not overwrite:
        raise EmfmError(f"output={out} already holds a different, "
                        f"{'complete' if previous.get('complete') else 'unfinished'} {describe}; choose another "
                        f"output or set overwrite=true")
    remove(out)
    return None


def create(output: str | Path, attrs: Mapping[str, Any], describe: str, layout: Callable[[zarr.Group], None],
           zarr_format: ZarrFormat = 3) -> None:
    """A new store at ``output`` (zarr v3 or v2) with ``attrs``, the arrays ``layout`` makes, and an empty progress
    record, made last: a store interrupted before it holds no result, and :func:`claim` starts it afresh. The
    attributes (emfm's marker) are written with the group, so even a store interrupted then is recognised as emfm's."""
    try:
        root = zarr.open_group(str(output), mode="w-", zarr_format=zarr_format, attributes=dict(attrs))
        layout(root)
        root.create_group(PROGRESS)
    except OSError as e:
        raise EmfmError(f"output={output}: cannot create the {describe} ({e.strerror or e})") from None


def placement(volume: Volume, shape: tuple[int, ...], start: Sequence[int], levels: int | None = 1,
              stride: Sequence[int] | None = None) -> tuple[list[Level], list[float]]:
    """(levels, origin) of an output of ``shape`` on the input's physical grid: cells of ``stride`` voxels from the
    input voxel ``start``, each centred on its voxels; ``levels``: how many pyramid levels (None: as ingest)."""
    vs = volume.voxel_size or (1.0,) * volume.ndim
    stride = stride or (1,) * volume.ndim
    origin = [(a + (k - 1) / 2) * v for a, k, v in zip(start, stride, vs)]
    return pyramid_plan(shape, [k * v for k, v in zip(stride, vs)], levels), origin


def create_array(group: zarr.Group, name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str,
                 axes: str) -> zarr.Array:
    """A new array of the store (:func:`emfm.data.ngff.create_array`); a disk that refuses it is named."""
    try:
        return ngff.create_array(group, name, shape, chunks, dtype, axes)
    except OSError as e:
        raise EmfmError(f"output={group.store}: cannot create {name} ({e.strerror or e})") from None


def write(output: str, path: str, key: tuple[slice, ...], data: np.ndarray) -> None:
    """Write into an array of the store; a full or read-only disk is named, finished blocks stay valid."""
    try:
        zarr.open_array(f"{output}/{path}", mode="r+")[key] = data
    except OSError as e:
        region = ", ".join(":" if s == slice(None) else f"{s.start}:{s.stop}" for s in key)
        raise EmfmError(f"output={output}: cannot write {path}[{region}] ({e.strerror or e}); finished blocks "
                        f"are kept, rerun the same command to continue") from None


class Progress:
    """Which blocks of a phase are finished: ``_progress/<phase>[index]`` is True once the block is written."""

    def __init__(self, output: str, phase: str, grid: BlockGrid) -> None:
        group = zarr.open_group(f"{output}/{PROGRESS}", mode="a")
        self.done = group.require_array(phase, shape=grid.grid, chunks=(1,) * len(grid.grid), dtype=bool,
                                        fill_value=False, compressors=None)
        self.grid = grid

    def pending(self) -> list[Block]:
        finished = np.asarray(self.done[...])
        return [index for index in self.grid if not finished[index]]

    def mark(self, index: Block) -> None:
        self.done[index] = True


def finish(output: str, **attrs: Any) -> None:
    """Mark the store complete (with ``attrs``) and drop the bookkeeping: done last, so an incomplete store never
    looks complete. A writer killed mid-chunk leaves zarr's ``<chunk>.<id>.partial`` file; it goes too."""
    add_attrs(zarr.open_group(output, mode="r+"), **attrs, complete=True)
    for name in (PROGRESS, WORK):
        shutil.rmtree(Path(output) / name, ignore_errors=True)
    for leftover in Path(output).rglob("*.partial"):
        leftover.unlink(missing_ok=True)


def encode(probs: np.ndarray, dtype: str) -> np.ndarray:
    """Probabilities as stored: uint8 with 255 = probability 1 (what every viewer shows), or floats as they are."""
    if dtype == "uint8":
        return np.rint(np.clip(probs, 0, 1) * 255).astype(np.uint8)
    return probs.astype(dtype)


def decode(data: np.ndarray) -> np.ndarray:
    """Stored probabilities as float32."""
    return data.astype(np.float32) / 255 if data.dtype == np.uint8 else data.astype(np.float32)
