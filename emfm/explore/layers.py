"""Which features of a network ``emfm features`` takes: one encoder map, a hypercolumn, or the decoder's.

An encoder's maps are coarse (a ViT's tokens 16 voxels apart, a CNN's deepest stage 32): clusters of them are
blobs at that stride. The decoder a whole-network checkpoint holds (``objective=restore`` pretrains it with the
encoder, fine-tuning trains it) gives features at full resolution, learned from the data; a hypercolumn stacks
several encoder maps upsampled to full resolution, fine and coarse side by side. Each is a function of a tile,
so the sliding window of ``emfm features`` computes it blockwise like any map.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from emfm.errors import EmfmError
from emfm.models.encoders import Encoder
from emfm.models.heads import SegmentationHead

DECODER, HYPERCOLUMN = "decoder", "hypercolumn"     # the layers besides the encoder's maps
Network = tuple[Encoder, SegmentationHead | None]   # an encoder and the decoder trained with it, if any


def feature_function(encoder: Encoder, decoder: SegmentationHead | None, layer: int | str, stages: tuple[int, ...],
                     tile: tuple[int, ...], stride: tuple[int, ...]) -> Any:
    """Tiles (B, C, *tile) -> features (B, F, *tile / stride) of the layer (:func:`resolve_layer`): an encoder
    map, the decoder's full-resolution features, or the ``stages`` maps, each resized, concatenated."""
    per_slice = len(tile) == 3 and encoder.spatial_dims == 2
    out = tuple(t // k for t, k in zip(tile, stride))[1 if per_slice else 0:]
    mode = "bilinear" if len(out) == 2 else "trilinear"
    indices = stages if layer == HYPERCOLUMN else (layer,) if isinstance(layer, int) else ()

    def features(x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, 0] if per_slice else x
        maps = encoder.forward_features(x)
        chosen = [decoder.decode(x, maps)] if decoder is not None and layer == DECODER else [maps[i] for i in indices]
        f = torch.cat([m if tuple(m.shape[2:]) == out else F.interpolate(m, size=out, mode=mode, align_corners=False)
                       for m in chosen], dim=1)                                      # [B, F, *out]
        return f.unsqueeze(2) if per_slice else f

    return features


def resolve_layer(layer: int | str | None, stages: Any, encoder: Encoder,
                  decoder: SegmentationHead | None) -> tuple[int | str, tuple[int, ...]]:
    """(layer, stages) checked: a map index in 0..maps-1, ``decoder`` (the default where one is given: its features
    are at full resolution; ``emfm features`` gives one for the default only if it was pretrained, objective=restore)
    or ``hypercolumn`` with the indices of its maps (default all)."""
    maps = len(encoder.feature_strides)
    layer = (DECODER if decoder is not None else -1) if layer is None else layer
    if stages is not None and layer != HYPERCOLUMN:
        raise EmfmError(f"stages={stages}: the maps of layer=hypercolumn, not of layer={layer}; leave stages out")
    if layer == HYPERCOLUMN:
        chosen = list(range(maps)) if stages is None else list(stages)
        if not chosen:
            raise EmfmError("stages=[]: expected at least one encoder map for the hypercolumn")
        return layer, tuple(_map_index(i, maps, f"stages={chosen}") for i in chosen)
    if layer == DECODER:
        if decoder is None:
            raise EmfmError("layer=decoder: the checkpoint holds no decoder (whole-network pretraining, objective="
                            "restore, and fine-tuning with a unet or unetr head do); choose an encoder map or "
                            "hypercolumn")
        return layer, ()
    if isinstance(layer, int) and not isinstance(layer, bool):
        return _map_index(layer, maps, f"layer={layer}"), ()
    raise EmfmError(f"layer={layer}: expected an encoder map (0..{maps - 1}, -1 the last), decoder or hypercolumn")


def _map_index(index: Any, maps: int, key: str) -> int:
    if not isinstance(index, int) or not -maps <= index < maps:
        raise EmfmError(f"{key}: the encoder has {maps} feature maps (0..{maps - 1}, or -1 for the last)")
    return index % maps


def layer_channels(encoder: Encoder, decoder: SegmentationHead | None, layer: int | str,
                   stages: tuple[int, ...]) -> int:
    """Feature channels of a resolved layer."""
    if decoder is not None and layer == DECODER:
        return decoder.width
    return sum(encoder.feature_channels[i] for i in (stages if layer == HYPERCOLUMN else (int(layer),)))


def tiling(encoder: Encoder, ndim: int, layer: int | str = -1,
           stride: Any = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(tile, stride) over the axes of an ``ndim``-D input: a 2-D encoder over a stack gets 1 in z.

    ``layer``: resolved (:func:`resolve_layer`); ``stride`` (voxels per feature cell in the encoder's axes; default
    the map's own, 1 for the decoder and a hypercolumn) must divide the tile.
    """
    own = tuple(encoder.feature_strides[layer]) if isinstance(layer, int) else (1,) * encoder.spatial_dims
    plane = own if stride is None else per_axis(stride, len(own), "stride")
    per_slice = ndim == 3 and encoder.spatial_dims == 2
    tile = (1, *encoder.input_shape) if per_slice else tuple(encoder.input_shape)
    step = (1, *plane) if per_slice else plane
    if any(t % k for t, k in zip(tile, step)):
        raise EmfmError(f"stride={list(step)}: must divide the encoder tile {list(tile)}")
    return tuple(int(t) for t in tile), tuple(int(k) for k in step)


def per_axis(value: Any, n: int, key: str) -> tuple[int, ...]:
    values = [value] * n if isinstance(value, int) else list(value)
    if len(values) != n or min(values) < 1:
        raise EmfmError(f"{key}={value}: expected a positive size or {n} of them")
    return tuple(int(v) for v in values)
