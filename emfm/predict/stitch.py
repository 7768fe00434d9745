"""Instances over a blockwise prediction, with no object cut at a block border (two passes).

1. Seeds: in every block, the connected components of the object interior (e.g. pixels with a
   membrane probability below the threshold) get ids unique to the block. Where two seeds touch
   across a block face they are the same component; a union-find over those face contacts gives
   every component one global id, exactly as labelling the whole volume at once would.
2. Growth: every block, read with a halo, floods its seeds (now global ids) over the probability
   map with a watershed and keeps its own part. An object crossing a border carries the same id on
   both sides.

Both passes are those of :func:`emfm.instances.from_probabilities` (its ``maps`` and ``grow``), the
cells ``emfm evaluate`` scores: the same cells wherever a flood stays within ``instance_halo`` voxels
of its block (membranes thinner than the halo); a wider region without interior may be cut
otherwise than over the whole volume at once.

A 2-D model's objects are per z-slice (no contact across slices), a 3-D model's are 3-D.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import zarr
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from emfm.blockwise.executor import run_blocks
from emfm.blockwise.grid import Block, BlockGrid
from emfm.blockwise.store import WORK, Progress, decode, write
from emfm.errors import EmfmError
from emfm.instances import KINDS, grow, maps


@dataclass(frozen=True)
class Settings:
    """How instances are made from the probabilities of a ``kind`` target."""

    kind: str
    threshold: float     # probability threshold of the object interior
    halo: int            # voxels of context read around each block when growing seeds

    def stamp(self) -> dict[str, Any]:
        return asdict(self)


def settings(kind: str, threshold: float, halo: int) -> Settings:
    """The instance settings for a checkpoint's target ``kind``, checked."""
    if kind not in KINDS:
        raise EmfmError(f"instances=true: a {kind!r} target has no instances; needs one of {', '.join(KINDS)}")
    if int(halo) < 0:
        raise EmfmError(f"instance_halo={halo}: expected a number of voxels >= 0")
    return Settings(kind, float(threshold), int(halo))


@dataclass(frozen=True)
class InstanceJob:
    """What a stitching task needs (small and picklable): the prediction store, its blocks and the settings."""

    output: str
    grid: BlockGrid
    per_slice: bool           # a 2-D model over a 3-D volume: objects live in single z-slices
    settings: Settings

    @property
    def block(self) -> tuple[int, ...]:
        return self.grid.block


def structure(job: InstanceJob) -> np.ndarray:
    """Face connectivity; none across z-slices for a 2-D model."""
    faces = ndimage.generate_binary_structure(len(job.grid.shape), 1)
    if job.per_slice:
        faces[0], faces[2] = False, False
    return faces


def seeds_block(job: InstanceJob, index: Block) -> Block:
    """Label the interior components of one block with ids no other block uses."""
    region = job.grid.region(index)
    probs = decode(np.asarray(zarr_array(job, "0")[(slice(None), *region)]))
    interior = maps(probs, job.settings.kind, job.settings.threshold)[0]
    labels, _ = ndimage.label(interior, structure(job))
    offset = np.uint64(int(np.ravel_multi_index(index, job.grid.grid)) * int(np.prod(job.block)))
    seeds = np.where(labels > 0, labels.astype(np.uint64) + offset, np.uint64(0))
    write(job.output, f"{WORK}/seeds", region, seeds)
    Progress(job.output, "seeds", job.grid).mark(index)
    return index


def merge_table(job: InstanceJob) -> tuple[np.ndarray, np.ndarray]:
    """(ids, roots): for every seed touching another block's seed, the id of its merged component."""
    seeds = zarr_array(job, f"{WORK}/seeds")
    first, second = [], []
    for axis, b in enumerate(job.block):
        if job.per_slice and axis == 0:
            continue
        for index in job.grid:
            if index[axis] == 0:
                continue
            region = list(job.grid.region(index))
            face = index[axis] * b
            region[axis] = slice(face - 1, face + 1)
            below, above = np.asarray(seeds[tuple(region)]).swapaxes(0, axis)
            touching = (below > 0) & (above > 0)
            first.append(below[touching])
            second.append(above[touching])
    pairs = (np.concatenate(first), np.concatenate(second)) if first else (np.zeros(0, np.uint64),) * 2
    ids, inverse = np.unique(np.concatenate(pairs), return_inverse=True)
    if not len(ids):
        return ids, ids
    edges = inverse.reshape(2, -1)
    graph = coo_matrix((np.ones(edges.shape[1]), (edges[0], edges[1])), shape=(len(ids),) * 2)
    _, component = connected_components(graph, directed=False)
    roots = np.full(component.max() + 1, np.iinfo(np.uint64).max, dtype=np.uint64)
    np.minimum.at(roots, component, ids)                   # each component is named by its smallest id
    return ids, roots[component]


def relabel(seeds: np.ndarray, ids: np.ndarray, roots: np.ndarray) -> np.ndarray:
    if not len(ids):
        return seeds
    at = np.clip(np.searchsorted(ids, seeds), 0, len(ids) - 1)
    return np.where(ids[at] == seeds, roots[at], seeds)


def grow_block(job: InstanceJob, ids: np.ndarray, roots: np.ndarray, index: Block) -> Block:
    """Flood the block's (global) seeds over the relief, read with a halo, and write the block's part."""
    halo = [0 if job.per_slice and axis == 0 else job.settings.halo for axis in range(len(job.block))]
    region, outer = job.grid.region(index), job.grid.region(index, halo)
    probs = decode(np.asarray(zarr_array(job, "0")[(slice(None), *outer)]))
    _, relief, mask = maps(probs, job.settings.kind, job.settings.threshold)
    seeds = relabel(np.asarray(zarr_array(job, f"{WORK}/seeds")[outer]), ids, roots)
    if job.per_slice:
        grown = np.stack([grow(relief[z], seeds[z], None if mask is None else mask[z]) for z in range(len(relief))])
    else:
        grown = grow(relief, seeds, mask)
    inner = tuple(slice(r.start - o.start, r.stop - o.start) for r, o in zip(region, outer))
    write(job.output, "labels/instances/0", region, grown[inner].astype(np.uint64))
    Progress(job.output, "instances", job.grid).mark(index)
    return index


def zarr_array(job: InstanceJob, path: str) -> Any:
    return zarr.open_array(f"{job.output}/{path}", mode="r")


def instances(job: InstanceJob, client: Any, progress: bool) -> dict[str, float]:
    """Both passes over the finished probability map (here, or on the Dask ``client``); returns seconds per pass."""
    seconds = {}
    pending = Progress(job.output, "seeds", job.grid).pending()
    seconds["seeds"] = run_blocks(seeds_block, pending, job, client=client, desc="seeds", progress=progress)
    ids, roots = merge_table(job)
    pending = Progress(job.output, "instances", job.grid).pending()
    seconds["instances"] = run_blocks(grow_block, pending, job, ids, roots, client=client, desc="instances",
                                      progress=progress)
    return seconds
