"""Pictures a run leaves behind: a PNG in the run directory, the same image in TensorBoard / W&B."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torchvision.utils import save_image


def publish(trainer: pl.Trainer, grid: torch.Tensor, path: Path, tag: str) -> Path:
    """Save a (C, H, W) image grid as PNG and send it to the TensorBoard / W&B loggers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, grid, global_step=trainer.global_step)
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=tag, images=[grid], step=trainer.global_step)
    return path
