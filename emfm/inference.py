"""Sliding-window prediction of a whole slice or block with overlapping, blended tiles.

A model sees ``patch_shape`` tiles; larger inputs are covered by tiles that overlap by a
fraction and are averaged with weights that fall off towards each tile's border, so tile edges
(where the model sees the least context) leave no seams.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch


def tile_starts(size: int, tile: int, overlap: float) -> list[int]:
    """Start offsets covering ``size`` with tiles of ``tile`` overlapping by about ``overlap``; the last ends at ``size``."""
    if tile >= size:
        return [0]
    step = max(1, round(tile * (1 - overlap)))
    starts = list(range(0, size - tile, step))
    return starts + [size - tile]


def blend_weights(tile: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Separable linear ramp, highest in the tile centre, never zero (edge tiles cover the border alone)."""
    weight = torch.ones((), device=device)
    for size in tile:
        ramp = torch.minimum(torch.arange(size, device=device) + 1, torch.arange(size, 0, -1, device=device))
        weight = weight[..., None] * (ramp.float() / ramp.max())
    return weight


@torch.no_grad()
def sliding_window(
    model: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    patch_shape: Sequence[int],
    overlap: float = 0.25,
    batch_size: int = 8,
) -> torch.Tensor:
    """``model`` output over the whole of ``image`` (C, *spatial), blended from overlapping tiles.

    Inputs smaller than the patch along an axis are reflect-padded to it and cropped back.
    Returns (K, *spatial) on the image's device, float32.
    """
    spatial, patch = tuple(image.shape[1:]), tuple(int(p) for p in patch_shape)
    pad = [max(0, p - s) for p, s in zip(patch, spatial)]
    if any(pad):
        mode = "reflect" if all(p < s for p, s in zip(pad, spatial)) else "replicate"
        flat = [v for p in reversed(pad) for v in (0, p)]
        image = torch.nn.functional.pad(image[None], flat, mode=mode)[0]
    size = tuple(image.shape[1:])
    corners = list(itertools.product(*(tile_starts(s, p, overlap) for s, p in zip(size, patch))))
    weight = blend_weights(patch, image.device)
    total = norm = None
    for first in range(0, len(corners), batch_size):
        chunk = corners[first : first + batch_size]
        regions = [tuple(slice(c, c + p) for c, p in zip(corner, patch)) for corner in chunk]
        out = model(torch.stack([image[(slice(None), *r)] for r in regions])).float()
        if total is None:
            total = torch.zeros(out.shape[1], *size, device=image.device)
            norm = torch.zeros(size, device=image.device)
        for region, tile in zip(regions, out):
            total[(slice(None), *region)] += tile * weight
            norm[region] += weight
    result = total / norm
    return result[(slice(None), *(slice(0, s) for s in spatial))]
