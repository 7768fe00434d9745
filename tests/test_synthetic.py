"""Tests for the synthetic EM generator: ground-truth consistency, looks, determinism, validation."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from emfm.data.synthetic import SyntheticEM, make_synthetic_em, save_synthetic
from emfm.data.volume import Volume
from emfm.errors import EmfmError

SMALL = (16, 96, 96)


@pytest.fixture(scope="module")
def em() -> SyntheticEM:
    return make_synthetic_em()


@pytest.fixture(scope="module", params=[1.0, 4.0], ids=["isotropic", "anisotropic"])
def volume(request: pytest.FixtureRequest, em: SyntheticEM) -> SyntheticEM:
    """Ground-truth checks also run with thick z voxels, where membranes are thinner than a voxel."""
    return em if request.param == 1.0 else make_synthetic_em((12, 128, 128), anisotropy=request.param)


def _cytoplasm(em: SyntheticEM) -> np.ndarray:
    return (em.membranes == 0) & (em.mitochondria == 0)


def test_shapes_dtypes_and_voxel_size(em: SyntheticEM) -> None:
    expected = {"raw": np.uint8, "membranes": np.uint8, "mitochondria": np.uint8, "instances": np.uint32}
    for name, dtype in expected.items():
        array = getattr(em, name)
        assert array.shape == (32, 128, 128) and array.dtype == dtype, name
    assert set(np.unique(em.membranes)) <= {0, 1}
    assert set(np.unique(em.mitochondria)) <= {0, 1}
    assert em.voxel_size == (8.0, 8.0, 8.0)


def test_same_seed_is_identical_and_other_seed_differs() -> None:
    first, again, other = (make_synthetic_em(SMALL, seed=seed) for seed in (7, 7, 8))
    for name in ("raw", "membranes", "mitochondria", "instances"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert not np.array_equal(first.raw, other.raw)
    assert not np.array_equal(first.instances, other.instances)


def test_raw_uses_the_range_and_membranes_and_mitochondria_are_dark(em: SyntheticEM) -> None:
    low, high = np.percentile(em.raw, [1, 99])
    assert low < 40 and high > 215
    cytoplasm = em.raw[_cytoplasm(em)].mean()
    assert cytoplasm - em.raw[em.membranes == 1].mean() > 60
    assert cytoplasm - em.raw[em.mitochondria == 1].mean() > 30


def test_instances_are_zero_exactly_on_membranes(volume: SyntheticEM) -> None:
    np.testing.assert_array_equal(volume.instances == 0, volume.membranes == 1)


def test_each_instance_is_one_connected_component_with_ids_1_to_n(volume: SyntheticEM) -> None:
    ids = np.unique(volume.instances[volume.instances > 0])
    np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
    components, n = ndimage.label(volume.instances > 0)  # 6-connectivity
    index = np.arange(1, n + 1)
    # Each component holds a single id (no two cells touch) and there are as many components
    # as ids, so no id is split either.
    low = ndimage.minimum(volume.instances, components, index)
    assert np.all(low == ndimage.maximum(volume.instances, components, index))
    assert n == len(ids)


def test_thin_membranes_still_separate_cells() -> None:
    thin, normal = (make_synthetic_em(SMALL, membrane_width=w).instances for w in (0.1, 2.0))
    assert thin.max() >= 0.8 * normal.max()
    assert np.bincount(thin.ravel())[1:].max() < 0.3 * thin.size  # no giant merged cell


def test_membrane_fraction_is_sane(em: SyntheticEM) -> None:
    for membranes in (em.membranes, make_synthetic_em(SMALL, seed=1).membranes):
        assert 0.1 < membranes.mean() < 0.3


def test_mitochondria_stay_inside_single_cells(volume: SyntheticEM) -> None:
    assert volume.mitochondria.mean() > 0.001
    assert not np.any(volume.mitochondria & volume.membranes)
    # Even 26-connected pieces of mitochondria must stay within one cell.
    components, n = ndimage.label(volume.mitochondria, structure=np.ones((3, 3, 3)))
    index = np.arange(1, n + 1)
    low = ndimage.minimum(volume.instances, components, index)
    high = ndimage.maximum(volume.instances, components, index)
    assert n > 0 and np.all(low == high) and np.all(low > 0)


def test_mito_fraction_zero_gives_no_mitochondria() -> None:
    assert make_synthetic_em(SMALL, mito_fraction=0.0).mitochondria.sum() == 0


def test_vesicles_add_dark_spots_to_the_cytoplasm() -> None:
    def dark_cytoplasm(vesicles: float) -> int:
        em = make_synthetic_em(SMALL, vesicles_per_cell=vesicles, noise=0.0, blur=0.0)
        membrane = em.raw[em.membranes == 1].mean()
        return int(np.sum(em.raw[_cytoplasm(em)] < membrane + 20))

    assert dark_cytoplasm(0.0) == 0
    assert dark_cytoplasm(8.0) > 100


def test_anisotropy_makes_structures_change_faster_along_z() -> None:
    def z_change(em: SyntheticEM) -> float:
        return float(np.mean(em.instances[1:] != em.instances[:-1]))

    isotropic, anisotropic = (make_synthetic_em(SMALL, anisotropy=a) for a in (1.0, 4.0))
    assert z_change(anisotropic) > 1.5 * z_change(isotropic)
    assert anisotropic.voxel_size == (32.0, 8.0, 8.0)


@pytest.mark.parametrize("shape", [(32, 128), (0, 64, 64), (8, -1, 8), (8.0, 64, 64), (True, 8, 8), "abc"])
def test_bad_shape_raises(shape: object) -> None:
    with pytest.raises(EmfmError, match="shape"):
        make_synthetic_em(shape)  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs", [{"cell_size": 0.0}, {"mito_fraction": 1.5}, {"noise": -0.1}])
def test_bad_parameters_raise(kwargs: dict[str, float]) -> None:
    with pytest.raises(EmfmError):
        make_synthetic_em(SMALL, **kwargs)


def test_save_synthetic_round_trips_as_ome_zarr_and_tiff(tmp_path) -> None:
    em = make_synthetic_em((8, 64, 64), anisotropy=5.0)
    out = save_synthetic(em, tmp_path / "s.zarr")
    assert Volume(out).voxel_size == (40.0, 8.0, 8.0)
    np.testing.assert_array_equal(Volume(out).read(), em.raw)
    for name in ("membranes", "mitochondria", "instances"):
        labels = Volume(out / "labels" / name)
        assert labels.is_label
        np.testing.assert_array_equal(labels.read(), getattr(em, name))
    tif = save_synthetic(em, tmp_path / "s.tif")
    np.testing.assert_array_equal(tifffile.imread(tif), em.raw)
    with pytest.raises(EmfmError, match="s.tif exists; pass --overwrite"):
        save_synthetic(em, tif)
