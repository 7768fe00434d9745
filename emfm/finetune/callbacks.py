"""A picture of the segmenter on a held-out slice at every validation: raw | truth | prediction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torchvision.utils import make_grid

from emfm.data.targets import IGNORE
from emfm.finetune.segmentation import SegmentationModule
from emfm.pictures import publish

MAX_CHANNELS = 3   # affinity targets have many channels; the first few tell the story


def panels(image: torch.Tensor, truth: torch.Tensor, probs: torch.Tensor,
           softmax: bool) -> tuple[torch.Tensor, list[str]]:
    """(P, 1, Y, X) panels in [0, 1] and their titles: the raw image, then truth and probability per shown channel
    (classes 1.. of a softmax target, channels 0.. of the others).

    ``image`` (1, *spatial), ``truth`` a class map (*spatial) for softmax targets or (C, *spatial),
    ``probs`` (K, *spatial); 3-D regions show their middle section. Unknown truth is grey.
    """
    if probs.ndim == 4:
        middle = probs.shape[1] // 2
        image, probs = image[:, middle], probs[:, middle]
        truth = truth[middle] if softmax else truth[:, middle]
    shown = list(range(1, probs.shape[0]) if softmax else range(probs.shape[0]))[:MAX_CHANNELS]
    if softmax:
        truth = torch.stack([(truth == c).float() for c in shown]).masked_fill(truth == IGNORE, 0.5)
    else:
        truth = truth[shown].float().masked_fill(truth[shown] == IGNORE, 0.5)
    low, high = torch.quantile(image.float().flatten()[:1_000_000], torch.tensor([0.01, 0.99]))
    raw = ((image.float() - low) / (high - low).clamp(min=1e-6)).clamp(0, 1)
    name = "class" if softmax else "channel"
    titles = ["raw", *(f"truth {name} {c}" for c in shown), *(f"probability {name} {c}" for c in shown)]
    return torch.cat([raw, truth, probs[shown].float()]).unsqueeze(1).cpu(), titles


class PredictionImages(pl.Callback):
    """Saves ``predictions/step_N.png`` for the first validation region and sends it to the loggers."""

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx != 0 or not trainer.is_global_zero or trainer.sanity_checking or outputs is None:
            return
        assert isinstance(pl_module, SegmentationModule), "PredictionImages is a callback of emfm finetune"
        truth = pl_module.target(batch["labels"])[0]
        sheet, titles = panels(batch["image"], truth, outputs, pl_module.target.loss == "softmax")
        grid = make_grid(sheet, nrow=len(sheet), padding=4, pad_value=1.0)
        step = trainer.global_step
        publish(trainer, grid, self.dirpath / f"step_{step:07d}.png", "predictions/raw|truth|probs", titles,
                f"step {step}: the first validation region")
