"""Random patches from EM volumes: weighted mixing, blank rejection, one stream per rank and worker."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from emfm.data.volume import Volume
from emfm.errors import EmfmError


class PatchSampler:
    """Draws normalised patches of one shape from several volumes.

    A 2-D ``patch_shape`` takes (Y, X) patches from any z-slice of a 3-D volume (or from a 2-D
    image); a 3-D one takes (Z, Y, X) blocks, anisotropic shapes such as (8, 128, 128) included.
    Blank patches (padding from alignment, empty resin) teach nothing and are drawn again.

    Args:
        volumes: the volumes to draw from.
        patch_shape: patch size per spatial axis.
        weights: relative sampling frequency of each volume (default: equal).
        min_std: reject patches whose normalised intensities vary less than this.
        min_foreground: reject patches with a smaller fraction of pixels different from ``pad_value``.
        pad_value: raw value of padding; ``None`` disables the foreground test.
        max_tries: draws per patch before the volume is declared blank.
    """

    def __init__(
        self,
        volumes: Sequence[Volume],
        patch_shape: Sequence[int],
        weights: Sequence[float] | None = None,
        min_std: float = 0.02,
        min_foreground: float = 0.5,
        pad_value: float | None = 0,
        max_tries: int = 100,
    ) -> None:
        self.patch_shape = tuple(int(p) for p in patch_shape)
        if len(self.patch_shape) not in (2, 3):
            raise EmfmError(f"data.patch_shape must have 2 or 3 entries, got {list(patch_shape)}")
        if not volumes:
            raise EmfmError("data.volumes is empty: give at least one zarr volume")
        for vol in volumes:
            if len(self.patch_shape) > vol.ndim:
                raise EmfmError(
                    f"{vol.path}: volume is {vol.ndim}-D but data.patch_shape {list(patch_shape)} is 3-D"
                )
            if any(p > s for p, s in zip(self.patch_shape[::-1], vol.shape[::-1])):
                raise EmfmError(
                    f"{vol.path}: data.patch_shape {list(patch_shape)} is larger than the volume "
                    f"{list(vol.shape)}"
                )
        weights = [1.0] * len(volumes) if weights is None else [float(w) for w in weights]
        if len(weights) != len(volumes) or min(weights) < 0 or sum(weights) <= 0:
            raise EmfmError(
                f"data.weights {weights} must be {len(volumes)} non-negative numbers, not all zero"
            )
        self.volumes = list(volumes)
        self.probabilities = np.asarray(weights) / sum(weights)
        self.min_std, self.min_foreground, self.pad_value = min_std, min_foreground, pad_value
        self.max_tries = max_tries

    def random_region(self, volume: Volume, rng: np.random.Generator) -> tuple[slice | int, ...]:
        """A uniformly placed region; a 2-D patch of a 3-D volume gets a single z index."""
        extra = volume.ndim - len(self.patch_shape)
        lead = tuple(int(rng.integers(s)) for s in volume.shape[:extra])
        starts = [int(rng.integers(s - p + 1)) for s, p in zip(volume.shape[extra:], self.patch_shape)]
        return lead + tuple(slice(a, a + p) for a, p in zip(starts, self.patch_shape))

    def is_blank(self, raw: np.ndarray, normalised: np.ndarray) -> bool:
        if self.pad_value is not None and np.mean(raw != self.pad_value) < self.min_foreground:
            return True
        return float(normalised.std()) < self.min_std

    def sample_from(self, index: int, rng: np.random.Generator) -> np.ndarray:
        """One accepted patch of volume ``index``, (1, *patch_shape) float32."""
        volume = self.volumes[index]
        for _ in range(self.max_tries):
            raw = volume.read(self.random_region(volume, rng))
            patch = volume.normalize(raw)
            if not self.is_blank(raw, patch):
                return patch[None]
        raise EmfmError(
            f"{volume.path}: no {list(self.patch_shape)} patch passed the blank filter in "
            f"{self.max_tries} tries (data.min_std={self.min_std}, data.min_foreground="
            f"{self.min_foreground}, data.pad_value={self.pad_value}); lower them or check the volume"
        )

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """One accepted patch from a volume chosen by weight, (1, *patch_shape) float32."""
        return self.sample_from(int(rng.choice(len(self.volumes), p=self.probabilities)), rng)

    def check(self, seed: int = 0) -> None:
        """Fail before training, not hours into it, if some volume never yields a usable patch."""
        rng = np.random.default_rng(seed)
        for index, weight in enumerate(self.probabilities):
            if weight > 0:
                self.sample_from(index, rng)


class BatchStream(IterableDataset):
    """Training stream of ``batches`` whole batches that can be resumed exactly.

    Batch ``b`` is made by ``batch(b)`` from its own random stream, so the stream is the same
    whatever the number of DataLoader workers (worker ``w`` makes batches ``w, w + W, ...``, which
    the DataLoader hands out in order), and a resumed run continues it by setting ``start`` to the
    number of batches already trained on. Use it with ``DataLoader(batch_size=None)``.
    """

    def __init__(self, batches: int, start: int) -> None:
        self.batches, self.start = batches, start

    def __len__(self) -> int:
        return self.batches

    def batch(self, index: int) -> Any:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for index in range(self.start + worker, self.start + self.batches, workers):
            yield self.batch(index)


class RandomPatches(BatchStream):
    """Training stream of random (B, 1, *patch_shape) batches, resumable (see :class:`BatchStream`).

    Batch ``b`` of rank ``r`` is drawn from the random stream ``[seed, r, b]``: different on every rank.
    """

    def __init__(
        self, sampler: PatchSampler, batch_size: int, batches: int, seed: int = 0, rank: int = 0, start: int = 0
    ) -> None:
        super().__init__(batches, start)
        self.sampler, self.batch_size, self.seed, self.rank = sampler, batch_size, seed, rank

    def batch(self, index: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, self.rank, index])
        return torch.from_numpy(np.stack([self.sampler.sample(rng) for _ in range(self.batch_size)]))


class FixedPatches(Dataset):
    """Validation patches: patch ``i`` is the same in every epoch, process and run."""

    def __init__(self, sampler: PatchSampler, length: int, seed: int = 0) -> None:
        self.sampler, self.length, self.seed = sampler, length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.length:
            raise IndexError(f"validation patch {index} of {self.length}")
        return torch.from_numpy(self.sampler.sample(np.random.default_rng([self.seed, index])))
