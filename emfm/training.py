"""Trainer pieces shared by every command: the optimiser and its schedule, atomic checkpoints, a clean
stop on preemption, checkpoints read without running code."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from emfm.errors import EmfmError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write a checkpoint next to its final path and rename it into place.

    A job killed while saving leaves the previous checkpoint intact, never a truncated one
    (fsspec's transaction writes through the system temp dir, which may be another filesystem).
    Remote paths (``s3://`` ...) keep Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        with partial.open("wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)


class SaveOnPreemption(pl.Callback):
    """On SIGTERM (SLURM preemption, ``scancel``), save ``last.ckpt`` and let the run end cleanly.

    Lightning turns SIGTERM into an exception after the current batch, on every rank at once;
    this callback writes the checkpoint that ``resume=auto`` continues from.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last.ckpt") -> None:
        self.path = Path(dirpath) / filename

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.path)
            rank_zero_info(f"SIGTERM at step {trainer.global_step}: saved {self.path}; rerun with resume=auto")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's contents, loaded without running code (``weights_only=True``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for "not a checkpoint"
        raise EmfmError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})".split("\n")[0]) from None


# Parameters that are positions/tokens rather than weights: AdamW must not decay them.
NO_WEIGHT_DECAY = ("pos_embed", "cls_token", "reg_token", "mask_token")


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float, lr_scale: float = 1.0,
                 frozen_steps: int = 0) -> list[dict]:
    """AdamW groups of trainable parameters: weights decayed, norms / biases / tokens not.

    ``lr_scale`` multiplies the base learning rate (layer-wise decay); ``frozen_steps`` holds the
    group at zero learning rate for that many steps, then warms it up (a frozen encoder that
    stays in the DDP graph).
    """
    decay, no_decay = [], []
    for name, param in named:
        if param.requires_grad:
            skip = param.ndim <= 1 or name.split(".")[-1] in NO_WEIGHT_DECAY
            (no_decay if skip else decay).append(param)
    return [{"params": params, "weight_decay": wd, "lr_scale": lr_scale, "frozen_steps": frozen_steps}
            for params, wd in ((decay, weight_decay), (no_decay, 0.0)) if params]


def warmup_cosine(step: int, *, warmup: int, total: int, floor: float, frozen: int = 0) -> float:
    """Learning-rate factor: 0 while frozen, linear warmup, then cosine decay to ``floor`` at ``total``."""
    if step < frozen:
        return 0.0
    if step < frozen + warmup:
        return (step - frozen + 1) / warmup
    progress = min(1.0, (step - frozen - warmup) / max(1, total - frozen - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw_warmup_cosine(groups: list[dict], total: int | None, lr: float, betas: Sequence[float],
                        warmup_steps: int, min_lr_ratio: float) -> dict:
    """Lightning's ``configure_optimizers`` answer: AdamW over ``groups``, stepped per optimiser step."""
    if total is None or total <= 0:
        raise EmfmError("trainer.max_steps must be set (> 0): the learning-rate schedule needs it")
    factors = []
    for group in groups:
        group["lr"] = lr * group.pop("lr_scale", 1.0)
        frozen = group.pop("frozen_steps", 0)
        factors.append(partial(warmup_cosine, warmup=min(warmup_steps, total), total=total, floor=min_lr_ratio,
                               frozen=frozen))
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
