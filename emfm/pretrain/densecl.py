"""Dense contrastive learning in the style of DenseCL (Wang et al., CVPR 2021): a vector per location.

MoCo v3 and SimCLR learn one vector per patch, while segmentation reads one per location. Here two
views of a patch are also compared cell by cell on a feature map: the projected feature of each
cell must pick out the cell of the other view that shows the same tissue among every cell of
every patch of every rank (a dense InfoNCE). A global SimCLR term on the pooled deepest map keeps
the patch-level signal; the loss is ``(1 - dense_weight) * global + dense_weight * dense``, as in
DenseCL. The dense projection head is 1x1 convolutions on the map, the global one SimCLR's MLP
on the pooled map.

Where this departs from DenseCL, and why:

- Correspondence is known, not guessed. DenseCL pairs cells by the similarity of their backbone
  features, which are random at the start of a run. Here the views' augmentation also warps a map
  of pixel coordinates (as a label map, nearest neighbour), so each cell knows which pixels of the
  original patch it shows; its positive is the other view's cell nearest to it in the original
  patch, if within ``radius`` cells. Cells the other view does not show (after a crop) have no
  positive and are left out of the loss.
- Negatives are the other cells, of this patch and of every patch of every rank, gathered with
  gradients (PixContrast in Xie et al., CVPR 2021), instead of a queue of pooled features of other
  images: membrane and cytoplasm inside one patch are what segmentation must tell apart.
- No momentum encoder: keys carry gradients, as in SimCLR, so a step needs no second network.

The dense logits are (N·L) x (N·L·world) for L cells per patch: 8192 x 8192 (0.27 GB in float32)
for batch 32 on a 16x16 grid. A CNN can use a coarser ``feature_map``; a ViT needs a smaller batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from emfm.errors import EmfmError
from emfm.models.encoders import Encoder
from emfm.models.layers import conv_nd
from emfm.pretrain.base import register
from emfm.pretrain.contrastive import TwoViews, distributed, gather, mlp, nt_xent


def dense_info_nce(
    query: torch.Tensor, key: torch.Tensor, positive: torch.Tensor, valid: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, int]:
    """InfoNCE of each valid query row against key row ``positive`` among the keys of every rank.

    Args:
        query, key: (M, D) embeddings of this rank's cells.
        positive: (M,) index of each query's positive among this rank's key rows.
        valid: (M,) whether a query has a positive at all; the others are left out.
        temperature: softmax temperature.

    Returns:
        The mean over the valid queries of every rank, times the world size: DDP averages the
        ranks' gradients, so their mean is then exactly the full batch's loss, however the valid
        queries are spread over ranks. Also the number of negatives per query.
    """
    query, key = F.normalize(query.float(), dim=1), F.normalize(key.float(), dim=1)
    keys, offset = gather(key)
    logits = query @ keys.T / temperature  # (M, M * world)
    per_query = F.cross_entropy(logits, positive + offset, reduction="none")  # (M,)
    valid = valid.to(per_query.dtype)
    count, world = valid.sum().detach(), 1
    if distributed():
        dist.all_reduce(count)
        world = dist.get_world_size()
    return world * (per_query * valid).sum() / count.clamp(min=1), keys.shape[0] - 1


def cell_positions(where: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Where in the original patch each cell of a map on ``grid`` lies, in cells: (N, L, d).

    ``where`` (N, d, *S) holds, for each pixel of a view, the original pixel it shows; a cell's
    position is the mean over its pixels, divided by the cell size of the unaugmented map.
    """
    cell = torch.tensor([s / g for s, g in zip(where.shape[2:], grid)], device=where.device)
    if len(grid) == 2:
        pooled = F.adaptive_avg_pool2d(where.float(), (grid[0], grid[1]))
    else:
        pooled = F.adaptive_avg_pool3d(where.float(), (grid[0], grid[1], grid[2]))
    return pooled.flatten(2).transpose(1, 2) / cell  # (N, L, d)


