"""What the contrastive methods share: two views, projection heads, and negatives from every rank.

Contrastive losses get better with more negatives, so under DDP each rank compares its queries
with the keys of all ranks. The gather keeps gradients: a rank's loss also pushes the other
ranks' embeddings apart, as a single large batch would.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from emfm.models.encoders import Encoder
from emfm.pretrain.base import Objective


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # all-reduce rather than reduce-scatter: gloo has no reduce-scatter
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(rows of every rank concatenated in rank order, offset of this rank's rows)."""
    if not distributed():
        return x, 0
    return _GatherWithGrad.apply(x), dist.get_rank() * x.shape[0]


def info_nce(query: torch.Tensor, key: torch.Tensor, temperature: float) -> tuple[torch.Tensor, int]:
    """InfoNCE of each query against its own key and every other key of every rank.

    Returns the loss (scaled by ``2 * temperature`` as in MoCo v3) and the number of negatives
    per query.
    """
    query, key = F.normalize(query.float(), dim=1), F.normalize(key.float(), dim=1)
    keys, offset = gather(key)
    logits = query @ keys.T / temperature  # (N, N * world)
    labels = torch.arange(query.shape[0], device=query.device) + offset
    return 2 * temperature * F.cross_entropy(logits, labels), keys.shape[0] - 1


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> tuple[torch.Tensor, int]:
    """SimCLR's normalised-temperature cross entropy over both views of every rank's batch.

    Each embedding's positive is the other view of its patch; all other embeddings (2N * world - 2)
    are negatives. Returns the loss and that number of negatives.
    """
    n = z1.shape[0]
    local = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2N, D): views 1 then views 2
    everyone, offset = gather(local)  # (2N * world, D), this rank's block at `offset`
    logits = local @ everyone.T / temperature
    rows = torch.arange(2 * n, device=local.device)
    logits[rows, rows + offset] = float("-inf")  # not its own negative
    positives = (rows + n) % (2 * n) + offset
    return F.cross_entropy(logits, positives), everyone.shape[0] - 2


def mlp(in_dim: int, hidden_dim: int, out_dim: int, layers: int, last_bn: bool) -> nn.Sequential:
    """Projection/prediction MLP with BatchNorm (synchronised across ranks under DDP)."""
    blocks: list[nn.Module] = []
    for i in range(layers):
        last = i == layers - 1
        blocks.append(nn.Linear(in_dim if i == 0 else hidden_dim, out_dim if last else hidden_dim, bias=False))
        if not last:
            blocks += [nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        elif last_bn:
            blocks.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*blocks)


class TwoViews(Objective):
    """Base of the contrastive methods: two augmented views of the same patches."""

    def views(self, images: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.augment(images, generator), self.augment(images, generator)

    def visualize(self, encoder: Encoder, images: torch.Tensor) -> dict[str, torch.Tensor]:
        first, second = self.views(images, torch.Generator(device=images.device).manual_seed(0))
        return {"input": images, "view 1": first, "view 2": second}
