"""Segmentation heads on any :class:`~emfm.models.encoders.Encoder`, in 2-D and 3-D.

A head only reads the encoder's interface (``spatial_dims``, ``in_chans``, ``feature_channels``,
``feature_strides``), never a backbone class, so every family gets a full-resolution decoder:
:class:`UNETRHead` for ViTs (one stride for every map), :class:`UNetHead` for CNNs (a map per
scale), :class:`LinearHead` as a light probe for either. Heads return logits of shape
``(N, out_channels, *input spatial shape)``; the activation (sigmoid, softmax, none for
distances or affinities) belongs to the target and its loss, so it is not applied here.

Normalisation defaults to affine InstanceNorm: fine-tuning runs at batch sizes 2-8 (3-D patches
often 2), where BatchNorm statistics are noisy and differ between training and eval; instance
norm is what nnU-Net and MONAI's UNETR use. ``norm="group"`` or ``"batch"`` are available.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from emfm.errors import EmfmError
from emfm.models.encoders import Encoder
from emfm.models.layers import ConvBlock, conv_nd, conv_transpose_nd


def _interpolate(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(Bi/tri)linear resize of (N, C, *spatial) maps; a no-op when the size already matches."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    mode = "bilinear" if x.ndim == 4 else "trilinear"
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=False)


def upsampling_schedule(stride: Sequence[int]) -> list[tuple[int, ...]]:
    """Per-stage, per-axis upsampling factors from ``stride`` to full resolution, coarsest first.

    Each axis is upsampled by 2 per stage while it still needs it, so an anisotropic stride like
    (4, 16, 16) goes (4, 16, 16) -> (2, 8, 8) -> (1, 4, 4) -> (1, 2, 2) -> (1, 1, 1): Z is done
    first, as the anisotropic 3-D ResNet keeps Z resolution longest. An odd part of a stride
    (14 = 7 * 2) is taken in one coarse stage, so every factor is an integer.
    """
    per_axis = []
    for s in stride:
        factors = []
        while s > 1:
            odd = s // (s & -s)  # s without its factors of 2
            factors.append(odd if odd > 1 else 2)
            s //= factors[-1]
        per_axis.append(factors)
    stages = max(len(f) for f in per_axis)
    return [tuple(f[k] if k < len(f) else 1 for f in per_axis) for k in range(stages)]


class SegmentationHead(nn.Module):
    """What every head keeps: ``forward(image, features)`` -> logits (N, out_channels, *image spatial).

    The input image is passed too, so heads can add a full-resolution skip from the raw pixels.
    A decoder head splits into ``decode`` (full-resolution features, ``width`` channels) and the
    1x1 convolution ``out``, so a second output (a self-supervised one) can share the decoder and
    a pretrained decoder can be reused with a fresh output layer.
    """

    width: int  # channels of what ``decode`` returns
    out: nn.Module  # the 1x1 output convolution of decoder heads

    def __init__(self, encoder: Encoder, out_channels: int) -> None:
        super().__init__()
        if out_channels < 1:
            raise EmfmError(f"head out_channels must be >= 1, got {out_channels}")
        self.spatial_dims, self.out_channels = encoder.spatial_dims, int(out_channels)

    def decode(self, image: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Full-resolution decoder features (N, width, *image spatial)."""
        raise NotImplementedError

    def forward(self, image: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.out(self.decode(image, features))


class UNETRHead(SegmentationHead):
    """UNETR decoder (Hatamizadeh et al., 2022) for ViTs, whose maps all share the patch stride.

    The deepest map is upsampled stage by stage (factor 2 per axis that still needs it, see
    :func:`upsampling_schedule`) by transposed convolutions; at each stage it is concatenated with
    a shallower map brought to that resolution by its own chain of transposed convolutions, then
    merged by a residual conv block. At full resolution the skip is conv blocks on the raw image,
    which restores the detail inside a token (thin membranes) that no ViT map holds.

    Shallower maps go to successively finer stages (the shallowest finest, as in UNETR); with
    fewer maps than stages the coarsest stages get them, with more, neighbours share a stage.

    Args:
        encoder: a ViT-like encoder (every feature stride equal, larger than 1).
        out_channels: logit channels.
        channels: width at full resolution; it doubles with every stage (UNETR's feature_size).
        norm: ``instance``, ``group`` or ``batch`` (see :func:`~emfm.models.layers.norm_nd`).
    """

    def __init__(self, encoder: Encoder, out_channels: int, channels: int = 16, norm: str = "instance") -> None:
        super().__init__(encoder, out_channels)
        strides = {tuple(s) for s in encoder.feature_strides}
        if len(strides) != 1:
            raise EmfmError(
                f"head.name=unetr needs feature maps of one stride (a ViT), but model.family="
                f"{encoder.family} has strides {[list(s) for s in encoder.feature_strides]}; use head.name=unet"
            )
        stride = strides.pop()
        if math.prod(stride) == 1:
            raise EmfmError(f"head.name=unetr needs a feature stride above 1, got {list(stride)}")
        dims, dim = encoder.spatial_dims, encoder.feature_channels[-1]
        schedule = upsampling_schedule(stride)  # coarsest first
        stages = len(schedule)
        # up[l] takes level l + 1 to level l (level 0 = full resolution, level `stages` = tokens).
        factors = schedule[::-1]
        widths = [channels * 2**level for level in range(stages)]

        # Skip maps to levels 1..stages-1 (level 0 if there is no other), shallowest finest.
        skips = len(encoder.feature_channels) - 1
        hi = stages - 1
        lo = min(1, hi)
        self.skip_levels = [hi - (skips - 1 - j) * (hi - lo + 1) // skips for j in range(skips)]
        self.skip_paths = nn.ModuleList()
        for c, level in zip(encoder.feature_channels[:-1], self.skip_levels):
            ups = factors[level:][::-1]  # coarsest first
            path: list[nn.Module] = [conv_transpose_nd(dims, c, widths[level], ups[0], stride=ups[0])]
            for f in ups[1:]:
                path += [conv_transpose_nd(dims, widths[level], widths[level], f, stride=f),
                         ConvBlock(dims, widths[level], widths[level], norm, residual=True)]
            self.skip_paths.append(nn.Sequential(*path))
        self.raw = ConvBlock(dims, encoder.in_chans, widths[0], norm, residual=True)

        self.ups, self.blocks = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(stages)):
            c_in = dim if level == stages - 1 else widths[level + 1]
            self.ups.append(conv_transpose_nd(dims, c_in, widths[level], factors[level], stride=factors[level]))
            merged = widths[level] * (1 + self.skip_levels.count(level) + (level == 0))
            self.blocks.append(ConvBlock(dims, merged, widths[level], norm, residual=True))
        self.width = widths[0]
        self.out = conv_nd(dims, self.width, self.out_channels, 1)

    def decode(self, image: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        skips = [path(f) for path, f in zip(self.skip_paths, features[:-1])]
        x = features[-1]
        for level, up, block in zip(reversed(range(len(self.ups))), self.ups, self.blocks):
            x = up(x)
            merged = [x, *[s for s, lv in zip(skips, self.skip_levels) if lv == level]]
            if level == 0:
                merged.append(self.raw(image))
            x = block(torch.cat(merged, dim=1))
        return x


class UNetHead(SegmentationHead):
    """Classic U-Net decoder over a CNN's multi-scale maps.

    From the coarsest map: resize to the next finer map (linear interpolation, so any stride
    ratio and odd sizes work), concatenate it, two conv-norm-act layers; repeat. If the finest
    map is not at full resolution, a last stage does the same with the raw image as the skip:
    it costs one input channel and gives the final layers the pixel detail that a stride-2 map
    lacks. Then a 1x1 convolution to the logits.

    Args:
        encoder: any encoder (typically ``cnn2d`` / ``cnn3d``), maps ordered finest first.
        out_channels: logit channels.
        channels: width of the finest stage; it doubles with every coarser map.
        norm: ``instance``, ``group`` or ``batch`` (see :func:`~emfm.models.layers.norm_nd`).
    """

    def __init__(self, encoder: Encoder, out_channels: int, channels: int = 32, norm: str = "instance") -> None:
        super().__init__(encoder, out_channels)
        dims, chans = encoder.spatial_dims, list(encoder.feature_channels)
        widths = [channels * 2**i for i in range(len(chans) - 1)]
        self.blocks = nn.ModuleList()
        for i in reversed(range(len(chans) - 1)):  # coarsest decoder stage first
            c_in = chans[-1] if i == len(chans) - 2 else widths[i + 1]
            self.blocks.append(ConvBlock(dims, c_in + chans[i], widths[i], norm))
        width = widths[0] if widths else chans[0]
        self.full: ConvBlock | None = None
        if math.prod(min(encoder.feature_strides, key=math.prod)) > 1:
            self.full = ConvBlock(dims, width + encoder.in_chans, channels, norm)
            width = channels
        self.width = width
        self.out = conv_nd(dims, width, self.out_channels, 1)

    def decode(self, image: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for block, skip in zip(self.blocks, features[-2::-1]):
            x = block(torch.cat([_interpolate(x, skip.shape[2:]), skip], dim=1))
        if self.full is not None:
            x = self.full(torch.cat([_interpolate(x, image.shape[2:]), image], dim=1))
        return _interpolate(x, image.shape[2:])


class LinearHead(SegmentationHead):
    """Light probe: a 1x1 convolution per map to logits, each resized (bi/trilinear) to full
    resolution, summed. Linear in the features, so it measures what the encoder already gives.

    The 1x1 convolution runs before the resize (the two commute), at the maps' cheap resolution.

    Args:
        encoder: any encoder.
        out_channels: logit channels.
        last_only: use only the deepest map (the usual linear probe) instead of every map.
    """

    def __init__(self, encoder: Encoder, out_channels: int, last_only: bool = False) -> None:
        super().__init__(encoder, out_channels)
        self.last_only = last_only
        chans = encoder.feature_channels[-1:] if last_only else encoder.feature_channels
        self.proj = nn.ModuleList(conv_nd(encoder.spatial_dims, c, self.out_channels, 1) for c in chans)

    def forward(self, image: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        maps = features[-1:] if self.last_only else features
        size = image.shape[2:]
        return torch.stack([_interpolate(proj(f), size) for proj, f in zip(self.proj, maps)]).sum(0)


HEADS: dict[str, Callable[..., SegmentationHead]] = {
    "unetr": UNETRHead,
    "unet": UNetHead,
    "linear": LinearHead,
}
HEAD_NAMES = sorted(["auto", *HEADS])


def auto_head(encoder: Encoder) -> str:
    """``unetr`` when every map has one stride (a ViT), else ``unet`` (a multi-scale CNN)."""
    return "unetr" if len({tuple(s) for s in encoder.feature_strides}) == 1 else "unet"


def head_settings(config: Mapping[str, Any], encoder: Encoder) -> dict[str, Any]:
    """A ``head`` config resolved for ``encoder``: ``auto`` replaced, every option with its value.

    Two configs that build the same decoder compare equal (``{name: auto}`` and
    ``{name: unet, channels: 32}`` on a CNN), so a pretrained decoder can be checked against a run's.
    """
    config = dict(config)
    name = config.pop("name", "auto")
    name = auto_head(encoder) if name == "auto" else name
    if name not in HEADS:
        raise EmfmError(f"head.name={name!r} is not one of {HEAD_NAMES}")
    defaults = {p.name: p.default for p in inspect.signature(HEADS[name]).parameters.values()
                if p.name not in ("encoder", "out_channels")}
    return {"name": name, **defaults, **config}


def create_head(name: str, encoder: Encoder, out_channels: int, **kwargs: Any) -> SegmentationHead:
    """Build a head from a ``head`` config: ``create_head(encoder=enc, out_channels=k, **cfg.head)``.

    Unknown names and options are :class:`~emfm.errors.EmfmError` naming the config key.
    """
    if name not in HEAD_NAMES:
        raise EmfmError(f"head.name={name!r} is not one of {HEAD_NAMES}")
    if name == "auto":
        name = auto_head(encoder)
    factory = HEADS[name]
    options = [p for p in inspect.signature(factory).parameters if p not in ("encoder", "out_channels")]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise EmfmError(f"head.{unknown[0]} is not an option of head.name={name}; expected one of {options}")
    return factory(encoder, out_channels, **kwargs)


class SegmentationModel(nn.Module):
    """Encoder plus head: ``forward(x)`` -> logits (N, out_channels, *x spatial).

    No activation is applied: sigmoid / softmax belong to the target and its loss (which then
    work on logits, numerically stable). ``encoder`` and ``head`` stay attributes so fine-tuning
    can freeze the encoder or give it its own (layer-wise decayed) learning rates.
    """

    def __init__(self, encoder: Encoder, head: SegmentationHead) -> None:
        super().__init__()
        if head.spatial_dims != encoder.spatial_dims:
            raise EmfmError(
                f"a {head.spatial_dims}-D head cannot decode the {encoder.spatial_dims}-D "
                f"model.family={encoder.family}"
            )
        self.encoder, self.head = encoder, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x, self.encoder.forward_features(x))
