"""Masked autoencoder (He et al., 2022) on a ViT encoder.

Hide most patch tokens, run the encoder on the visible ones only, and let a small transformer
decoder predict the hidden patches' (per-patch normalised) pixels. The loss counts hidden patches
only, so the encoder cannot win by copying what it sees.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import nn

from emfm.errors import EmfmError
from emfm.models.encoders import ViTEncoder
from emfm.models.layers import sincos_pos_embed
from emfm.pretrain.base import PretrainModule
from emfm.pretrain.masking import patchify, random_masking, unpatchify


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over hidden patches only: (N, L, P) predictions, (N, L) mask."""
    per_patch = (pred.float() - target.float()).pow(2).mean(-1)  # (N, L)
    return (per_patch * mask).sum() / mask.sum()


class MAE(PretrainModule):
    """Masked autoencoder objective.

    Args:
        encoder: a ViT ``model`` config.
        mask_ratio: fraction of patch tokens hidden from the encoder.
        decoder_dim: width of the light decoder.
        decoder_depth: transformer blocks in the decoder.
        decoder_heads: attention heads in the decoder.
        norm_pix_loss: predict each patch's pixels normalised by that patch's mean and std.
        **kwargs: optimiser settings of :class:`PretrainModule`.
    """

    def __init__(
        self,
        encoder: dict[str, Any],
        mask_ratio: float = 0.75,
        decoder_dim: int = 256,
        decoder_depth: int = 4,
        decoder_heads: int = 8,
        norm_pix_loss: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(encoder, **kwargs)
        if not isinstance(self.encoder, ViTEncoder):
            raise EmfmError(
                f"objective=mae drops tokens and needs a ViT encoder (model=vit2d); "
                f"got model.family={encoder['family']!r}"
            )
        if not 0.0 < mask_ratio < 1.0:
            raise EmfmError(f"objective.mask_ratio must be in (0, 1), got {mask_ratio}")
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        enc = self.encoder
        self.decoder_embed = nn.Linear(enc.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # Fixed sine-cosine positions, as in MAE: the mask tokens differ only by position.
        self.register_buffer(
            "decoder_pos_embed", sincos_pos_embed(enc.grid_size, decoder_dim)[None], persistent=False
        )  # (1, L, Dd)
        self.decoder_blocks = nn.Sequential(
            *[Block(decoder_dim, decoder_heads, mlp_ratio=4.0) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, math.prod(enc.patch_size) * enc.in_chans)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward_encoder(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Encode only the visible tokens: (N, P + L_keep, D), prefix tokens first."""
        enc = self.encoder
        tokens = enc.embed_tokens(images)  # (N, P + L, D)
        prefix, patches = tokens[:, : enc.num_prefix_tokens], tokens[:, enc.num_prefix_tokens :]
        visible = patches.gather(1, keep[..., None].expand(-1, -1, patches.shape[-1]))  # (N, L_keep, D)
        return enc.run_blocks(torch.cat([prefix, visible], dim=1))

    def forward_decoder(self, latent: torch.Tensor, keep: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """Predict pixels for every token position: (N, L, prod(patch) * C)."""
        x = self.decoder_embed(latent[:, self.encoder.num_prefix_tokens :])  # (N, L_keep, Dd)
        n, _, dim = x.shape
        full = self.mask_token.expand(n, n_tokens, dim).clone()  # (N, L, Dd)
        full.scatter_(1, keep[..., None].expand(-1, -1, dim), x)
        x = self.decoder_blocks(full + self.decoder_pos_embed)
        return self.decoder_pred(self.decoder_norm(x))

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """What the decoder must predict: (N, L, prod(patch) * C)."""
        target = patchify(images, self.encoder.patch_size)
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        return target

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask, encode, decode: returns (prediction (N, L, p*C), mask (N, L) True = hidden)."""
        n_tokens = math.prod(self.encoder.grid_size)
        keep, mask = random_masking(
            images.shape[0], n_tokens, self.mask_ratio, device=images.device, generator=generator
        )
        pred = self.forward_decoder(self.forward_encoder(images, keep), keep, n_tokens)
        return pred, mask

    def compute_loss(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        pred, mask = self(images, generator)
        return {"loss": masked_mse(pred, self.target(images), mask)}

    @torch.no_grad()
    def visualize(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        generator = torch.Generator(device=images.device).manual_seed(0)
        pred, mask = self(images, generator)
        patch, grid = self.encoder.patch_size, self.encoder.grid_size
        pixels = patchify(images, patch)
        if self.norm_pix_loss:  # back to image intensities with each patch's own statistics
            pred = pred * (pixels.var(-1, keepdim=True) + 1e-6).sqrt() + pixels.mean(-1, keepdim=True)
        hidden = mask[..., None].to(pixels.dtype)
        floor = images.amin()
        return {
            "input": images,
            "masked": unpatchify(pixels * (1 - hidden) + floor * hidden, patch, grid),
            "reconstruction": unpatchify(pixels * (1 - hidden) + pred * hidden, patch, grid),
        }
