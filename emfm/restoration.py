"""The restoration task, shared by whole-network pretraining (``objective=restore``) and ``semi=restore``
fine-tuning: corrupt patches (cells hidden behind noise, noise everywhere) and score how well the network
repairs them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from emfm.errors import EmfmError
from emfm.models.masking import random_masking


class Corruption:
    """Hide cells behind noise and add noise everywhere; also says how much each voxel's error counts.

    Args:
        input_shape: the patch shape, which ``mask_patch`` must divide.
        mask_ratio: fraction of mask cells hidden (0 = denoising only).
        mask_patch: mask cell size, an int for every axis or one per axis.
        noise_std: range of the standard deviation of the noise added to every voxel, drawn per patch
            (normalised intensity units; [0, 0] = in-painting only).
        visible_weight: weight of the error on visible voxels next to hidden ones (denoising them).
        key: config key named in errors.
    """

    def __init__(self, input_shape: Sequence[int], mask_ratio: float = 0.5, mask_patch: int | Sequence[int] = 8,
                 noise_std: Sequence[float] = (0.0, 0.0), visible_weight: float = 0.0, key: str = "restore") -> None:
        dims = len(input_shape)
        patch = (int(mask_patch),) * dims if isinstance(mask_patch, int) else tuple(int(p) for p in mask_patch)
        if len(patch) != dims or any(s % p for s, p in zip(input_shape, patch)):
            raise EmfmError(f"{key}.mask_patch {list(patch)} must have {dims} entries dividing the patch shape "
                            f"{list(input_shape)}")
        if not 0.0 <= mask_ratio < 1.0:
            raise EmfmError(f"{key}.mask_ratio must be in [0, 1), got {mask_ratio}")
        lo, hi = (float(v) for v in noise_std)
        if not 0.0 <= lo <= hi:
            raise EmfmError(f"{key}.noise_std must be [lo, hi] with 0 <= lo <= hi, got {list(noise_std)}")
        if mask_ratio == 0 and (hi == 0 or visible_weight <= 0):
            raise EmfmError(f"{key}: mask_ratio 0 needs noise_std above 0 and visible_weight > 0")
        self.grid = tuple(s // p for s, p in zip(input_shape, patch))
        self.mask_patch, self.mask_ratio = patch, float(mask_ratio)
        self.noise_std, self.visible_weight = (lo, hi), float(visible_weight)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(corrupted images, per-voxel loss weight (N, 1, *S)); the grid follows the images' shape."""
        n = images.shape[0]
        like: dict[str, Any] = {"device": images.device, "dtype": images.dtype}
        grid = tuple(s // p for s, p in zip(images.shape[2:], self.mask_patch))
        hidden = torch.zeros(n, 1, *grid, **like)
        if self.mask_ratio > 0:
            _, mask = random_masking(n, hidden[0].numel(), self.mask_ratio, device=images.device, generator=generator)
            hidden = mask.view(n, 1, *grid).to(images.dtype)
        for axis, size in enumerate(self.mask_patch):
            hidden = hidden.repeat_interleave(size, dim=2 + axis)  # (N, 1, *S)
        axes = tuple(range(1, images.ndim))
        fill = images.mean(axes, keepdim=True) + images.std(axes, keepdim=True) * torch.randn(
            images.shape, generator=generator, **like)
        lo, hi = self.noise_std
        sigma = lo + (hi - lo) * torch.rand(n, *[1] * (images.ndim - 1), generator=generator, **like)
        noisy = images + sigma * torch.randn(images.shape, generator=generator, **like)
        return noisy * (1 - hidden) + fill * hidden, hidden + self.visible_weight * (1 - hidden)


def restoration_loss(restored: torch.Tensor, images: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean squared error of the restored patches against the clean ones."""
    error = (restored.float() - images.float()).pow(2) * weight
    return error.sum() / (weight.sum() * images.shape[1]).clamp(min=1)
