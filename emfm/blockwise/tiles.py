"""Tiles that straddle block borders, computed once for all the blocks they touch (``emfm predict``, and the dense
features of ``emfm features`` and ``emfm cluster``).

Each block blends the tiles of the region's grid that touch it (:func:`~emfm.inference.covering_tiles`), so a tile
across a block border is needed by every block it touches. Tiles are grouped by their footprint, the blocks they
touch: a block computes the group it has alone; a group it shares is computed by the first of its blocks to need it,
which keeps the raw outputs in the store's work group (``_work/tiles``) for the others, and the last of its blocks to
finish deletes it. A group is always computed alone, in the same batches, so its outputs are the same bits whichever
block, worker or rerun computes them: two Dask workers that compute one group at once write the same file (each
whole, by a rename), and a run resumed after a kill equals an uninterrupted one. A local run computes every tile once
and keeps about one layer of block borders on disk (blocks run in raster order).
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from emfm.blockwise.grid import Block, BlockGrid
from emfm.blockwise.store import WORK, Progress
from emfm.errors import EmfmError
from emfm.inference import Corner, Model, batched

Footprint = tuple[tuple[int, int], ...]      # the first and last block a tile touches, per axis


@dataclass(frozen=True)
class SharedTiles:
    """The tiles of one block's window, which starts at voxel ``origin`` of the region; groups shared with other
    blocks are kept in ``folder``. The output's ``grid`` is in its cells, ``stride`` voxels each (dense features;
    None: one voxel)."""

    folder: Path
    grid: BlockGrid
    tile: tuple[int, ...]
    origin: tuple[int, ...]
    stride: tuple[int, ...] | None = None

    def run(self, model: Model, image: torch.Tensor, corners: Sequence[Corner], patch: tuple[int, ...],
            batch_size: int) -> Iterator[tuple[Corner, torch.Tensor]]:
        """A :data:`~emfm.inference.TileRunner`: each group of ``corners`` computed alone, or read where another
        block computed it."""
        for footprint, group in self.groups(corners).items():
            if not shared(footprint):
                yield from batched(model, image, group, patch, batch_size)
                continue
            path = self.path(footprint)
            try:
                outputs = torch.from_numpy(np.load(path))
            except FileNotFoundError:
                outputs = torch.stack([out for _, out in batched(model, image, group, patch, batch_size)])
                save(path, outputs.numpy())
            yield from zip(group, outputs)

    @classmethod
    def of_block(cls, output: str | Path, grid: BlockGrid, tile: tuple[int, ...], span: Sequence[slice],
                 stride: tuple[int, ...] | None = None) -> SharedTiles:
        """The shared tiles of the block whose window is ``span``, kept in the output store's work folder."""
        return cls(Path(output) / WORK / "tiles", grid, tile, tuple(s.start for s in span), stride)

    def done(self, corners: Sequence[Corner], progress: Progress, index: Block) -> None:
        """Mark the block ``index`` done, then delete the shared groups no block needs any more."""
        progress.mark(index)
        self.release(corners, progress)

    def release(self, corners: Sequence[Corner], progress: Progress) -> None:
        """Delete the shared groups of ``corners`` once all their blocks are done (after this block is marked)."""
        for footprint in self.groups(corners):
            if shared(footprint) and np.all(progress.done[tuple(slice(a, b + 1) for a, b in footprint)]):
                self.path(footprint).unlink(missing_ok=True)

    def groups(self, corners: Sequence[Corner]) -> dict[Footprint, list[Corner]]:
        """``corners`` (window coordinates) by footprint, each group in the order of ``corners``."""
        groups: dict[Footprint, list[Corner]] = {}
        stride = self.stride or (1,) * len(self.tile)
        for corner in corners:
            footprint = tuple(((o + c) // k // b, (min(o + c + t, n * k) - 1) // k // b) for o, c, t, k, b, n
                              in zip(self.origin, corner, self.tile, stride, self.grid.block, self.grid.shape))
            groups.setdefault(footprint, []).append(corner)
        return groups

    def path(self, footprint: Footprint) -> Path:
        return self.folder / ("_".join(f"{a}-{b}" for a, b in footprint) + ".npy")


def shared(footprint: Footprint) -> bool:
    """Whether tiles of ``footprint`` touch more than one block."""
    return any(a != b for a, b in footprint)


def save(path: Path, outputs: np.ndarray) -> None:
    """Write ``outputs`` whole or not at all: readers never see half a file; a writer killed meanwhile leaves a
    ``.partial`` file, which :func:`~emfm.blockwise.store.finish` removes."""
    partial, data = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.partial"), io.BytesIO()
    np.save(data, outputs)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(data.getbuffer())       # not numpy's writer, whose errors do not say why
        os.replace(partial, path)
    except OSError as e:
        partial.unlink(missing_ok=True)
        store = path.parents[2]
        raise EmfmError(f"output={store}: cannot write {path.relative_to(store)} ({e.strerror or e}); finished blocks "
                        f"are kept, rerun the same command to continue") from None
