"""MoCo v3 (Chen, Xie & He, 2021): a query predicts the momentum encoder's key of the other view.

The momentum (EMA) encoder gives slowly moving targets, the predictor breaks the symmetry, and
the loss is InfoNCE in both directions with the keys of every rank as negatives.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch

from emfm.models.encoders import Encoder
from emfm.pretrain.base import register
from emfm.pretrain.contrastive import TwoViews, info_nce, mlp


@register("mocov3")
class MoCoV3(TwoViews):
    """MoCo v3 objective.

    Args:
        encoder: any encoder; its global embedding is projected.
        proj_dim: size of the embedding the loss compares.
        hidden_dim: width of the projector and predictor MLPs.
        temperature: softmax temperature of InfoNCE.
        momentum: EMA factor at the start; it rises to 1 along a cosine over training.
        augment, isotropic: see :class:`~emfm.pretrain.base.Objective` (the views' augmentations).
    """

    def __init__(
        self,
        encoder: Encoder,
        proj_dim: int = 256,
        hidden_dim: int = 2048,
        temperature: float = 0.2,
        momentum: float = 0.99,
        augment: Mapping[str, Any] | None = None,
        isotropic: bool = False,
    ) -> None:
        super().__init__(encoder, augment, isotropic)
        self.temperature, self.base_momentum = temperature, momentum
        self.projector = mlp(encoder.embed_dim, hidden_dim, proj_dim, layers=3, last_bn=True)
        self.predictor = mlp(proj_dim, hidden_dim, proj_dim, layers=2, last_bn=False)
        self.momentum_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)

    @torch.no_grad()
    def before_step(self, encoder: Encoder, progress: float) -> None:
        momentum = 1 - (1 - self.base_momentum) * (math.cos(math.pi * progress) + 1) / 2
        for online, target in [(encoder, self.momentum_encoder), (self.projector, self.momentum_projector)]:
            torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1 - momentum)

    def forward(self, encoder: Encoder, images: torch.Tensor,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        views = torch.cat(self.views(images, generator))
        queries = self.predictor(self.projector(encoder(views))).chunk(2)
        with torch.no_grad():
            keys = self.momentum_projector(self.momentum_encoder(views)).chunk(2)
        loss_12, negatives = info_nce(queries[0], keys[1], self.temperature)
        loss_21, _ = info_nce(queries[1], keys[0], self.temperature)
        return {"loss": loss_12 + loss_21, "negatives": torch.tensor(float(negatives), device=loss_12.device)}
