"""Sliding-window prediction of a whole slice or block with overlapping, blended tiles.

A model sees ``patch_shape`` tiles; larger inputs are covered by tiles that overlap by a
fraction and are averaged with weights that fall off towards each tile's border, so tile edges
(where the model sees the least context) leave no seams.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from emfm.errors import EmfmError

BLENDS = ("linear", "gaussian")
PRECISIONS = ("auto", "32", "bf16")
Corner = tuple[int, ...]                                # a tile's start, per spatial axis
Model = Callable[[torch.Tensor], torch.Tensor]          # tiles (B, C, *patch) -> outputs (B, K, *patch / stride)
# (model, image, corners, patch, batch_size) -> each corner's tile output, (K, *patch / stride)
TileRunner = Callable[[Model, torch.Tensor, Sequence[Corner], tuple[int, ...], int],
                      Iterable[tuple[Corner, torch.Tensor]]]


def inference_precision(setting: object) -> str:
    """``auto``, ``32`` or ``bf16`` resolved: ``auto`` is ``bf16`` where the CPU multiplies bfloat16 matrices in
    hardware (AMX tiles: a forward pass of emfm's networks 1.5-1.9x faster; docs/benchmarks.md, "bf16 on a CPU with
    AMX"), else ``32``."""
    precision = str(setting)
    if precision not in PRECISIONS:
        raise EmfmError(f"precision={setting}: expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if torch.cpu._is_amx_tile_supported() else "32"
    return precision


def in_precision(model: Model, precision: str) -> Model:
    """``model`` run under bfloat16 autocast (``precision`` resolving to ``bf16``: matrix products and convolutions
    in bf16, reductions in float32) or as it is (``32``)."""
    if inference_precision(precision) == "32":
        return model

    def autocast(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return model(x)

    return autocast


def tile_starts(size: int, tile: int, overlap: float, align: int = 1) -> list[int]:
    """Start offsets covering ``size`` with tiles of ``tile`` overlapping by about ``overlap``; the last ends at
    ``size``.

    ``align``: steps are multiples of it (so are all starts when ``size`` and ``tile`` are), which
    keeps tiles on a coarser output grid (dense features at a stride).
    """
    if tile >= size:
        return [0]
    step = max(align, round(tile * (1 - overlap) / align) * align)
    starts = list(range(0, size - tile, step))
    return starts + [size - tile]


def blend_weights(tile: Sequence[int], device: torch.device | str = "cpu", kind: str = "linear") -> torch.Tensor:
    """Separable weights, highest in the tile centre, never zero (edge tiles cover the border alone).

    ``linear``: a ramp to the border; ``gaussian``: sigma of 1/8 of the tile (nnU-Net's choice), the
    whole map floored at 1e-3 of its peak (as nnU-Net and MONAI do; a floor per axis would leave a
    tile's corners at 1e-6 in 2-D and 1e-9 in 3-D).
    """
    if kind not in BLENDS:
        raise EmfmError(f"blend: expected one of {', '.join(BLENDS)}, got {kind!r}")
    weight = torch.ones((), device=device)
    for size in tile:
        if kind == "linear":
            ramp = torch.minimum(torch.arange(size, device=device) + 1, torch.arange(size, 0, -1, device=device))
            axis = ramp.float() / ramp.max()
        else:
            centre, sigma = (size - 1) / 2, max(size / 8, 1e-6)
            axis = torch.exp(-0.5 * ((torch.arange(size, device=device) - centre) / sigma) ** 2)
        weight = weight[..., None] * axis
    return weight if kind == "linear" else weight.clamp(min=1e-3 * float(weight.max()))


def tile_corners(size: Sequence[int], patch: Sequence[int], overlap: float,
                 align: Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """Every tile's start corner over a region of ``size``, in the order the tiles are blended."""
    align = align or (1,) * len(size)
    return list(itertools.product(*(tile_starts(s, p, overlap, a) for s, p, a in zip(size, patch, align))))


def covering_tiles(region: Sequence[slice], size: Sequence[int], tile: Sequence[int], overlap: float,
                   align: Sequence[int] | None = None) -> tuple[tuple[slice, ...], list[tuple[int, ...]]]:
    """The window covered by the tiles of the grid over ``size`` that touch ``region``, and their
    corners inside that window: what a block needs to equal the whole-region sliding window."""
    align = align or (1,) * len(size)
    spans, starts = [], []
    for r, t, n, a in zip(region, tile, size, align):
        touching = [s for s in tile_starts(n, t, overlap, a) if s < r.stop and s + t > r.start]
        spans.append(slice(touching[0], min(n, touching[-1] + t)))
        starts.append([s - touching[0] for s in touching])
    return tuple(spans), list(itertools.product(*starts))


def window(image: torch.Tensor, corner: Corner, patch: Sequence[int], origin: Sequence[int] | None = None
           ) -> torch.Tensor:
    """The tile of ``image`` (C, *spatial) at ``corner``; ``origin``: where ``image`` starts in the corners' frame."""
    origin = origin or (0,) * len(corner)
    return image[(slice(None), *(slice(c - o, c - o + p) for c, o, p in zip(corner, origin, patch)))]


def batched(model: Model, image: torch.Tensor, corners: Sequence[Corner], patch: tuple[int, ...],
            batch_size: int) -> Iterator[tuple[Corner, torch.Tensor]]:
    """``model``'s output of each tile of ``image`` (C, *spatial) at ``corners``, ``batch_size`` tiles a forward
    pass, in the order of ``corners``: the default :data:`TileRunner`."""
    for first in range(0, len(corners), batch_size):
        chunk = corners[first : first + batch_size]
        yield from zip(chunk, model(torch.stack([window(image, corner, patch) for corner in chunk])).float())


def pad_to(image: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """``image`` (C, *spatial) padded at the end of each axis shorter than ``patch`` to it: reflected, or replicated
    where reflecting cannot reach (padding as long as the axis)."""
    spatial = tuple(image.shape[1:])
    pad = [max(0, p - s) for p, s in zip(patch, spatial)]
    if not any(pad):
        return image
    mode = "reflect" if all(p < s for p, s in zip(pad, spatial)) else "replicate"
    flat = [v for p in reversed(pad) for v in (0, p)]
    return torch.nn.functional.pad(image[None], flat, mode=mode)[0]


@torch.inference_mode()        # outputs are never trained on; 1.00-1.04x no_grad's speed (benchmarks/inference_ops.py)
def sliding_window(
    model: Model,
    image: torch.Tensor,
    patch_shape: Sequence[int],
    overlap: float = 0.25,
    batch_size: int = 8,
    corners: Sequence[Sequence[int]] | None = None,
    blend: str = "linear",
    stride: Sequence[int] | None = None,
    run: TileRunner = batched,
) -> torch.Tensor:
    """``model`` output over the whole of ``image`` (C, *spatial), blended from overlapping tiles.

    Inputs smaller than the patch along an axis are reflect-padded to it and cropped back.
    ``corners`` (default: ``tile_corners`` of the image) lets a caller blend a chosen subset of a
    larger grid's tiles, as blockwise prediction does. ``stride``: the model answers on a grid
    coarser by this factor per axis (dense features); corners must then be multiples of it.
    ``run``: how the tiles' outputs are obtained (blockwise prediction reads those its neighbours
    computed); they are blended in the order it yields them.
    Returns (K, *spatial / stride) on the image's device, float32.
    """
    spatial, patch = tuple(image.shape[1:]), tuple(int(p) for p in patch_shape)
    stride = tuple(int(s) for s in stride) if stride is not None else (1,) * len(patch)
    image = pad_to(image, patch)
    size = tuple(image.shape[1:])
    corners = tile_corners(size, patch, overlap, stride) if corners is None else [tuple(c) for c in corners]
    if any(c % k for corner in corners for c, k in zip(corner, stride)) or any(p % k for p, k in zip(patch, stride)):
        raise EmfmError(f"sliding window: tile {list(patch)} and corners must be multiples of the stride "
                        f"{list(stride)}")
    out_patch = tuple(p // k for p, k in zip(patch, stride))
    out_size = tuple(-(-s // k) for s, k in zip(size, stride))
    weight = blend_weights(out_patch, image.device, blend)
    total: torch.Tensor | None = None
    norm: torch.Tensor | None = None
    for corner, tile in run(model, image, corners, patch, batch_size):
        if total is None or norm is None:
            total = torch.zeros(tile.shape[0], *out_size, device=image.device)
            norm = torch.zeros(out_size, device=image.device)
        region = tuple(slice(c // k, c // k + p) for c, k, p in zip(corner, stride, out_patch))
        total[(slice(None), *region)] += tile * weight
        norm[region] += weight
    assert total is not None and norm is not None    # corners is never empty
    result = total / norm
    return result[(slice(None), *(slice(0, -(-s // k)) for s, k in zip(spatial, stride)))]