def match_cells(sources: torch.Tensor, others: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For each cell of one view, the other view's cell nearest to it in the original patch.

    Args:
        sources, others: (N, L, d) positions of each view's cells (:func:`cell_positions`).
        radius: largest distance, in those cells, that still counts as the same place.

    Returns:
        index (N, L) of the nearest cell in ``others``, and valid (N, L): it lies within ``radius``.
    """
    distance, index = torch.cdist(sources, others).min(-1)  # (N, L)
    return index, distance <= radius


@register("densecl")
class DenseCL(TwoViews):
    """Dense contrastive objective: a global and a per-cell InfoNCE between two views.

    Args:
        encoder: any encoder; its ``forward_features`` maps are what is trained.
        proj_dim: size of the projected embeddings (global and per cell).
        hidden_dim: width of the projection heads.
        temperature: softmax temperature of both InfoNCE terms.
        dense_weight: share of the dense term in the loss (DenseCL's 0.5); the rest is the global one.
        feature_map: which of the encoder's ``forward_features`` maps the dense term reads (-1:
            the deepest; a CNN's earlier maps are finer, a ViT's are all at the patch grid).
        radius: cells of two views are the same place when they lie this close in the original
            patch, in cells of the unaugmented map. 1.0 keeps every cell that both views show
            (crops only zoom in, so the nearest centre is at most half a cell's diagonal away)
            and a rim just beyond their overlap.
        augment, isotropic: see :class:`~emfm.pretrain.base.Objective` (the views' augmentations;
            any geometry works, the correspondence follows it).
    """

    def __init__(
        self,
        encoder: Encoder,
        proj_dim: int = 128,
        hidden_dim: int = 2048,
        temperature: float = 0.2,
        dense_weight: float = 0.5,
        feature_map: int = -1,
        radius: float = 1.0,
        augment: Mapping[str, Any] | None = None,
        isotropic: bool = False,
    ) -> None:
        super().__init__(encoder, augment, isotropic)
        maps = len(encoder.feature_channels)
        if not -maps <= feature_map < maps:
            raise EmfmError(f"objective.methods.densecl.feature_map={feature_map}: "
                            f"model.family={encoder.family} has {maps} feature maps (index -{maps}..{maps - 1})")
        if not 0.0 <= dense_weight <= 1.0:
            raise EmfmError(f"objective.methods.densecl.dense_weight must be in [0, 1], got {dense_weight}")
        if radius <= 0:
            raise EmfmError(f"objective.methods.densecl.radius must be > 0, got {radius}")
        self.temperature, self.dense_weight = temperature, dense_weight
        self.feature_map, self.radius = feature_map, radius
        dims = encoder.spatial_dims
        self.projector = mlp(encoder.feature_channels[-1], hidden_dim, proj_dim, layers=2, last_bn=False)
        self.dense_projector = nn.Sequential(
            conv_nd(dims, encoder.feature_channels[feature_map], hidden_dim, 1),
            nn.ReLU(inplace=True),
            conv_nd(dims, hidden_dim, proj_dim, 1),
        )

    def located_views(
        self, images: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both views (2N, C, *S), and where in ``images`` each of their pixels comes from (2N, d, *S)."""
        n, spatial = images.shape[0], images.shape[2:]
        axes = [torch.arange(s, device=images.device) for s in spatial]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij")).expand(n, len(spatial), *spatial)  # (N, d, *S)
        first, where_first = self.augment(images, generator, labels=coords)
        second, where_second = self.augment(images, generator, labels=coords)
        return torch.cat([first, second]), torch.cat([where_first, where_second])

    def forward(self, encoder: Encoder, images: torch.Tensor,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        views, where = self.located_views(images, generator)
        maps = encoder.forward_features(views)  # one pass: BatchNorm sees both views
        pooled = maps[-1].flatten(2).mean(-1)  # (2N, C): the deepest map serves both terms
        z1, z2 = self.projector(pooled).chunk(2)
        global_loss, _ = nt_xent(z1, z2, self.temperature)

        dense = self.dense_projector(maps[self.feature_map])  # (2N, D, *grid)
        positions = cell_positions(where, dense.shape[2:])  # (2N, L, d)
        cells = dense.flatten(2).transpose(1, 2)  # (2N, L, D)
        n, length = images.shape[0], cells.shape[1]
        row = torch.arange(n, device=dense.device)[:, None] * length  # (N, 1): each patch's first row
        terms, matched = [], []
        for q, k in [(slice(0, n), slice(n, 2 * n)), (slice(n, 2 * n), slice(0, n))]:  # both directions
            index, valid = match_cells(positions[q], positions[k], self.radius)  # (N, L) each
            loss, negatives = dense_info_nce(cells[q].flatten(0, 1), cells[k].flatten(0, 1),
                                             (row + index).flatten(), valid.flatten(), self.temperature)
            terms.append(loss)
            matched.append(valid.float().mean())
        dense_loss = (terms[0] + terms[1]) / 2
        return {
            "loss": (1 - self.dense_weight) * global_loss + self.dense_weight * dense_loss,
            "global": global_loss.detach(),
            "dense": dense_loss.detach(),
            "matched": (matched[0] + matched[1]).detach() / 2,
            "negatives": torch.tensor(float(negatives), device=dense_loss.device),
        }
