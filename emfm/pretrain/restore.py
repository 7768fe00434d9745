"""Whole-network pretraining by restoration: the segmentation network itself learns to repair EM.

With one or two labelled slices, the decoder of a U-Net / UNETR is a large part of what
fine-tuning has to learn, and encoder-only pretraining leaves it random. Here the encoder *and*
the decoder that fine-tuning will use (``head``, the same config as ``emfm finetune``'s) are
trained to restore corrupted patches: cells of ``mask_patch`` voxels are hidden behind noise
(in-painting, as in Models Genesis) and every voxel may get Gaussian noise (denoising, as in
decoder denoising pretraining). ``emfm finetune init=CKPT`` then inherits both; only the 1x1
output layer starts fresh. ``semi=restore`` keeps the same task on unlabeled patches while
fine-tuning.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from emfm.errors import EmfmError
from emfm.models.encoders import Encoder
from emfm.models.heads import SegmentationHead, create_head
from emfm.pretrain.base import Objective, register
from emfm.restoration import Corruption, restoration_loss


@register("restore")
class Restore(Objective):
    """Restoration objective on an encoder + segmentation decoder.

    Args:
        encoder: any encoder.
        head: a ``head`` config (``name`` and options; not ``linear``), as fine-tuning will use.
        augment, isotropic: see :class:`~emfm.pretrain.base.Objective`.
        **corruption: :class:`Corruption` settings (mask_ratio, mask_patch, noise_std, visible_weight).
    """

    def __init__(self, encoder: Encoder, head: Mapping[str, Any] | None = None,
                 augment: Mapping[str, Any] | None = None, isotropic: bool = False, **corruption: Any) -> None:
        super().__init__(encoder, augment, isotropic)
        head = dict(head or {"name": "auto"})
        if head.get("name") == "linear":
            raise EmfmError("objective.methods.restore.head.name=linear has no decoder to pretrain; use unet or unetr")
        self.head: SegmentationHead = create_head(encoder=encoder, out_channels=encoder.in_chans, **head)
        self.corruption = Corruption(encoder.input_shape, key="objective.methods.restore", **corruption)

    def restore(self, encoder: Encoder, corrupted: torch.Tensor) -> torch.Tensor:
        return self.head(corrupted, encoder.forward_features(corrupted))

    def forward(self, encoder: Encoder, images: torch.Tensor,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        images = self.augment(images, generator)
        corrupted, weight = self.corruption(images, generator)
        return {"loss": restoration_loss(self.restore(encoder, corrupted), images, weight)}

    def visualize(self, encoder: Encoder, images: torch.Tensor) -> dict[str, torch.Tensor]:
        corrupted, _ = self.corruption(images, torch.Generator(device=images.device).manual_seed(0))
        return {"input": images, "corrupted": corrupted, "restored": self.restore(encoder, corrupted)}
