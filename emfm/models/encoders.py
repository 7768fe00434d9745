"""Encoders behind one interface, and the registry that builds them from a plain config.

Objectives and heads only use what :class:`Encoder` promises, never a backbone class, so a new
family (3-D ViT, 3-D CNN, ...) plugs in by registering a factory here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import timm
import torch
from torch import nn

from emfm.errors import EmfmError


class Encoder(nn.Module):
    """The contract every encoder keeps.

    Attributes:
        spatial_dims: 2 for (N, C, Y, X) input, 3 for (N, C, Z, Y, X).
        in_chans: input channels (1 for EM).
        embed_dim: size of the global embedding returned by ``forward``.
        feature_channels: channels of each map returned by ``forward_features``.
        feature_strides: downsampling factor of each of those maps.
    """

    spatial_dims: int
    in_chans: int
    embed_dim: int
    feature_channels: list[int]
    feature_strides: list[int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Global embedding, (N, embed_dim)."""
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps at several depths/scales, each (N, C_i, *spatial / stride_i)."""
        raise NotImplementedError


def _pair(size: int | Sequence[int], dims: int) -> tuple[int, ...]:
    return (int(size),) * dims if isinstance(size, int) else tuple(int(s) for s in size)


class ViTEncoder(Encoder):
    """A timm Vision Transformer on 2-D single-channel patches.

    Token access (``embed_tokens`` / ``run_blocks``) lets MAE drop masked tokens before the blocks
    without re-implementing the ViT.
    """

    def __init__(
        self,
        name: str = "vit_small_patch16_224",
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 1,
        feature_depths: int | Sequence[int] = 4,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        img_size = _pair(img_size, 2)
        if len(img_size) != 2:
            raise EmfmError(f"vit2d needs a 2-D patch shape (Y, X); got {list(img_size)}")
        if any(s % patch_size for s in img_size):
            raise EmfmError(
                f"patch shape {list(img_size)} is not divisible by the ViT patch size {patch_size}"
            )
        self.vit = timm.create_model(
            name, pretrained=False, img_size=img_size, patch_size=patch_size,
            in_chans=in_chans, num_classes=0, **timm_kwargs,
        )
        self.spatial_dims, self.in_chans = 2, in_chans
        self.patch_size = (patch_size, patch_size)
        self.grid_size = tuple(s // patch_size for s in img_size)
        self.embed_dim = self.vit.embed_dim
        depth = len(self.vit.blocks)
        if isinstance(feature_depths, int):  # n depths spread evenly, the last block included
            n = min(feature_depths, depth)
            feature_depths = [round((i + 1) * depth / n) - 1 for i in range(n)]
        self.feature_depths = list(feature_depths)
        self.feature_channels = [self.embed_dim] * len(self.feature_depths)
        self.feature_strides = [patch_size] * len(self.feature_depths)

    @property
    def num_prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens with positions added, prefix (class/register) tokens first: (N, P + L, D)."""
        return self.vit._pos_embed(self.vit.patch_embed(x))

    def run_blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        """The transformer stack and final norm on any subset of tokens."""
        return self.vit.norm(self.vit.blocks(self.vit.norm_pre(tokens)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_head(self.vit.forward_features(x), pre_logits=True)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.vit.forward_intermediates(
            x, indices=self.feature_depths, output_fmt="NCHW", intermediates_only=True
        )


class CNNEncoder(Encoder):
    """A timm CNN in ``features_only`` mode: multi-scale maps for U-Net style heads."""

    def __init__(self, name: str = "resnet18", in_chans: int = 1, **timm_kwargs: Any) -> None:
        super().__init__()
        self.cnn = timm.create_model(
            name, pretrained=False, features_only=True, in_chans=in_chans, **timm_kwargs
        )
        self.spatial_dims, self.in_chans = 2, in_chans
        self.feature_channels = list(self.cnn.feature_info.channels())
        self.feature_strides = list(self.cnn.feature_info.reduction())
        self.embed_dim = self.feature_channels[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[-1].mean(dim=(-2, -1))

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.cnn(x)


ENCODERS: dict[str, Callable[..., Encoder]] = {"vit2d": ViTEncoder, "cnn2d": CNNEncoder}


def create_encoder(family: str, **kwargs: Any) -> Encoder:
    """Build an encoder from a ``model`` config: ``create_encoder(**cfg.model)``."""
    if family not in ENCODERS:
        raise EmfmError(f"unknown encoder family {family!r}; expected one of {sorted(ENCODERS)}")
    try:
        return ENCODERS[family](**kwargs)
    except RuntimeError as err:  # timm's message for an unknown model name
        if "Unknown model" in str(err):
            raise EmfmError(f"model.name: {err}") from None
        raise

