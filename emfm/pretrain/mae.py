"""Masked autoencoder (He et al., 2022) on a 2-D or 3-D ViT encoder.

Hide most patch tokens, run the encoder on the visible ones only, and let a small transformer
decoder predict the hidden patches' (optionally per-patch normalised) pixels. The loss counts
hidden patches only, so the encoder cannot win by copying what it sees.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import nn

from emfm.errors import EmfmError
from emfm.models.encoders import Encoder, ViTEncoder
from emfm.models.layers import sincos_pos_embed
from emfm.models.masking import (
    masked_mse,
    pixel_target,
    random_masking,
    reconstruction_panels,
    tube_masking,
)
from emfm.pretrain.base import Objective, register


@register("mae")
class MAE(Objective[ViTEncoder]):
    """Masked autoencoder objective.

    Args:
        encoder: a ViT encoder (``model=vit2d`` or ``vit3d``).
        mask_ratio: fraction of patch tokens hidden from the encoder.
        masking: ``random`` tokens, or ``tube`` (3-D: the same (Y, X) tokens in every z-plane).
        decoder_dim: width of the light decoder.
        decoder_depth: transformer blocks in the decoder.
        decoder_heads: attention heads in the decoder.
        norm_pix_loss: predict each patch's pixels normalised by that patch's mean and std.
        augment, isotropic: see :class:`~emfm.pretrain.base.Objective`.
    """

    decoder_pos_embed: torch.Tensor  # fixed sine-cosine positions, a buffer

    def __init__(
        self,
        encoder: Encoder,
        mask_ratio: float = 0.75,
        masking: str = "random",
        decoder_dim: int = 256,
        decoder_depth: int = 4,
        decoder_heads: int = 8,
        norm_pix_loss: bool = True,
        augment: Mapping[str, Any] | None = None,
        isotropic: bool = False,
    ) -> None:
        super().__init__(encoder, augment, isotropic)
        if not isinstance(encoder, ViTEncoder):
            raise EmfmError(
                f"objective=mae drops tokens and needs a ViT encoder (model=vit2d or vit3d); "
                f"got {type(encoder).__name__}: use objective=mim for CNNs"
            )
        if not 0.0 < mask_ratio < 1.0:
            raise EmfmError(f"objective mask_ratio must be in (0, 1), got {mask_ratio}")
        if masking not in ("random", "tube"):
            raise EmfmError(f"objective masking must be 'random' or 'tube', got {masking!r}")
        self.mask_ratio, self.masking, self.norm_pix_loss = mask_ratio, masking, norm_pix_loss
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # Fixed sine-cosine positions, as in MAE: the mask tokens differ only by position.
        self.register_buffer(
            "decoder_pos_embed", sincos_pos_embed(encoder.grid_size, decoder_dim)[None], persistent=False
        )  # (1, L, Dd)
        self.decoder_blocks = nn.Sequential(
            *[Block(decoder_dim, decoder_heads, mlp_ratio=4.0) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, math.prod(encoder.patch_size) * encoder.in_chans)
        nn.init.normal_(self.mask_token, std=0.02)

    def mask(self, encoder: ViTEncoder, batch: int, device: torch.device,
             generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(visible token indices (N, L_keep), mask (N, L) True = hidden)."""
        grid = encoder.grid_size
        if self.masking == "tube" and len(grid) == 3:
            return tube_masking(batch, grid, self.mask_ratio, device=device, generator=generator)
        return random_masking(batch, math.prod(grid), self.mask_ratio, device=device, generator=generator)

    def encode_visible(self, encoder: ViTEncoder, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Encode only the visible tokens: (N, P + L_keep, D), prefix tokens first."""
        tokens = encoder.embed_tokens(images)  # (N, P + L, D)
        prefix, patches = tokens[:, : encoder.num_prefix_tokens], tokens[:, encoder.num_prefix_tokens :]
        visible = patches.gather(1, keep[..., None].expand(-1, -1, patches.shape[-1]))  # (N, L_keep, D)
        return encoder.run_blocks(torch.cat([prefix, visible], dim=1))

    def decode(self, latent: torch.Tensor, keep: torch.Tensor, n_prefix: int) -> torch.Tensor:
        """Predict pixels for every token position: (N, L, prod(patch) * C)."""
        x = self.decoder_embed(latent[:, n_prefix:])  # (N, L_keep, Dd)
        n, _, dim = x.shape
        full = self.mask_token.expand(n, self.decoder_pos_embed.shape[1], dim).clone()  # (N, L, Dd)
        full.scatter_(1, keep[..., None].expand(-1, -1, dim), x.to(full.dtype))
        x = self.decoder_blocks(full + self.decoder_pos_embed)
        return self.decoder_pred(self.decoder_norm(x))

    def predict(self, encoder: ViTEncoder, images: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask, encode, decode: (prediction (N, L, prod(patch) * C), mask (N, L))."""
        keep, mask = self.mask(encoder, images.shape[0], images.device, generator)
        latent = self.encode_visible(encoder, images, keep)
        return self.decode(latent, keep, encoder.num_prefix_tokens), mask

    def forward(self, encoder: ViTEncoder, images: torch.Tensor,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        images = self.augment(images, generator)
        pred, mask = self.predict(encoder, images, generator)
        target = pixel_target(images, encoder.patch_size, self.norm_pix_loss)
        return {"loss": masked_mse(pred, target, mask)}

    def visualize(self, encoder: ViTEncoder, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pred, mask = self.predict(encoder, images, torch.Generator(device=images.device).manual_seed(0))
        return reconstruction_panels(images, pred, mask, encoder.patch_size, self.norm_pix_loss)
