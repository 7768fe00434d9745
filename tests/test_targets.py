"""Targets: exact values on hand-made labels, ignore propagation, 2-D and 3-D, config errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from skimage.segmentation import find_boundaries

from emfm.data.targets import (
    IGNORE,
    NEAREST,
    TARGETS,
    affinities,
    make_target,
    offset_slices,
)
from emfm.errors import EmfmError


def instances(shape: tuple[int, ...] = (2, 6, 7), seed: int = 0) -> torch.Tensor:
    """Random blocky instance labels 0..3: runs of equal ids so there are contacts and interiors."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 4, size=(shape[0], *((s + 1) // 2 for s in shape[1:])))
    fine = coarse
    for axis in range(1, len(shape)):
        fine = fine.repeat(2, axis)
    return torch.from_numpy(fine[tuple(slice(0, s) for s in shape)]).long()


@pytest.mark.parametrize("kind", ["membrane", "foreground"])
def test_binary_is_label_above_zero_with_ignore(kind: str) -> None:
    labels = torch.tensor([[[0, 1, 5], [255, 0, 2]]])
    target = make_target(kind, ignore_label=255)
    assert (target.channels, target.loss) == (1, "sigmoid")
    assert target(labels).tolist() == [[[[0, 1, 1], [IGNORE, 0, 1]]]]


def test_semantic_maps_values_to_classes_and_others_to_background() -> None:
    labels = np.array([[[0, 1, 2, 7], [3, 9, 1, 2]]], dtype=np.uint16)  # numpy input, config-style keys
    target = make_target("semantic", classes={"1": 1, "2": 2, "3": 1}, ignore_label=9)
    assert (target.channels, target.loss) == (3, "softmax")
    out = target(labels)
    assert out.dtype == torch.int64
    assert out.tolist() == [[[0, 1, 2, 0], [1, IGNORE, 1, 2]]]
    assert make_target("semantic", classes={1: 1}, num_classes=4).channels == 4


def test_boundary_matches_find_boundaries_thick_2d_and_3d() -> None:
    labels = instances((2, 6, 7))
    out = make_target("boundary")(labels)
    assert out.shape == (2, 2, 6, 7)
    assert torch.equal(out[:, 0], (labels > 0).float())
    for sample, lab in zip(out, labels.numpy()):
        assert np.array_equal(sample[1].numpy(), find_boundaries(lab, mode="thick"))
    volume = instances((1, 3, 6, 6), seed=1)
    full, flat = make_target("boundary")(volume), make_target("boundary", in_plane=True)(volume)
    assert np.array_equal(full[0, 1].numpy(), find_boundaries(volume[0].numpy(), mode="thick"))
    for z in range(3):  # in-plane: each section on its own
        assert np.array_equal(flat[0, 1, z].numpy(), find_boundaries(volume[0, z].numpy(), mode="thick"))


def test_boundary_next_to_unknown_pixels_is_unknown_unless_already_boundary() -> None:
    labels = torch.tensor([[[1, 1, 1, 2], [1, 9, 1, 2], [1, 1, 1, 2]]])
    out = make_target("boundary", ignore_label=9)(labels)[0]
    assert out[0].tolist() == [[1, 1, 1, 1], [1, IGNORE, 1, 1], [1, 1, 1, 1]]
    assert out[1].tolist() == [[0, IGNORE, 1, 1], [IGNORE, IGNORE, 1, 1], [0, IGNORE, 1, 1]]


def test_affinity_values_by_hand() -> None:
    labels = torch.tensor([[[1, 1, 0, 2, 2, 3]]])  # (N, Y, X) = (1, 1, 6)
    out = make_target("affinity", offsets=[[0, -1], [0, 2], [-1, 0]])(labels)[0]
    assert out[0].tolist() == [[IGNORE, 1, 0, 0, 1, 0]]  # p vs p - 1 along x
    assert out[1].tolist() == [[0, 0, 0, 0, IGNORE, IGNORE]]  # p vs p + 2: 1-0, 1-2, 0-2, 2-3
    assert out[2].tolist() == [[IGNORE] * 6]  # no row above


def test_affinity_matches_pixel_loop_3d_with_ignore() -> None:
    labels = instances((2, 3, 5, 4), seed=2)
    labels[0, 1, 2, 1] = 7
    offsets = [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, -3, 0], [0, 0, 2]]
    target = make_target("affinity", offsets=offsets, ignore_label=7)
    out = target(labels)
    assert target.channels == 5 and out.shape == (2, 5, 3, 5, 4)
    for n, c, z, y, x in itertools.product(*map(range, out.shape)):
        q = np.add((z, y, x), offsets[c])
        inside = all(0 <= i < s for i, s in zip(q, labels.shape[1:]))
        a = labels[n, z, y, x].item()
        b = labels[(n, *q)].item() if inside else None
        expect = IGNORE if not inside or 7 in (a, b) else float(a == b and a != 0)
        assert out[n, c, z, y, x].item() == expect


def test_affinities_returns_the_valid_pair_mask() -> None:
    labels = instances((1, 4, 4))
    aff, ok = affinities(labels, NEAREST[2])
    assert ok[0, 0, 0].sum() == 0 and ok[0, 0, 1:].all() and ok[0, 1, :, 1:].all()
    assert torch.equal(make_target("affinity", offsets=NEAREST[2])(labels), aff.masked_fill(~ok, IGNORE))


def test_offset_slices_pair_up_and_clip() -> None:
    src, dst = offset_slices([-1, 2], (3, 4))
    assert (src, dst) == ((slice(1, 3), slice(0, 2)), (slice(0, 2), slice(2, 4)))
    x = np.arange(12).reshape(3, 4)
    assert x[offset_slices([0, 9], (3, 4))[0]].size == 0


def test_registry_and_errors() -> None:
    assert set(TARGETS) == {"membrane", "foreground", "boundary", "semantic", "affinity"}
    with pytest.raises(EmfmError, match="unknown; known"):
        make_target("distance")
    with pytest.raises(EmfmError, match="boundary"):
        make_target("boundary", offsets=[[0, 1]])
    with pytest.raises(EmfmError, match="offsets"):
        make_target("affinity", offsets=[[0, 0]])
    with pytest.raises(EmfmError, match="offsets"):
        make_target("affinity", offsets=[[0, -1]])(torch.zeros(1, 2, 3, 3, dtype=torch.long))
    with pytest.raises(EmfmError, match="classes"):
        make_target("semantic", classes={"membrane": 1})
    with pytest.raises(EmfmError, match="ignore_label"):
        make_target("membrane", ignore_label=0.5)
    with pytest.raises(EmfmError, match="integer"):
        make_target("membrane")(torch.zeros(1, 3, 3))
    with pytest.raises(EmfmError, match="shape"):
        make_target("membrane")(torch.zeros(3, 3, dtype=torch.long))
