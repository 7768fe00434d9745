"""Small building blocks shared by encoders, objectives and heads."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from emfm.errors import EmfmError


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


class PatchEmbed3d(nn.Module):
    """Non-overlapping (Z, Y, X) patches to tokens with fixed sine-cosine positions, (N, L, D).

    Positions are added here, not by the ViT around it, because they must follow each input's
    token grid: one built for ``input_shape`` is reused, any other grid gets its own.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        patch_size: Sequence[int],
        in_chans: int,
        embed_dim: int,
        bias: bool = True,
        norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.patch_size = triple(patch_size)
        self.grid_size = tuple(s // p for s, p in zip(input_shape, self.patch_size))
        self.proj = nn.Conv3d(in_chans, embed_dim, self.patch_size, self.patch_size, bias=bias)
        self.norm = nn.Identity() if norm is None else norm
        self.register_buffer(  # not saved: a checkpoint does not depend on the patch shape
            "pos_embed", sincos_pos_embed(self.grid_size, embed_dim)[None], persistent=False
        )  # (1, L, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (N, D, gz, gy, gx)
        grid, dim = tuple(x.shape[2:]), x.shape[1]
        pos = self.pos_embed if grid == self.grid_size else sincos_pos_embed(grid, dim)[None]
        return self.norm(x.flatten(2).transpose(1, 2)) + pos.to(x)


def triple(sizes: Sequence[int]) -> tuple[int, int, int]:
    """A size per axis of a volume, (Z, Y, X)."""
    z, y, x = (int(s) for s in sizes)
    return z, y, x


class BasicBlock3d(nn.Module):
    """ResNet basic block in 3-D: two 3x3x3 conv-BN, projected shortcut when the shape changes.

    The last BN starts with zero scale, so each block starts as the identity: deep stacks then
    train stably from the first step (Goyal et al., 2017).
    """

    def __init__(self, in_chans: int, out_chans: int, stride: Sequence[int] = (1, 1, 1)) -> None:
        super().__init__()
        stride = triple(stride)
        self.conv1 = nn.Conv3d(in_chans, out_chans, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(out_chans)
        self.conv2 = nn.Conv3d(out_chans, out_chans, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(out_chans)
        nn.init.zeros_(self.bn2.weight)
        self.act = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if in_chans != out_chans or any(s != 1 for s in stride):
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_chans, out_chans, 1, stride=stride, bias=False), nn.BatchNorm3d(out_chans)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(out)) + self.shortcut(x))


def conv_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """``nn.Conv2d`` or ``nn.Conv3d`` by the number of spatial axes, same arguments."""
    return (nn.Conv2d if dims == 2 else nn.Conv3d)(*args, **kwargs)


def conv_transpose_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """``nn.ConvTranspose2d`` or ``nn.ConvTranspose3d`` by the number of spatial axes."""
    return (nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d)(*args, **kwargs)


def max_pool_nd(dims: int, size: Sequence[int]) -> nn.Module:
    """``nn.MaxPool2d`` or ``nn.MaxPool3d`` pooling non-overlapping cells of ``size`` (one int per axis)."""
    return (nn.MaxPool2d if dims == 2 else nn.MaxPool3d)(tuple(size))


NORMS = ("instance", "group", "batch")


class InstanceNorm(nn.GroupNorm):
    """Affine instance norm in any number of dimensions, computed as group norm with a group per channel: the same
    statistics and parameters (``weight``, ``bias``) as ``nn.InstanceNorm2d/3d(affine=True)``, 3-5x faster than
    torch's instance norm kernel on a CPU (docs/benchmarks.md, "Issue 29")."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels)


def norm_nd(kind: str, dims: int, channels: int) -> nn.Module:
    """A normalisation layer for (N, C, *spatial) maps.

    ``instance`` (affine) is batch-size independent and behaves the same in training and eval,
    which suits fine-tuning at batch sizes 2-8 (nnU-Net and MONAI's UNETR use it); ``group`` (8
    groups or fewer) also works on maps with a single voxel; ``batch`` is for large batches.
    """
    if kind == "instance":
        return InstanceNorm(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    if kind == "batch":
        return (nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d)(channels)
    raise EmfmError(f"head.norm={kind!r} is not one of {list(NORMS)}")


class ConvBlock(nn.Module):
    """Two 3x3(x3) conv-norm-LeakyReLU layers, the U-Net unit; ``residual`` adds a (projected)
    shortcut around them, as UNETR's residual blocks do.

    The convolutions have no bias: the norm after them would cancel it.
    """

    def __init__(
        self, dims: int, in_chans: int, out_chans: int, norm: str = "instance", residual: bool = False
    ) -> None:
        super().__init__()
        self.conv1 = conv_nd(dims, in_chans, out_chans, 3, padding=1, bias=False)
        self.norm1 = norm_nd(norm, dims, out_chans)
        self.conv2 = conv_nd(dims, out_chans, out_chans, 3, padding=1, bias=False)
        self.norm2 = norm_nd(norm, dims, out_chans)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.shortcut: nn.Module | None = None
        if residual:
            self.shortcut = nn.Identity()
            if in_chans != out_chans:
                self.shortcut = nn.Sequential(
                    conv_nd(dims, in_chans, out_chans, 1, bias=False), norm_nd(norm, dims, out_chans)
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.act(out)
