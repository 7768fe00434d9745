"""LightningDataModule serving random patches of unlabeled volumes for pretraining."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from emfm.data.patches import FixedPatches, PatchSampler, RandomPatches
from emfm.data.volume import Volume


class PatchDataModule(pl.LightningDataModule):
    """Random training patches and a fixed validation set from the same volumes.

    Args:
        volumes: zarr / OME-Zarr paths.
        patch_shape: (Y, X) for 2-D encoders, (Z, Y, X) for 3-D ones.
        weights: relative sampling frequency per volume.
        level: multiscale level to read (0 = full resolution).
        batch_size: patches per batch and process.
        num_workers: DataLoader worker processes.
        patches_per_epoch: training patches per epoch and process (sets the progress bar total).
        val_patches: size of the fixed validation set.
        min_std, min_foreground, pad_value: blank-patch filter, see :class:`PatchSampler`.
        seed: base seed of the patch streams.
    """

    def __init__(
        self,
        volumes: Sequence[str],
        patch_shape: Sequence[int],
        weights: Sequence[float] | None = None,
        level: int = 0,
        batch_size: int = 32,
        num_workers: int = 4,
        patches_per_epoch: int = 8192,
        val_patches: int = 64,
        min_std: float = 0.02,
        min_foreground: float = 0.5,
        pad_value: float | None = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.volume_paths, self.level = list(volumes), level
        self.patch_shape, self.weights = list(patch_shape), weights
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.patches_per_epoch, self.val_patches = patches_per_epoch, val_patches
        self.blank_filter = {"min_std": min_std, "min_foreground": min_foreground, "pad_value": pad_value}
        self.sampler: PatchSampler | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.sampler is None:
            volumes = [Volume(path, level=self.level) for path in self.volume_paths]
            self.sampler = PatchSampler(volumes, self.patch_shape, self.weights, **self.blank_filter)
            self.sampler.check(self.seed)

    def _loader(self, dataset: torch.utils.data.Dataset) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.batch_size, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        return self._loader(RandomPatches(self.sampler, self.patches_per_epoch, self.seed, rank))

    def val_dataloader(self) -> DataLoader:
        return self._loader(FixedPatches(self.sampler, self.val_patches, self.seed + 1))
