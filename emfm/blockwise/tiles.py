"""Each tile of the region's grid computed once, in full batches, whichever blocks need it (``emfm predict``, and the
dense features of ``emfm features`` and ``emfm cluster``).

Each block blends the tiles of the region's grid that touch it (:func:`~emfm.inference.covering_tiles`), so a tile
across a block border is needed by every block it touches. The region's tiles are numbered in one order, by the first
block each touches (blocks in raster order) and then by corner (:class:`TileOrder`), and every forward pass is a batch
of ``batch_size`` consecutive tiles of that order: the whole grid takes as many passes as one sliding window over the
whole region, not one short batch more per block. A batch is computed by the first block to need it, which keeps the
outputs in the store's work group (``_work/tiles``) when its tiles touch other blocks (reading the input of tiles
outside its own window), and the last of those blocks to finish deletes it. A batch is always the same tiles, so its
outputs are the same bits whichever block, worker or rerun computes them: two Dask workers that compute one batch at
once write the same file (each whole, by a rename), and a run resumed after a kill equals an uninterrupted one. A local
run computes every tile once and keeps about one layer of block borders on disk (blocks run in raster order).
"""

from __future__ import annotations

import bisect
import io
import math
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from emfm.blockwise.grid import Block, BlockGrid
from emfm.blockwise.store import WORK, Progress
from emfm.errors import EmfmError
from emfm.inference import Corner, Model, pad_to, tile_starts, window

Footprint = tuple[tuple[int, int], ...]      # the first and last block a tile touches, per axis
Reader = Callable[[tuple[slice, ...]], torch.Tensor]     # region voxels -> the model's input there, (C, *span)


