"""SimCLR (Chen et al., 2020): two views of a patch attract, all other patches repel (NT-Xent)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from emfm.models.encoders import Encoder
from emfm.pretrain.base import register
from emfm.pretrain.contrastive import TwoViews, mlp, nt_xent


@register("simclr")
class SimCLR(TwoViews):
    """SimCLR objective.

    Args:
        encoder: any encoder; its global embedding is projected.
        proj_dim: size of the projected embedding the loss compares.
        hidden_dim: width of the projection MLP.
        temperature: softmax temperature of NT-Xent.
        augment, isotropic: see :class:`~emfm.pretrain.base.Objective` (the views' augmentations).
    """

    def __init__(
        self,
        encoder: Encoder,
        proj_dim: int = 128,
        hidden_dim: int = 2048,
        temperature: float = 0.2,
        augment: Mapping[str, Any] | None = None,
        isotropic: bool = False,
    ) -> None:
        super().__init__(encoder, augment, isotropic)
        self.temperature = temperature
        self.projector = mlp(encoder.embed_dim, hidden_dim, proj_dim, layers=2, last_bn=False)

    def forward(self, encoder: Encoder, images: torch.Tensor,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        first, second = self.views(images, generator)
        z = self.projector(encoder(torch.cat([first, second])))  # one pass: BN sees both views
        z1, z2 = z.chunk(2)
        loss, negatives = nt_xent(z1, z2, self.temperature)
        return {"loss": loss, "negatives": torch.tensor(float(negatives), device=loss.device)}
