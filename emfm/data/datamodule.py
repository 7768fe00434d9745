"""LightningDataModule serving random patches of unlabeled volumes for pretraining."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from emfm.data.patches import BatchStream, FixedPatches, PatchSampler, RandomPatches
from emfm.data.volume import Volume
from emfm.errors import EmfmError
from emfm.paths import resolved
from emfm.threads import default_workers

# Voxel sizes within this ratio of each other count as isotropic (3-D rotations allowed).
ISOTROPY_TOLERANCE = 1.5


def volume_list(volumes: str | Sequence[str], key: str) -> list[str]:
    """Paths given as a list; one path without brackets would be read as a list of its characters."""
    if isinstance(volumes, str):
        raise EmfmError(f"{key}={volumes}: expected a list of volumes, e.g. {key}=[{volumes}]")
    return [str(v) for v in volumes]


def check_positive(**values: int) -> None:
    """Counts that must be at least 1, named by their ``data.`` key."""
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise EmfmError(f"data.{key}={value}: expected a whole number of at least 1")


class PatchDataModule(pl.LightningDataModule):
    """Random training patches and a fixed validation set from the same volumes.

    The number of training batches served is checkpointed, so a resumed run continues the
    patch stream exactly where it stopped (see :class:`~emfm.data.patches.RandomPatches`).

    Args:
        volumes: zarr / OME-Zarr paths or URLs (http(s)://, s3://).
        patch_shape: (Y, X) for 2-D encoders, (Z, Y, X) for 3-D ones.
        weights: relative sampling frequency per volume.
        level: multiscale level to read (0 = full resolution).
        batch_size: patches per batch and process.
        num_workers: DataLoader worker processes (None: :func:`default_workers`).
        patches_per_epoch: training patches per epoch and process (sets the progress bar total).
        val_patches: size of the fixed validation set.
        min_std, min_foreground, pad_value: blank-patch filter, see :class:`PatchSampler`.
        seed: base seed of the patch streams.
        missing_chunks: what reading a chunk absent from a store does (:data:`~emfm.data.volume.MISSING_CHUNKS`).
    """

    def __init__(
        self,
        volumes: Sequence[str],
        patch_shape: Sequence[int],
        weights: Sequence[float] | None = None,
        level: int = 0,
        batch_size: int = 32,
        num_workers: int | None = None,
        patches_per_epoch: int = 8192,
        val_patches: int = 64,
        min_std: float = 0.02,
        min_foreground: float = 0.5,
        pad_value: float | None = 0,
        seed: int = 0,
        missing_chunks: str = "warn",
    ) -> None:
        super().__init__()
        check_positive(batch_size=batch_size, patches_per_epoch=patches_per_epoch, val_patches=val_patches)
        if num_workers is not None and num_workers < 0:
            raise EmfmError(f"data.num_workers={num_workers}: expected 0 (load in the training process) or more")
        self.volume_paths, self.level = volume_list(volumes, "data.volumes"), level
        self.missing_chunks = missing_chunks
        self.patch_shape, self.weights = list(patch_shape), weights
        self.batch_size, self.seed = batch_size, seed
        self.num_workers = default_workers() if num_workers is None else num_workers
        self.patches_per_epoch, self.val_patches = patches_per_epoch, val_patches
        self.min_std, self.min_foreground, self.pad_value = min_std, min_foreground, pad_value
        self.sampler: PatchSampler | None = None
        self.batches_served = 0
        self.train_stream: BatchStream | None = None

    def setup(self, stage: str | None = None) -> None:
        self.patches()

    def patches(self) -> PatchSampler:
        """The patch sampler over the volumes, opened and checked on first use."""
        if self.sampler is None:
            volumes = [Volume(path, self.level, self.missing_chunks) for path in self.volume_paths]
            sampler = PatchSampler(volumes, self.patch_shape, self.weights, min_std=self.min_std,
                                   min_foreground=self.min_foreground, pad_value=self.pad_value)
            sampler.check(self.seed)
            self.sampler = sampler
        return self.sampler

    @property
    def isotropic(self) -> bool:
        """Whether every volume's voxels are (nearly) cubes, so z may be rotated into y and x."""
        for volume in self.patches().volumes:
            size = volume.voxel_size
            if size is None or max(size) > ISOTROPY_TOLERANCE * min(size):
                return False
        return True

    def describe(self) -> dict[str, Any]:
        """What the encoder was trained on, for the exported model card."""
        return {
            "volumes": [
                {"path": resolved(v.path), "shape": list(v.shape), "axes": v.axes,
                 "voxel_size": None if v.voxel_size is None else list(v.voxel_size),
                 "normalization_percentiles": list(v.normalization())}
                for v in self.patches().volumes
            ],
            "level": self.level,
            "patch_shape": self.patch_shape,
        }

    def _loader(self, dataset: torch.utils.data.Dataset, **kwargs: Any) -> DataLoader:
        return DataLoader(dataset, num_workers=self.num_workers, pin_memory=torch.cuda.is_available(), **kwargs)

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        batches = math.ceil(self.patches_per_epoch / self.batch_size)
        self.train_stream = RandomPatches(self.patches(), self.batch_size, batches, self.seed, rank,
                                          start=self.batches_served)
        # Workers are started per epoch (not persistent) so they pick up the stream's new start.
        return self._loader(self.train_stream, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return self._loader(FixedPatches(self.patches(), self.val_patches, self.seed + 1),
                            batch_size=self.batch_size, persistent_workers=self.num_workers > 0)

    def on_before_batch_transfer(self, batch: torch.Tensor, dataloader_idx: int) -> torch.Tensor:
        if self.trainer is not None and self.trainer.training:
            self.batches_served += 1
            if self.train_stream is not None:
                self.train_stream.start = self.batches_served
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"batches_served": self.batches_served, **self.describe()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_served = int(state_dict["batches_served"])