@dataclass(frozen=True)
class TileOrder:
    """The tiles of a region's grid (``tile``, starts by :func:`~emfm.inference.tile_starts`) numbered by the first
    block each touches, blocks in raster order, then by corner in raster order. The tiles whose first block is one
    block are a product of one run of starts per axis, so a tile's number and a number's tile are computed per axis,
    without listing the grid."""

    size: tuple[int, ...]                     # the region, in voxels
    tile: tuple[int, ...]
    stride: tuple[int, ...]                   # voxels per output cell
    grid: BlockGrid                           # the output's blocks, in cells
    starts: tuple[tuple[int, ...], ...]       # tile starts per axis
    homes: tuple[tuple[int, ...], ...]        # per axis, the block in which each start's tile begins

    @classmethod
    def of(cls, size: Sequence[int], tile: Sequence[int], overlap: float, grid: BlockGrid,
           stride: Sequence[int] | None = None) -> TileOrder:
        stride = tuple(stride or (1,) * len(size))
        starts = tuple(tuple(tile_starts(n, t, overlap, k)) for n, t, k in zip(size, tile, stride))
        homes = tuple(tuple(s // k // b for s in ss) for ss, k, b in zip(starts, stride, grid.block))
        return cls(tuple(size), tuple(tile), stride, grid, starts, homes)

    def __len__(self) -> int:
        return math.prod(map(len, self.starts))

    def run(self, axis: int, home: int) -> tuple[int, int]:
        """The starts of ``axis`` whose tiles begin in block ``home`` along it: [first, last + 1)."""
        return bisect.bisect_left(self.homes[axis], home), bisect.bisect_right(self.homes[axis], home)

    def number(self, corner: Corner) -> int:
        """The tile's place in the order."""
        before, inner, counts = 0, 0, 1          # tiles in earlier blocks; place among its block's; their count
        for axis, c in enumerate(corner):
            i = bisect.bisect_left(self.starts[axis], c)
            lo, hi = self.run(axis, self.homes[axis][i])
            before += counts * lo * math.prod(map(len, self.starts[axis + 1:]))
            inner, counts = inner * (hi - lo) + i - lo, counts * (hi - lo)
        return before + inner

    def corner(self, number: int) -> Corner:
        """The tile at ``number`` in the order."""
        runs, counts = [], 1
        for axis in range(len(self.starts)):
            later = math.prod(map(len, self.starts[axis + 1:]))
            lo, hi = self.run(axis, self.homes[axis][number // (counts * later)])
            number -= counts * lo * later
            runs.append((lo, hi))
            counts *= hi - lo
        places = np.unravel_index(number, [hi - lo for lo, hi in runs])
        return tuple(self.starts[axis][lo + int(p)] for axis, ((lo, _), p) in enumerate(zip(runs, places)))

    def footprint(self, corner: Corner) -> Footprint:
        """The first and last block the tile at ``corner`` touches, per axis."""
        return tuple((c // k // b, (min(c + t, n * k) - 1) // k // b) for c, t, k, b, n
                     in zip(corner, self.tile, self.stride, self.grid.block, self.grid.shape))


@dataclass(frozen=True)
class SharedTiles:
    """The tiles of block ``index``, whose window starts at voxel ``origin`` of the region, in the batches of
    ``order``; batches shared with other blocks are kept in ``folder``. ``read``: the model's input over a span of
    the region, for tiles outside the window."""

    folder: Path
    order: TileOrder
    index: Block
    origin: tuple[int, ...]
    read: Reader
    known: dict[tuple[int, int], list[Corner]] = field(default_factory=dict, repr=False, compare=False)  # by members()

    @classmethod
    def of_block(cls, output: str | Path, order: TileOrder, index: Block, span: Sequence[slice],
                 read: Reader) -> SharedTiles:
        """The shared tiles of block ``index`` whose window is ``span``, kept in the output store's work folder."""
        return cls(Path(output) / WORK / "tiles", order, index, tuple(s.start for s in span), read)

    def run(self, model: Model, image: torch.Tensor, corners: Sequence[Corner], patch: tuple[int, ...],
            batch_size: int) -> Iterator[tuple[Corner, torch.Tensor]]:
        """A :data:`~emfm.inference.TileRunner` (``image``: the block's window): the batches holding ``corners``,
        each computed whole or read where another block computed it, in the order's sequence."""
        for batch, wanted in self.batches(corners, batch_size).items():
            members = self.members(batch, batch_size)
            path = self.path(batch, batch_size)
            try:
                outputs = torch.from_numpy(np.load(path))
            except FileNotFoundError:
                outputs = model(self.inputs(image, members, patch)).float()
                if any(self.blocks(c) != {self.index} for c in members):
                    save(path, outputs.numpy())
            places = {c: i for i, c in enumerate(members)}
            for corner in wanted:
                yield corner, outputs[places[self.absolute(corner)]]

    def done(self, corners: Sequence[Corner], progress: Progress, batch_size: int) -> None:
        """Mark this block done, then delete the kept batches no block needs any more."""
        progress.mark(self.index)
        needed = {batch: set().union(*map(self.blocks, self.members(batch, batch_size)))
                  for batch in self.batches(corners, batch_size)}
        touched = set().union(*needed.values())
        first = np.min(list(touched), axis=0)                  # the done flags of every block touched, read at once
        done = np.asarray(progress.done[tuple(slice(a, b + 1) for a, b in zip(first, np.max(list(touched), axis=0)))])
        for batch, blocks in needed.items():
            if all(done[tuple(np.subtract(b, first))] for b in blocks):
                self.path(batch, batch_size).unlink(missing_ok=True)

    def batches(self, corners: Sequence[Corner], batch_size: int) -> dict[int, list[Corner]]:
        """``corners`` (window coordinates) by the batch holding them, batches in order."""
        batches: dict[int, list[Corner]] = {}
        for corner in corners:
            batches.setdefault(self.order.number(self.absolute(corner)) // batch_size, []).append(corner)
        return dict(sorted(batches.items()))

    def members(self, batch: int, batch_size: int) -> list[Corner]:
        """The corners (region coordinates) of the tiles of ``batch`` (worked out once a block: run and done ask)."""
        if (batch, batch_size) not in self.known:
            self.known[batch, batch_size] = [self.order.corner(n) for n in
                                             range(batch * batch_size, min((batch + 1) * batch_size, len(self.order)))]
        return self.known[batch, batch_size]

    def inputs(self, image: torch.Tensor, members: Sequence[Corner], patch: tuple[int, ...]) -> torch.Tensor:
        """The batch's tiles, from the window where they lie in it, else read in one box around those outside."""
        inside = [all(0 <= c - o and c - o + p <= n for c, o, p, n in zip(corner, self.origin, patch, image.shape[1:]))
                  for corner in members]
        outside = [c for c, i in zip(members, inside) if not i]
        box, box_origin = image, self.origin
        if outside:            # the box around them, clipped to the region (and padded as the sliding window pads)
            span = tuple(slice(min(c), min(max(c) + p, n)) for c, p, n in zip(zip(*outside), patch, self.order.size))
            box, box_origin = pad_to(self.read(span), patch), tuple(s.start for s in span)
        return torch.stack([window(image, c, patch, self.origin) if i else window(box, c, patch, box_origin)
                            for c, i in zip(members, inside)])

    def blocks(self, corner: Corner) -> set[Block]:
        """The blocks the tile at ``corner`` (region coordinates) touches."""
        footprint = self.order.footprint(corner)
        return {tuple(a + i for (a, _), i in zip(footprint, offset))
                for offset in np.ndindex(*(b - a + 1 for a, b in footprint))}

    def absolute(self, corner: Corner) -> Corner:
        return tuple(o + c for o, c in zip(self.origin, corner))

    def path(self, batch: int, batch_size: int) -> Path:
        """Named by the batch size too: a run continued with another ``batch_size`` (not part of the store's
        settings) makes other batches, and must not read the first run's."""
        return self.folder / f"b{batch_size}-{batch}.npy"


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
