"""Online dense probe: is the encoder getting useful for segmentation while it pretrains?

Every N steps, a per-pixel linear classifier on the frozen encoder's feature maps (all scales) of
a small labeled crop is fitted on half of the crop's tiles and scored (IoU, Dice) on the other
half. Cheap enough to run during training, and a direct answer to the question users care
about, which the pretraining loss is not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from emfm.blockwise.grid import parse_roi
from emfm.data.volume import Volume
from emfm.errors import EmfmError
from emfm.models.masking import patchify, unpatchify
from emfm.pretrain.base import PretrainModule


def tiles(array: np.ndarray, tile: Sequence[int]) -> np.ndarray:
    """Non-overlapping tiles of the trailing axes, (T, *tile); leading axes become tiles too."""
    array = array.reshape(-1, *array.shape[array.ndim - len(tile):])  # (P, *S)
    whole = tuple(slice(0, s - s % t) for s, t in zip(array.shape[1:], tile))  # drop partial tiles
    cells = patchify(torch.from_numpy(np.ascontiguousarray(array[(slice(None), *whole)]))[:, None], tuple(tile))
    return cells.reshape(-1, *tile).numpy()


def iou_dice(pred: torch.Tensor, truth: torch.Tensor, classes: int) -> tuple[float, float]:
    """Mean IoU and Dice over the foreground classes 1..classes-1 (class 0 is background)."""
    ious, dices = [], []
    for c in range(1, classes):
        p, t = pred == c, truth == c
        inter, total = (p & t).sum().item(), p.sum().item() + t.sum().item()
        if total:
            ious.append(inter / (total - inter))
            dices.append(2 * inter / total)
    return (float(np.mean(ious)), float(np.mean(dices))) if ious else (float("nan"), float("nan"))


class LinearDecoder(torch.nn.Module):
    """Per-pixel class logits that are a linear function of all feature maps.

    Each map's cell predicts the logits of its ``stride`` block of pixels (a 1x1 convolution
    followed by a pixel shuffle), and the scales are summed: linear like a 1x1 probe, but able to
    place a thin membrane inside a 16-pixel ViT token, which upsampling the features cannot.
    """

    def __init__(self, channels: Sequence[int], strides: Sequence[tuple[int, ...]], classes: int) -> None:
        super().__init__()
        self.strides, self.classes = list(strides), classes
        self.heads = torch.nn.ModuleList(torch.nn.Linear(c, classes * math.prod(s)) for c, s in zip(channels, strides))

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        logits = []
        for head, stride, fmap in zip(self.heads, self.strides, maps):
            cells = head(fmap.movedim(1, -1).flatten(1, -2))  # (T, L, K * prod(stride))
            logits.append(unpatchify(cells, stride, tuple(fmap.shape[2:])))  # (T, K, *tile)
        return torch.stack(logits).sum(0)


class DenseProbe(pl.Callback):
    """Linear per-pixel probe on frozen features of a small labeled crop, logged as ``probe/iou|dice``.

    Args:
        raw: raw zarr / OME-Zarr volume.
        labels: label volume of the same shape (0 = background).
        roi: crop of both, ``"z0:z1,y0:y1,x0:x1"`` (``None``: whole volumes, keep them small).
        classes: label values that are classes 1..K (others count as background); ``None``: label > 0.
        every_n_steps: probe interval in optimiser steps (also at the start and the end).
        fit_steps: full-batch Adam steps fitting the linear decoder.
        lr: its learning rate.
    """

    def __init__(
        self,
        raw: str | Path,
        labels: str | Path,
        roi: str | None = None,
        classes: Sequence[int] | None = None,
        every_n_steps: int = 500,
        fit_steps: int = 100,
        lr: float = 0.01,
    ) -> None:
        self.raw_path, self.label_path, self.roi = Path(raw), Path(labels), roi
        self.classes = None if classes is None else [int(c) for c in classes]
        self.every_n_steps, self.fit_steps, self.lr = every_n_steps, fit_steps, lr
        self.num_classes = 1 + (len(self.classes) if self.classes else 1)
        self.history: list[dict[str, float]] = []
        self.tiles: tuple[torch.Tensor, torch.Tensor] | None = None

    def load(self, input_shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The crop cut into encoder-sized tiles: (images, class indices), read once."""
        if self.tiles is not None:
            return self.tiles
        raw, labels = Volume(self.raw_path), Volume(self.label_path)
        if raw.shape != labels.shape:
            raise EmfmError(f"probe: {self.label_path} has shape {list(labels.shape)}, "
                            f"but {self.raw_path} has {list(raw.shape)}")
        region = parse_roi(self.roi, raw.shape, "callbacks.dense_probe.roi")
        label_crop = np.asarray(labels.read(region))
        target = np.zeros(label_crop.shape, dtype=np.int64)
        if self.classes is None:
            target[label_crop > 0] = 1
        for index, value in enumerate(self.classes or [], start=1):
            target[label_crop == value] = index
        images, targets = tiles(raw.normalize(raw.read(region)), input_shape), tiles(target, input_shape)
        if len(images) < 2:
            raise EmfmError(f"probe: the crop {[s.stop - s.start for s in region]} holds fewer than two "
                            f"{list(input_shape)} tiles; one is needed to fit and one to score")
        self.tiles = torch.from_numpy(images)[:, None], torch.from_numpy(targets)
        return self.tiles

    @torch.no_grad()
    def features(self, pl_module: PretrainModule, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen encoder's maps of every tile, one (T, C_i, *grid_i) tensor per scale."""
        was_training = pl_module.training
        pl_module.eval()
        maps = [pl_module.encoder.forward_features(image.to(pl_module.device)) for image in images.split(8)]
        pl_module.train(was_training)
        return [torch.cat([m[i].float().cpu() for m in maps]) for i in range(len(maps[0]))]

    def probe(self, pl_module: PretrainModule) -> dict[str, float]:
        """Fit the linear decoder on the even tiles, score it on the odd ones."""
        images, targets = self.load(pl_module.encoder.input_shape)
        maps = self.features(pl_module, images)
        strides = [tuple(t // g for t, g in zip(images.shape[2:], m.shape[2:])) for m in maps]
        # Standardised channels: one learning rate fits every encoder.
        stats = [(m[0::2].mean((0, *range(2, m.ndim)), keepdim=True),
                  m[0::2].std((0, *range(2, m.ndim)), keepdim=True) + 1e-6) for m in maps]
        maps = [(m - mean) / std for m, (mean, std) in zip(maps, stats)]
        decoder = LinearDecoder([m.shape[1] for m in maps], strides, self.num_classes)
        fit_y = targets[0::2]
        counts = torch.bincount(fit_y.flatten(), minlength=self.num_classes).float()
        weight = counts.sum() / (self.num_classes * counts.clamp(min=1))  # thin membranes matter
        optimizer = torch.optim.Adam(decoder.parameters(), lr=self.lr)
        fit = [m[0::2] for m in maps]
        with torch.enable_grad():
            for _ in range(self.fit_steps):
                loss = F.cross_entropy(decoder(fit), fit_y, weight=weight)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            pred = decoder([m[1::2] for m in maps]).argmax(1)
        iou, dice = iou_dice(pred, targets[1::2], self.num_classes)
        return {"probe/iou": iou, "probe/dice": dice}

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert isinstance(pl_module, PretrainModule), "DenseProbe is a callback of emfm pretrain"
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        if self.history and self.history[-1]["step"] == step:
            return
        metrics = self.probe(pl_module)
        self.history.append({"step": step, **metrics})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        rank_zero_info(f"step {step}: probe IoU {metrics['probe/iou']:.3f}, Dice {metrics['probe/dice']:.3f}")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.run(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object, batch: object,
                           batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0 or trainer.global_step == trainer.max_steps:
            self.run(trainer, pl_module)
