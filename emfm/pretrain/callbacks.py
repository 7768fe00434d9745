"""Pictures of what the objective does, saved in the run directory and sent to the loggers."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchvision.utils import make_grid

from emfm.pictures import publish
from emfm.pretrain.base import PretrainModule

MIN_PANEL_PIXELS = 128


class ReconstructionImages(pl.Callback):
    """Every ``every_n_steps`` steps, a PNG grid of the module's ``visualize`` panels.

    One row per image (input / masked / reconstruction for masked modelling, the two augmented
    views for contrastive methods; the middle section of 3-D patches), on the same first training
    batch every time so the pictures show progress rather than different patches.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int = 200, num_images: int = 8) -> None:
        self.dirpath, self.every_n_steps, self.num_images = Path(dirpath), every_n_steps, num_images
        self.images: torch.Tensor | None = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object, batch: torch.Tensor,
        batch_idx: int,
    ) -> None:
        assert isinstance(pl_module, PretrainModule), "ReconstructionImages is a callback of emfm pretrain"
        if self.images is None:
            self.images = batch[: self.num_images].detach().clone()
        step = trainer.global_step
        if step == 1 or step % self.every_n_steps == 0 or step == trainer.max_steps:
            self.save(trainer, pl_module, step)

    def save(self, trainer: pl.Trainer, pl_module: PretrainModule, step: int) -> Path | None:
        images = self.images
        if not trainer.is_global_zero or images is None:
            return None
        was_training = pl_module.training
        pl_module.eval()
        panels = pl_module.visualize(images.to(pl_module.device))
        pl_module.train(was_training)
        if not panels:
            return None
        if images.ndim == 5:  # 3-D: show the middle section of every panel
            panels = {name: p[:, :, p.shape[2] // 2] for name, p in panels.items()}
        # Each image and its panels share one intensity range, so reconstructions are comparable.
        flat = images.flatten(1).to(pl_module.device)
        low, high = flat.amin(1).view(-1, 1, 1, 1), flat.amax(1).view(-1, 1, 1, 1)
        scaled = [((p.float() - low) / (high - low + 1e-6)).clamp(0, 1) for p in panels.values()]
        rows = torch.stack(scaled, dim=1).flatten(0, 1)  # (N * panels, 1, Y, X), one image per row
        zoom = max(1, MIN_PANEL_PIXELS // max(rows.shape[-2:]))
        rows = F.interpolate(rows, scale_factor=zoom, mode="nearest")  # small patches stay visible
        grid = make_grid(rows.cpu(), nrow=len(panels), padding=2, pad_value=1.0)
        return publish(trainer, grid, self.dirpath / f"step_{step:07d}.png", "reconstructions/" + "|".join(panels),
                       list(panels), f"step {step}: one row per image of the first training batch")

