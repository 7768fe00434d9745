"""What every pretraining method shares: the encoder, optimiser, schedule and logging.

A method subclasses :class:`PretrainModule` and implements ``compute_loss`` (and, to get pictures,
``visualize``). Arguments are primitives, so ``load_from_checkpoint`` rebuilds the module and the
checkpoint loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch

from emfm.errors import EmfmError
from emfm.models.encoders import create_encoder

# Parameters that are positions/tokens rather than weights: AdamW must not decay them.
NO_WEIGHT_DECAY = ("pos_embed", "cls_token", "reg_token", "mask_token")


def warmup_cosine(step: int, *, warmup: int, total: int, floor: float) -> float:
    """Learning-rate factor: linear warmup, then cosine decay to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class PretrainModule(pl.LightningModule):
    """Base LightningModule of the self-supervised objectives.

    Args:
        encoder: a ``model`` config (``family`` and that family's arguments).
        lr: peak learning rate after warmup.
        weight_decay: AdamW decay of weight matrices (norms, biases and tokens are not decayed).
        betas: AdamW betas.
        warmup_steps: linear warmup length in optimiser steps.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
    """

    def __init__(
        self,
        encoder: Mapping[str, Any],
        lr: float = 1.5e-4,
        weight_decay: float = 0.05,
        betas: Sequence[float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.01,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = create_encoder(**encoder)

    def compute_loss(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Objective on a batch: a dict with ``loss`` and any other scalars worth logging."""
        raise NotImplementedError

    def visualize(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named image panels, each like ``images``, showing what the method does (may be empty)."""
        return {}

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        out = self.compute_loss(batch)
        self.log("train/loss", out["loss"], prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in out.items() if k != "loss"})
        return out["loss"]

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        # A fixed random stream per batch: the same patches get the same masks/views every time,
        # so val/loss is comparable across the run and picks the best checkpoint.
        generator = torch.Generator(device=batch.device).manual_seed(batch_idx)
        out = self.compute_loss(batch, generator=generator)
        self.log("val/loss", out["loss"], prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        total = self.trainer.max_steps
        if total is None or total <= 0:
            raise EmfmError("trainer.max_steps must be set (> 0): the learning-rate schedule needs it")
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                skip = param.ndim <= 1 or name.split(".")[-1] in NO_WEIGHT_DECAY
                (no_decay if skip else decay).append(param)
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr, betas=tuple(hp.betas),
        )
        factor = partial(warmup_cosine, warmup=min(hp.warmup_steps, total), total=total, floor=hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
