"""Small building blocks shared by encoders and objectives."""

from __future__ import annotations

import torch


def sincos_pos_embed(grid: tuple[int, ...], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed sine-cosine position embedding of an N-D token grid, (prod(grid), dim), raster order.

    Each axis gets an equal share of the channels, so nearby tokens get similar codes from the
    first step on (a learned embedding must discover that); it works for 2-D and 3-D grids alike.
    """
    per_axis = 2 * (dim // (2 * len(grid)))
    freqs = temperature ** (-torch.arange(per_axis // 2, dtype=torch.float32) / (per_axis // 2))
    coords = torch.meshgrid(*[torch.arange(g, dtype=torch.float32) for g in grid], indexing="ij")
    parts = []
    for axis_coords in coords:
        angles = axis_coords.reshape(-1, 1) * freqs  # (L, per_axis / 2)
        parts += [angles.sin(), angles.cos()]
    embed = torch.cat(parts, dim=1)  # (L, per_axis * ndim)
    return torch.nn.functional.pad(embed, (0, dim - embed.shape[1]))  # (L, dim)

