"""Labeled data for fine-tuning: a few labeled slices of a raw volume, held-out slices to validate on.

EM labels are sparse: a handful of slices of one volume, sometimes with unlabeled pixels inside
them. Everything that is not labeled becomes ``IGNORE`` (-1) in the label patches, so losses and
metrics skip it. Semi-supervised methods also get unlabeled patches, from the raw volume itself
and any other volumes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities.types import EVAL_DATALOADERS
from torch.utils.data import DataLoader, Dataset

from emfm.data.datamodule import PatchDataModule, volume_list
from emfm.data.patches import BatchStream, RandomPatches
from emfm.data.volume import Volume
from emfm.errors import EmfmError
from emfm.paths import resolved

IGNORE = -1

log = logging.getLogger(__name__)


def parse_slices(spec: int | str | Sequence[int] | None, depth: int, key: str) -> list[int]:
    """``[0, 1]``, ``"0,1"``, ``"20-29"`` or ``"0-4,9"`` -> sorted slice indices, checked against ``depth``."""
    if spec is None:
        return []
    if isinstance(spec, int):
        spec = [spec]
    if isinstance(spec, str):
        indices: list[int] = []
        for part in spec.replace(" ", "").split(","):
            first, _, last = part.partition("-")
            if not first.isdigit() or (last and not last.isdigit()):
                raise EmfmError(f"{key}={spec!r}: expected slice indices like 0,1 or 20-29")
            indices += range(int(first), int(last or first) + 1)
        spec = indices
    slices = sorted({int(s) for s in spec})
    if slices and not 0 <= slices[0] <= slices[-1] < depth:
        raise EmfmError(f"{key}={list(spec)}: slice indices must lie in [0, {depth - 1}] (the volume has {depth})")
    return slices


def evenly_spaced(fraction: float, candidates: Sequence[int]) -> list[int]:
    """``fraction`` of the candidate slices (at least one), spread evenly through them."""
    if not 0 < fraction <= 1:
        raise EmfmError(f"data.labeled_fraction={fraction}: expected a fraction in (0, 1]")
    count = max(1, round(fraction * len(candidates)))
    return [candidates[int((i + 0.5) * len(candidates) / count)] for i in range(count)]


class LabeledVolume:
    """A raw volume and its label volume (same shape, integer labels).

    Args:
        raw, labels: zarr / OME-Zarr paths; 2-D images count as one slice.
        ignore_label: label value meaning "not labeled".
        level: multiscale level to read.
        missing_chunks: what reading a chunk absent from a store does (:data:`~emfm.data.volume.MISSING_CHUNKS`).
    """

    def __init__(self, raw: str | Path, labels: str | Path, ignore_label: int | None = None, level: int = 0,
                 missing_chunks: str = "warn") -> None:
        self.raw, self.labels = Volume(raw, level, missing_chunks), Volume(labels, level, missing_chunks)
        if self.raw.shape != self.labels.shape:
            raise EmfmError(f"{self.labels.path} has shape {list(self.labels.shape)}, but the raw volume "
                            f"{self.raw.path} has {list(self.raw.shape)}; labels must cover the raw voxel grid")
        if self.labels.dtype.kind not in "iub":
            raise EmfmError(f"{self.labels.path}: labels must be integers, got {self.labels.dtype} "
                            f"(ingest them with `emfm ingest --labels`)")
        self.ignore_label = ignore_label
        self.depth = self.raw.shape[0] if self.raw.ndim == 3 else 1

    def _region(self, z: slice, rest: Sequence[slice]) -> tuple[slice, ...]:
        return (z, *rest) if self.raw.ndim == 3 else tuple(rest)

    def read(self, z: slice, rest: Sequence[slice], labeled: Collection[int]) -> tuple[np.ndarray, np.ndarray]:
        """Normalised raw (Z, Y, X) float32 and labels (Z, Y, X) int64, ``IGNORE`` where unlabeled.

        Only the z-slices in ``labeled`` keep their labels: training never sees held-out labels
        inside a 3-D patch, and validation never scores training slices.
        """
        region = self._region(z, rest)
        image = self.raw.normalize(self.raw.read(region))
        labels = self.labels.read(region).astype(np.int64)
        if self.raw.ndim == 2:
            image, labels = image[None], labels[None]
        if self.ignore_label is not None:
            labels[labels == self.ignore_label] = IGNORE
        unlabeled = [i for i, s in enumerate(range(z.start, z.stop)) if s not in labeled]
        labels[unlabeled] = IGNORE
        return image, labels


class LabeledPatches(BatchStream):
    """Training batches ``{"image", "labels"[, "unlabeled"]}``, resumable (see :class:`BatchStream`).

    Batch ``b`` of rank ``r`` draws its labeled patches from ``[seed, r, b]``; a 2-D patch comes
    from one labeled slice, a 3-D patch is a block that contains at least one labeled slice.
    """

    def __init__(self, data: LabeledVolume, slices: Sequence[int], patch_shape: Sequence[int], batch_size: int,
                 batches: int, seed: int = 0, rank: int = 0, start: int = 0,
                 unlabeled: RandomPatches | None = None) -> None:
        super().__init__(batches, start)
        self.data, self.patch_shape, self.batch_size = data, tuple(patch_shape), batch_size
        self.seed, self.rank, self.unlabeled = seed, rank, unlabeled
        self.slices = sorted(slices)

    def patch(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        plane = self.patch_shape[-2:]
        size = self.data.raw.shape[-2:]
        rest = [slice(a, a + p) for a, p in ((int(rng.integers(s - p + 1)), p) for s, p in zip(size, plane))]
        z = int(rng.choice(self.slices))
        if len(self.patch_shape) == 2:
            image, labels = self.data.read(slice(z, z + 1), rest, self.slices)
            return image, labels  # (1, Y, X): the slice axis doubles as the channel axis
        depth = self.patch_shape[0]
        z0 = int(rng.integers(max(0, z - depth + 1), min(z, self.data.depth - depth) + 1))
        image, labels = self.data.read(slice(z0, z0 + depth), rest, self.slices)
        return image[None], labels[None]

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, index])
        images, labels = zip(*(self.patch(rng) for _ in range(self.batch_size)))
        out = {"image": torch.from_numpy(np.stack(images)), "labels": torch.from_numpy(np.stack(labels))}
        if self.unlabeled is not None:
            out["unlabeled"] = self.unlabeled.batch(index)
        return out


class HeldOutSlices(Dataset):
    """Whole held-out regions for validation: each 2-D slice, or one 3-D slab over all of them."""

    def __init__(self, data: LabeledVolume, slices: Sequence[int], patch_shape: Sequence[int]) -> None:
        self.data, self.slices, self.patch_shape = data, list(slices), tuple(patch_shape)
        if len(self.patch_shape) == 3:  # one slab deep enough for the model, labels only on the slices
            z0 = min(min(self.slices), max(0, data.depth - self.patch_shape[0]))
            self.regions = [slice(z0, max(max(self.slices) + 1, z0 + self.patch_shape[0]))]
        else:
            self.regions = [slice(z, z + 1) for z in self.slices]

    def __len__(self) -> int:
        return len(self.regions)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rest = [slice(0, s) for s in self.data.raw.shape[-2:]]
        image, labels = self.data.read(self.regions[index], rest, self.slices)
        if len(self.patch_shape) == 3:
            image, labels = image[None], labels[None]
        return {"image": torch.from_numpy(image), "labels": torch.from_numpy(labels)}


class LabeledDataModule(PatchDataModule):
    """Patches of the labeled slices for training, whole held-out slices for validation.

    With ``unlabeled_batch_size > 0`` every training batch also carries unlabeled patches (for
    semi-supervised methods) drawn from the raw volume and ``unlabeled`` volumes.

    Args:
        raw, labels: the labeled volume and its labels (same shape, integer labels).
        patch_shape: (Y, X) for 2-D models, (Z, Y, X) for 3-D ones.
        labeled_slices: z-slices to train on: a list, ``"0,1"`` or ``"0-4"``.
        labeled_fraction: instead, this fraction of the non-validation slices, evenly spread.
        val_slices: held-out z-slices for validation (never trained on).
        ignore_label: label value meaning "not labeled".
        unlabeled: more volumes for the unlabeled stream.
        unlabeled_batch_size: unlabeled patches per batch (0: none).
        Other arguments as :class:`~emfm.data.datamodule.PatchDataModule`.
    """

    def __init__(
        self,
        raw: str,
        labels: str,
        patch_shape: Sequence[int],
        labeled_slices: int | str | Sequence[int] | None = None,
        labeled_fraction: float | None = None,
        val_slices: int | str | Sequence[int] | None = None,
        ignore_label: int | None = None,
        unlabeled: Sequence[str] = (),
        unlabeled_batch_size: int = 0,
        level: int = 0,
        batch_size: int = 8,
        num_workers: int | None = None,
        patches_per_epoch: int = 1024,
        min_std: float = 0.02,
        min_foreground: float = 0.5,
        pad_value: float | None = 0,
        seed: int = 0,
        missing_chunks: str = "warn",
    ) -> None:
        super().__init__([raw, *volume_list(unlabeled, "data.unlabeled")], patch_shape, level=level,
                         batch_size=batch_size, num_workers=num_workers,
                         patches_per_epoch=patches_per_epoch, min_std=min_std, min_foreground=min_foreground,
                         pad_value=pad_value, seed=seed, missing_chunks=missing_chunks)
        self.raw_path, self.label_path, self.ignore_label = raw, labels, ignore_label
        self.slice_spec, self.labeled_fraction, self.val_spec = labeled_slices, labeled_fraction, val_slices
        self.unlabeled_batch_size = unlabeled_batch_size
        self.data: LabeledVolume | None = None

    def setup(self, stage: str | None = None) -> None:
        self.volume()

    def volume(self) -> LabeledVolume:
        """The raw and label volumes, opened and checked with the slices on first use."""
        if self.data is not None:
            return self.data
        raw = Volume(self.raw_path, self.level, self.missing_chunks)
        depth = raw.shape[0] if raw.ndim == 3 else 1
        val = parse_slices(self.val_spec, depth, "data.val_slices")
        labeled = parse_slices(self.slice_spec, depth, "data.labeled_slices")
        if self.labeled_fraction is not None:
            labeled = evenly_spaced(self.labeled_fraction, [z for z in range(depth) if z not in val])
        if not labeled:
            raise EmfmError("data.labeled_slices is empty: give the labeled z-slices (e.g. [0,1]) "
                            "or data.labeled_fraction")
        if overlap := sorted(set(labeled) & set(val)):
            raise EmfmError(f"slices {overlap} are both in data.labeled_slices and data.val_slices; "
                            f"validation must use held-out slices")
        self.labeled, self.val = labeled, val
        data = LabeledVolume(self.raw_path, self.label_path, self.ignore_label, self.level, self.missing_chunks)
        if len(self.patch_shape) == 3 and self.patch_shape[0] > depth:
            raise EmfmError(f"data.patch_shape {self.patch_shape} is deeper than {self.raw_path} ({depth} slices)")
        if any(p > s for p, s in zip(self.patch_shape[-2:], raw.shape[-2:])):
            raise EmfmError(f"data.patch_shape {self.patch_shape} is larger than {self.raw_path} {list(raw.shape)}")
        if self.unlabeled_batch_size:
            self.patches()
        self.data = data
        return data

    def label_values(self) -> list[int]:
        """The distinct label values of the labeled slices (after ``ignore_label``), to check against the target."""
        data = self.volume()
        rest = [slice(0, s) for s in data.raw.shape[-2:]]
        per_slice = {z: {int(v) for v in np.unique(data.read(slice(z, z + 1), rest, [z])[1])} for z in self.labeled}
        if all(values == {IGNORE} for values in per_slice.values()):     # the loss would be 0 from the first step
            raise EmfmError(f"{self.label_path}: data.labeled_slices {self.labeled} hold no labelled pixel, only "
                            f"data.ignore_label={self.ignore_label}; nothing to train on")
        if empty := [z for z, values in per_slice.items() if values == {0}]:
            log.warning("%s: labeled slices %s hold only background (0); if they are not annotated, leave them "
                        "out of data.labeled_slices or mark them with data.ignore_label", self.label_path, empty)
        return sorted(set().union(*per_slice.values()))

    def describe(self) -> dict[str, Any]:
        self.volume()
        return {"raw": resolved(self.raw_path), "labels": resolved(self.label_path),
                "labeled_slices": self.labeled, "val_slices": self.val, "patch_shape": self.patch_shape}

    @property
    def isotropic(self) -> bool:
        size = Volume(self.raw_path, level=self.level).voxel_size
        return size is not None and max(size) <= 1.5 * min(size)

    def train_dataloader(self) -> DataLoader:
        data = self.volume()
        rank = self.trainer.global_rank if self.trainer is not None else 0
        batches = math.ceil(self.patches_per_epoch / self.batch_size)
        unlabeled = None
        if self.unlabeled_batch_size:
            unlabeled = RandomPatches(self.patches(), self.unlabeled_batch_size, batches, self.seed + 7, rank)
        self.train_stream = LabeledPatches(data, self.labeled, self.patch_shape, self.batch_size, batches, self.seed,
                                           rank, start=self.batches_served, unlabeled=unlabeled)
        return self._loader(self.train_stream, batch_size=None)

    def val_dataloader(self) -> EVAL_DATALOADERS:
        data = self.volume()
        if not self.val:
            return []   # no validation
        return self._loader(HeldOutSlices(data, self.val, self.patch_shape), batch_size=None)
