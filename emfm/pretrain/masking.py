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
