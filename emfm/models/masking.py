"""Token masks for masked image modelling, kept apart so they can be tested on their own."""

from __future__ import annotations

import math

import torch


def random_masking(
    batch: int, tokens: int, ratio: float, *, device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``round(ratio * tokens)`` tokens per sample to hide, uniformly at random.

    Returns:
        keep: indices of the visible tokens, (N, L_keep), sorted so token order is kept.
        mask: True where a token is hidden, (N, L).
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    n_mask = min(max(round(ratio * tokens), 1), tokens - 1)
    noise = torch.rand(batch, tokens, device=device, generator=generator)
    order = noise.argsort(dim=1)  # the first n_mask tokens of this order are hidden
    mask = torch.zeros(batch, tokens, dtype=torch.bool, device=device)
    mask.scatter_(1, order[:, :n_mask], True)
    keep = order[:, n_mask:].sort(dim=1).values  # (N, L_keep)
    return keep, mask


def patchify(x: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    """(N, C, *S) images -> (N, L, prod(patch) * C) patch vectors, tokens in raster order."""
    n, c, *size = x.shape
    grid = [s // p for s, p in zip(size, patch)]
    d = len(patch)
    x = x.reshape(n, c, *[v for gp in zip(grid, patch) for v in gp])  # (N, C, g1, p1, g2, p2, ...)
    x = x.permute(0, *range(2, 2 + 2 * d, 2), *range(3, 3 + 2 * d, 2), 1)  # (N, g..., p..., C)
    return x.reshape(n, math.prod(grid), math.prod(patch) * c)


def unpatchify(x: torch.Tensor, patch: tuple[int, ...], grid: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`patchify`: (N, L, prod(patch) * C) -> (N, C, *S)."""
    n, d = x.shape[0], len(patch)
    c = x.shape[-1] // math.prod(patch)
    x = x.reshape(n, *grid, *patch, c)  # (N, g..., p..., C)
    x = x.permute(0, 2 * d + 1, *[v for i in range(d) for v in (1 + i, 1 + d + i)])
    return x.reshape(n, c, *[g * p for g, p in zip(grid, patch)])  # (N, C, *S)


def tube_masking(
    batch: int, grid: tuple[int, ...], ratio: float, *, device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hide the same (Y, X) tokens in every z-plane of a (Z, Y, X) grid, as :func:`random_masking`.

    Neighbouring sections of anisotropic EM are nearly alike; hiding whole tubes stops the model
    from filling a hidden token by copying the section above it.
    """
    _, plane = random_masking(batch, math.prod(grid[1:]), ratio, device=device, generator=generator)
    mask = plane.repeat(1, grid[0])  # (N, Z * Y * X), z-major raster order
    keep = (~mask).nonzero()[:, 1].reshape(batch, -1)  # row-major, so sorted per sample
    return keep, mask


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over hidden patches only: (N, L, P) predictions, (N, L) mask."""
    per_patch = (pred.float() - target.float()).pow(2).mean(-1)  # (N, L)
    return (per_patch * mask).sum() / mask.sum()


def pixel_target(images: torch.Tensor, patch: tuple[int, ...], norm_pix: bool) -> torch.Tensor:
    """Patch vectors to reconstruct, (N, L, prod(patch) * C), optionally normalised per patch (MAE)."""
    target = patchify(images, patch)
    if norm_pix:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    return target


def reconstruction_panels(
    images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch: tuple[int, ...], norm_pix: bool
) -> dict[str, torch.Tensor]:
    """Input / masked input / visible + predicted pixels, from patch predictions (N, L, P)."""
    grid = tuple(s // p for s, p in zip(images.shape[2:], patch))
    pixels = patchify(images, patch)
    if norm_pix:  # back to image intensities with each patch's own statistics
        pred = pred * (pixels.var(-1, keepdim=True) + 1e-6).sqrt() + pixels.mean(-1, keepdim=True)
    hidden = mask[..., None].to(pixels.dtype)
    floor = images.amin()
    return {
        "input": images,
        "masked": unpatchify(pixels * (1 - hidden) + floor * hidden, patch, grid),
        "reconstruction": unpatchify(pixels * (1 - hidden) + pred.to(pixels.dtype) * hidden, patch, grid),
    }
