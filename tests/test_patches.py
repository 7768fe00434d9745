from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from emfm.data.ingest import write_ome_zarr
from emfm.data.patches import FixedPatches, PatchSampler, RandomPatches
from emfm.data.volume import Volume
from emfm.errors import EmfmError


def volume(tmp_path: Path, array: np.ndarray, name: str = "v.zarr") -> Volume:
    return Volume(write_ome_zarr(array, tmp_path / name))


@pytest.fixture
def noise_volume(tmp_path: Path) -> Volume:
    return volume(tmp_path, np.random.default_rng(0).integers(1, 255, (6, 40, 50), dtype=np.uint8))


@pytest.mark.parametrize("patch_shape", [(16, 24), (4, 16, 24), (6, 40, 50)])
def test_sampler_returns_requested_shapes(noise_volume: Volume, patch_shape: tuple) -> None:
    sampler = PatchSampler([noise_volume], patch_shape)
    patch = sampler.sample(np.random.default_rng(0))
    assert patch.shape == (1, *patch_shape) and patch.dtype == np.float32
    lo, hi = noise_volume.normalization()
    assert -0.1 < patch.min() and patch.max() < 1.1 and 0 < lo < hi  # normalised by percentiles


def test_2d_patches_from_a_2d_image(tmp_path: Path) -> None:
    image = volume(tmp_path, np.random.default_rng(0).integers(1, 255, (40, 50), dtype=np.uint8))
    assert PatchSampler([image], (32, 32)).sample(np.random.default_rng(0)).shape == (1, 32, 32)


def test_blank_and_padded_patches_are_never_returned(tmp_path: Path) -> None:
    raw = np.random.default_rng(0).integers(1, 255, (4, 64, 64), dtype=np.uint8)
    raw[:, :, :40] = 0  # alignment padding over most of the volume
    raw[:, :20, 40:] = 128  # and a flat, empty region
    vol = volume(tmp_path, raw)
    sampler = PatchSampler([vol], (16, 16), min_std=0.05, min_foreground=0.5, pad_value=0)
    lo, hi = vol.normalization()
    rng = np.random.default_rng(1)
    for _ in range(50):
        patch = sampler.sample(rng)[0]
        assert np.mean(patch != (0 - lo) / (hi - lo)) >= 0.5
        assert patch.std() >= 0.05


def test_volume_with_no_usable_patch_fails_early(tmp_path: Path) -> None:
    blank = volume(tmp_path, np.zeros((4, 32, 32), np.uint8))
    sampler = PatchSampler([blank], (16, 16), max_tries=20)
    with pytest.raises(EmfmError, match=r"v.zarr: no \[16, 16\] patch passed the blank filter in 20 tries"):
        sampler.check()


def test_bad_patch_requests_raise(tmp_path: Path, noise_volume: Volume) -> None:
    image = volume(tmp_path, np.ones((40, 50), np.uint8), "image.zarr")
    with pytest.raises(EmfmError, match=r"image.zarr: volume is 2-D but data.patch_shape \[4, 16, 16\] is 3-D"):
        PatchSampler([image], (4, 16, 16))
    with pytest.raises(EmfmError, match=r"patch_shape \[64, 64\] is larger than the volume \[6, 40, 50\]"):
        PatchSampler([noise_volume], (64, 64))
    with pytest.raises(EmfmError, match="data.weights"):
        PatchSampler([noise_volume], (8, 8), weights=[1.0, 2.0])


def test_volumes_are_mixed_by_weight(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    smooth = volume(tmp_path, np.tile(np.arange(1, 65, dtype=np.uint8) * 3, (2, 64, 1)), "smooth.zarr")
    rough = volume(tmp_path, rng.integers(1, 255, (2, 64, 64), dtype=np.uint8), "rough.zarr")
    sampler = PatchSampler([smooth, rough], (16, 16), weights=[3, 1])
    draws = [sampler.sample(rng)[0] for _ in range(400)]
    from_rough = np.mean([np.abs(np.diff(p, axis=0)).mean() > 0.05 for p in draws])
    assert 0.18 < from_rough < 0.32  # 1 in 4


def test_each_worker_and_rank_draws_different_patches(noise_volume: Volume) -> None:
    sampler = PatchSampler([noise_volume], (8, 8))
    stream = RandomPatches(sampler, batch_size=2, batches=12, seed=0)
    batches = list(DataLoader(stream, batch_size=None, num_workers=2))
    patches = {p.numpy().tobytes() for b in batches for p in b}
    assert len(batches) == 12 and batches[0].shape == (2, 1, 8, 8) and len(patches) == 24
    in_main_process = list(DataLoader(stream, batch_size=None, num_workers=0))
    torch.testing.assert_close(torch.stack(batches), torch.stack(in_main_process))  # workers do not matter
    other_rank = next(iter(RandomPatches(sampler, 2, 12, seed=0, rank=1)))
    assert not torch.equal(other_rank, batches[0])


def test_a_resumed_stream_continues_where_it_stopped(noise_volume: Volume) -> None:
    sampler = PatchSampler([noise_volume], (8, 8))
    uninterrupted = list(RandomPatches(sampler, batch_size=2, batches=6, seed=0))
    resumed = list(RandomPatches(sampler, batch_size=2, batches=2, seed=0, start=4))
    torch.testing.assert_close(torch.stack(resumed), torch.stack(uninterrupted[4:]))


def test_validation_is_fixed(noise_volume: Volume) -> None:
    sampler = PatchSampler([noise_volume], (8, 8))
    val = FixedPatches(sampler, length=4, seed=1)
    torch.testing.assert_close(torch.stack(list(val)), torch.stack([val[i] for i in range(4)]))
