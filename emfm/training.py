"""Trainer pieces that make long jobs safe: atomic checkpoints and a clean stop on preemption."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

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
