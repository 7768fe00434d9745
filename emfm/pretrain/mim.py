"""Masked image modelling for any encoder with feature maps, CNNs in particular (SimMIM-style).

A CNN cannot drop tokens, so the hidden regions are replaced at the input by a learned value and
the network sees the whole (masked) image. A light top-down decoder merges the encoder's
multi-scale maps back to full resolution and predicts the pixels; the loss counts hidden regions
only. Masking whole cells of the coarsest stride keeps the task from being solved by local
interpolation inside a receptive field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from emfm.errors import EmfmError
from emfm.models.encoders import Encoder
from emfm.models.layers import conv_nd
from emfm.models.masking import (
    masked_mse,
    patchify,
    pixel_target,
    random_masking,
    reconstruction_panels,
    unpatchify,
)
from emfm.pretrain.base import Objective, register


@register("mim")
class MIM(Objective):
    """Masked image modelling objective.

    Args:
        encoder: any encoder (``cnn2d``, ``cnn3d``; ViTs work too, SimMIM-style).
        mask_ratio: fraction of mask cells hidden.
        mask_patch: mask cell size per axis (an int for all axes); default the encoder's coarsest stride.
        decoder_dim: channels of the top-down decoder.
        norm_pix_loss: predict pixels normalised per mask cell.
        augment, isotropic: see :class:`~emfm.pretrain.base.Objective`.
    """

    def __init__(
        self,
        encoder: Encoder,
        mask_ratio: float = 0.6,
        mask_patch: int | Sequence[int] | None = None,
        decoder_dim: int = 128,
        norm_pix_loss: bool = False,
        augment: Mapping[str, Any] | None = None,
        isotropic: bool = False,
    ) -> None:
        super().__init__(encoder, augment, isotropic)
        dims = encoder.spatial_dims
        if mask_patch is None:
            mask_patch = max(encoder.feature_strides, key=math.prod)
        elif isinstance(mask_patch, int):
            mask_patch = (mask_patch,) * dims
        self.mask_patch = tuple(int(p) for p in mask_patch)
        shape = tuple(encoder.input_shape)
        if len(self.mask_patch) != dims or any(s % p for s, p in zip(shape, self.mask_patch)):
            raise EmfmError(
                f"objective mask_patch {list(self.mask_patch)} must have {dims} entries dividing the "
                f"patch shape {list(shape)}"
            )
        self.grid = tuple(s // p for s, p in zip(shape, self.mask_patch))
        if math.prod(self.grid) < 2:
            raise EmfmError(
                f"objective mask_patch {list(self.mask_patch)} leaves a single mask cell in the patch "
                f"shape {list(shape)}: use a larger data.patch_shape or a smaller mask_patch"
            )
        if not 0.0 < mask_ratio < 1.0:
            raise EmfmError(f"objective mask_ratio must be in (0, 1), got {mask_ratio}")
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.mask_token = nn.Parameter(torch.zeros(1, encoder.in_chans, *[1] * dims))
        self.lateral = nn.ModuleList(conv_nd(dims, c, decoder_dim, 1) for c in encoder.feature_channels)
        self.fuse = nn.Sequential(conv_nd(dims, decoder_dim, decoder_dim, 3, padding=1), nn.GELU())
        self.finest = min(encoder.feature_strides, key=math.prod)
        self.pred = conv_nd(dims, decoder_dim, math.prod(self.finest) * encoder.in_chans, 1)

    def mask(self, images: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cell mask (N, L) True = hidden, pixel mask (N, 1, *S))."""
        _, mask = random_masking(images.shape[0], math.prod(self.grid), self.mask_ratio,
                                 device=images.device, generator=generator)
        pixels = mask.view(-1, 1, *self.grid).to(images.dtype)
        for axis, size in enumerate(self.mask_patch):
            pixels = pixels.repeat_interleave(size, dim=2 + axis)
        return mask, pixels

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Top-down merge of the multi-scale maps, then pixels at full resolution, (N, C, *S)."""
        x = self.lateral[-1](features[-1])
        for lateral, fmap in zip(self.lateral[-2::-1], features[-2::-1]):
            x = F.interpolate(x, size=fmap.shape[2:], mode="nearest") + lateral(fmap)
        x = self.pred(self.fuse(x))  # (N, prod(finest) * C, *grid_finest)
        # Each finest-scale cell predicts its block of pixels (an N-D pixel shuffle).
        cells = x.flatten(2).transpose(1, 2)  # (N, L_finest, prod(finest) * C)
        return unpatchify(cells, self.finest, tuple(x.shape[2:]))

    def predict(self, encoder: Encoder, images: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction as mask-cell vectors (N, L, prod(mask_patch) * C), cell mask (N, L))."""
        mask, pixels = self.mask(images, generator)
        masked = images * (1 - pixels) + self.mask_token.to(images.dtype) * pixels
        recon = self.decode(encoder.forward_features(masked))
        return patchify(recon, self.mask_patch), mask

    def forward(self, encoder: Encoder, images: torch.Tensor,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        images = self.augment(images, generator)
        pred, mask = self.predict(encoder, images, generator)
        return {"loss": masked_mse(pred, pixel_target(images, self.mask_patch, self.norm_pix_loss), mask)}

    def visualize(self, encoder: Encoder, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pred, mask = self.predict(encoder, images, torch.Generator(device=images.device).manual_seed(0))
        return reconstruction_panels(images, pred, mask, self.mask_patch, self.norm_pix_loss)
