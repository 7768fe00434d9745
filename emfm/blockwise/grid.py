"""The blocks of an output volume, and the region of interest they cover."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from emfm.errors import EmfmError

Block = tuple[int, ...]          # index of a block in the grid


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
        if start >= stop:
            raise EmfmError(f"{key}={roi}: range {start}:{stop} of axis {axis} is "
                            f"{'reversed' if start > stop else 'empty'}; expected start:stop with start < stop")
        if not 0 <= start < stop <= size:
            raise EmfmError(f"{key}={roi}: range {start}:{stop} of axis {axis} is outside the volume (0:{size})")
        region.append(slice(start, stop))
    return tuple(region)
