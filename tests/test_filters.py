"""The ilastik-style filter bank: values on hand-made images, channel names, and blocks with halos."""

from __future__ import annotations

import numpy as np
import pytest

from emfm.blockwise.grid import BlockGrid
from emfm.data.synthetic import make_synthetic_em
from emfm.errors import EmfmError
from emfm.explore.filters import FilterBank


def channel(bank: FilterBank, features: np.ndarray, name: str) -> np.ndarray:
    return features[bank.names(features.ndim - 1).index(name)]


def blockwise(bank: FilterBank, image: np.ndarray, block: tuple[int, ...]) -> np.ndarray:
    """The features block by block, each block read with the bank's halo and cropped, as a blockwise engine does."""
    grid, halo = BlockGrid(image.shape, block), bank.halo(image.ndim)
    out = np.full((len(bank.names(image.ndim)), *image.shape), np.nan, np.float32)
    for index in grid:
        inner, outer = grid.region(index), grid.region(index, halo)
        crop = tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer))
        out[(slice(None), *inner)] = bank(image[outer])[(slice(None), *crop)]
    return out


def test_constant_image_has_no_structure() -> None:
    bank = FilterBank(fine=True)
    features = bank(np.full((40, 40), 7, np.uint8))
    for name, values in zip(bank.names(2), features):
        expected = 7.0 if name.startswith("gaussian") else 0.0
        np.testing.assert_allclose(values, expected, atol=1e-4, err_msg=name)


def test_step_edge_gradient_peaks_at_the_edge() -> None:
    image = np.zeros((32, 64), np.float32)
    image[:, 32:] = 1.0
    bank = FilterBank(sigmas=(1.0, 3.5))
    features = bank(image)
    for sigma in bank.sigmas:
        assert set(channel(bank, features, f"gradient_{sigma}").argmax(axis=1)) <= {31, 32}
    # the Laplacian changes sign across the edge: positive on the dark side, negative on the bright side
    log = channel(bank, features, "log_1.0")[16]
    assert log[30] > 0.05 and log[33] < -0.05


def test_bright_line_has_a_strongly_negative_hessian_eigenvalue_across_it() -> None:
    image = np.zeros((48, 48), np.float32)
    image[24, :] = 1.0
    bank = FilterBank(sigmas=(1.0,))
    features = bank(image)
    largest, smallest = (channel(bank, features, f"hessian_1.0_e{i}")[24, 24] for i in range(2))
    assert smallest < -0.1 and abs(smallest) > 10 * abs(largest)   # curved across the line, flat along it


def test_channel_names_match_the_channels() -> None:
    assert len(FilterBank(fine=True).names(2)) == 1 + 8 * 6
    bank = FilterBank(sigmas=(0.7, 1.6))
    volume = make_synthetic_em((8, 24, 24)).raw
    assert bank(volume).shape == (len(bank.names(3)), *volume.shape) == (20, 8, 24, 24)
    assert "hessian_1.6_e2" in bank.names(3)
    with pytest.raises(EmfmError, match="expected a 2-D image or a 3-D volume"):
        bank.names(4)


def test_halo_is_the_structure_tensor_reach() -> None:
    assert FilterBank().halo(2) == (60, 60)                     # ceil(4 * 10) + ceil(4 * 5)
    assert FilterBank(per_slice=True).halo(3) == (0, 60, 60)    # nothing read across z


def test_blockwise_with_halo_equals_whole_image() -> None:
    image = make_synthetic_em((1, 96, 96)).raw[0] / 255.0
    bank = FilterBank(sigmas=(0.7, 1.6, 3.5), fine=True)        # halo 21: the middle block is inside the image
    np.testing.assert_allclose(blockwise(bank, image, (32, 32)), bank(image), rtol=0, atol=1e-5)


def test_per_slice_blockwise_equals_the_slices_filtered_alone() -> None:
    volume = make_synthetic_em((4, 80, 80), anisotropy=5.0).raw / 255.0
    bank = FilterBank(sigmas=(1.0, 3.5), per_slice=True)
    whole = bank(volume)
    np.testing.assert_allclose(blockwise(bank, volume, (2, 32, 32)), whole, rtol=0, atol=1e-5)
    flat = FilterBank(sigmas=bank.sigmas)
    for z, image in enumerate(volume):
        np.testing.assert_allclose(whole[:, z], flat(image), rtol=0, atol=1e-5)
