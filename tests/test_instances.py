"""Instance post-processing on constructed cases (boundaries, membranes, affinities round trip, size filter), and one
cut of cells for emfm predict and emfm evaluate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from scipy import ndimage
from skimage.metrics import adapted_rand_error
from skimage.segmentation import relabel_sequential

from emfm.blockwise.store import decode
from emfm.checkpoints import load_segmenter
from emfm.data.labeled import HeldOutSlices, LabeledVolume
from emfm.data.targets import NEAREST, make_target
from emfm.errors import EmfmError
from emfm.evaluation.evaluate import evaluate_slices, score_instances, true_instances
from emfm.instances import (
    from_affinities,
    from_boundaries,
    from_membranes,
    from_probabilities,
    grow,
    size_filter,
)
from emfm.models.segmenter import Segmenter
from tests.conftest import CommandLine


def same_objects(truth: np.ndarray, pred: np.ndarray) -> bool:
    """Equal up to renumbering (background included), permutation-invariant."""
    return adapted_rand_error(truth.astype(np.int64), pred.astype(np.int64), ignore_labels=())[0] == 0


def two_squares(gap: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and boundary of two touching 10x10 squares split by a boundary line with a ``gap`` in its middle."""
    foreground = np.zeros((16, 26), np.float32)
    foreground[3:13, 3:23] = 1
    boundary = np.zeros_like(foreground)
    boundary[3:13, 13] = 1
    boundary[8 - gap // 2:8 - gap // 2 + gap, 13] = 0
    return foreground, boundary


@pytest.mark.parametrize("method", ["watershed", "components"])
def test_touching_squares_split_by_a_boundary_line(method: str) -> None:
    labels = from_boundaries(*two_squares(), method=method)
    assert labels.dtype == np.uint32
    assert np.unique(labels).tolist() == [0, 1, 2]
    assert (labels[3:13, 3:13] == labels[5, 5]).all() and (labels[3:13, 14:23] == labels[5, 20]).all()
    assert (labels > 0).sum() == 200  # the boundary line is given back to the objects


def test_gap_in_boundary_merges_components_but_watershed_splits() -> None:
    foreground, boundary = two_squares(gap=4)
    assert np.unique(from_boundaries(foreground, boundary, method="components")).tolist() == [0, 1]
    assert np.unique(from_boundaries(foreground, boundary, method="watershed")).tolist() == [0, 1, 2]


def test_boundary_target_round_trip_3d_anisotropic() -> None:
    labels = np.zeros((5, 20, 24), np.int64)
    labels[:, 2:18, 2:12], labels[:, 2:10, 12:22], labels[:, 10:18, 12:22], labels[1:4, 2:6, 2:12] = 1, 2, 3, 4
    fg, bd = make_target("boundary")(labels[None])[0].numpy()
    inside = (fg == 1) & (bd == 0)  # who gets a thick boundary's pixels is a tie: compare the interiors
    for method in ("watershed", "components"):
        out = from_boundaries(fg, bd, method=method, sampling=(4, 1, 1))
        assert ((out > 0) == (fg > 0)).all() and same_objects(labels[inside], out[inside])
    fg, bd = make_target("boundary", in_plane=True)(labels[None])[0].numpy()  # no z boundary: 4 joins 1
    assert len(np.unique(from_boundaries(fg, bd, method="components", sampling=(4, 1, 1)))) == 4


def test_membranes_make_cells_that_fill_the_image() -> None:
    membrane = np.zeros((24, 24), np.float32)
    membrane[11:13, :] = 0.9  # a horizontal membrane, and a vertical one in the top half only
    membrane[:11, 11:13] = 0.8
    labels = from_membranes(membrane)
    assert np.unique(labels).tolist() == [1, 2, 3] and (labels > 0).all()
    assert labels[0, 0] != labels[0, 23] and labels[23, 0] == labels[23, 23]


@pytest.mark.parametrize("shape", [(24, 28), (4, 16, 18)])
def test_affinities_round_trip_to_the_labels(shape: tuple[int, ...]) -> None:
    labels = np.zeros(shape, np.int64)
    labels[..., 1:10, 2:14], labels[..., 1:10, 14:17], labels[..., 10:15, 2:17] = 5, 9, 2
    if len(shape) == 2:
        labels[17:23, 3:25] = 4
        offsets = [*NEAREST[2], [-3, 0], [0, -3]]
    else:
        labels[2:, 11:13, 5:9] = 7
        offsets = [*NEAREST[3], [0, -3, 0], [0, 0, -3]]
    aff = make_target("affinity", offsets=offsets)(labels[None])[0].clamp_min(0).numpy()
    out = from_affinities(aff, offsets, sampling=(4, 1, 1) if len(shape) == 3 else None)
    assert out.dtype == np.uint32 and same_objects(labels, out)


def test_affinities_agglomerate_an_over_segmented_dumbbell() -> None:
    labels = np.zeros((16, 30), np.int64)
    labels[2:14, 2:13], labels[6:9, 13:17], labels[2:14, 17:28] = 1, 1, 1  # two blobs and a neck: two DT seeds
    aff = make_target("affinity", offsets=NEAREST[2])(torch.from_numpy(labels)[None])[0].clamp_min(0).numpy()
    assert np.unique(from_affinities(aff, NEAREST[2], merge_threshold=1.0)).tolist() == [0, 1, 2]
    assert np.unique(from_affinities(aff, NEAREST[2])).tolist() == [0, 1]
    noisy = np.clip(aff + np.random.default_rng(0).normal(0, 0.15, aff.shape), 0, 1)
    assert same_objects(labels, from_affinities(noisy, NEAREST[2], min_size=10))


def test_size_filter_removes_small_objects_and_relabels() -> None:
    labels = np.zeros((6, 8), np.uint16)
    labels[0:3, 0:3], labels[4, 4], labels[0:2, 5:8], labels[5, 0:2] = 7, 3, 12, 2
    out = size_filter(labels, min_size=3)
    assert out.dtype == np.uint32 and np.unique(out).tolist() == [0, 1, 2]
    assert (out[0:3, 0:3] > 0).all() and out[4, 4] == 0 and out[5, 0] == 0
    assert np.unique(size_filter(labels)).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(EmfmError, match="min_size"):
        size_filter(labels, min_size=-1)
    with pytest.raises(EmfmError, match="integer labels"):
        size_filter(labels.astype(float))


def test_errors() -> None:
    foreground, boundary = two_squares()
    with pytest.raises(EmfmError, match="one shape"):
        from_boundaries(foreground, boundary[:-1])
    with pytest.raises(EmfmError, match="method"):
        from_boundaries(foreground, boundary, method="mutex")
    with pytest.raises(EmfmError, match="sampling"):
        from_membranes(boundary, sampling=(4, 1, 1))
    with pytest.raises(EmfmError, match="one offset per channel"):
        from_affinities(np.zeros((2, 4, 4)), NEAREST[3])
    with pytest.raises(EmfmError, match="nearest-neighbour"):
        from_affinities(np.zeros((1, 4, 4)), [[0, -3]])


def test_a_block_read_with_a_halo_floods_as_the_whole_region() -> None:
    """emfm predict grows each block read with a halo: equal heights of a uint8 map go by position, not by the
    watershed's queue (which holds other pixels in a block than in the whole region), so each block's part is the
    whole region's."""
    rng = np.random.default_rng(0)
    for _ in range(3):
        relief = ndimage.gaussian_filter(rng.random((96, 96)), 2)
        relief = np.round((relief - relief.min()) / (relief.max() - relief.min()) * 255) / 255
        seeds = ndimage.label(relief <= 0.4)[0]
        whole = grow(relief, seeds, None)
        for y in range(0, 96, 16):
            for x in range(0, 96, 16):
                window = (slice(max(0, y - 48), y + 64), slice(max(0, x - 48), x + 64))
                part = grow(relief[window], seeds[window], None)
                inner = (slice(y - window[0].start, y - window[0].start + 16),
                         slice(x - window[1].start, x - window[1].start + 16))
                np.testing.assert_array_equal(part[inner], whole[y:y + 16, x:x + 16])


class StoredMap:
    """``segmenter`` answering with a probability map read from a store, so that evaluate scores that very map."""

    def __init__(self, segmenter: Segmenter, probs: np.ndarray) -> None:
        self.hparams, self.target, self.input_shape = segmenter.hparams, segmenter.target, segmenter.input_shape
        self.probs = probs

    def predict_region(self, image: torch.Tensor) -> torch.Tensor:
        assert image.shape[1:] == self.probs.shape[1:]
        return torch.from_numpy(self.probs)


def test_predict_and_evaluate_cut_the_same_cells(synth_zarr: Path, model_2d: Path, run_cli: CommandLine,
                                                 tmp_path: Path) -> None:
    out = tmp_path / "p.zarr"
    [done] = run_cli([(["predict", f"checkpoint={model_2d}", f"input={synth_zarr}", f"output={out}", "instances=true",
                        "block_shape=[4,32,32]", "progress=false", f"hydra.run.dir={tmp_path / 'run'}"], None)])
    assert done.returncode == 0, done.stderr[-3000:]
    probs = decode(zarr.open_array(f"{out}/0", mode="r")[...])      # the uint8 map, read as the stitching reads it
    cells = zarr.open_array(f"{out}/labels/instances/0", mode="r")[...].astype(np.int64)
    segmenter = load_segmenter(model_2d)
    data = LabeledVolume(synth_zarr, f"{synth_zarr}/labels/membranes")
    crossing = 0
    for z in range(len(cells)):
        # the stitched blocks of emfm predict are the cut of the whole slice at once
        assert same_objects(cells[z], from_probabilities(probs[:, z], segmenter.hparams["target"], 0.5))
        boxes = [b for b in ndimage.find_objects(relabel_sequential(cells[z])[0]) if b is not None]
        crossing += sum(any(s.start // 32 != (s.stop - 1) // 32 for s in box) for box in boxes)
        # and emfm evaluate, given that map, scores exactly predict's cells
        report = evaluate_slices(StoredMap(segmenter, probs[:, z]), data, [z], [], [0.5])["report"]
        truth = true_instances(HeldOutSlices(data, [z], segmenter.input_shape)[0]["labels"][0].numpy(), "membrane")
        scores = score_instances(cells[z], truth)
        assert report["seeding"] == "components" and {k: report[k] for k in scores} == pytest.approx(scores, rel=1e-12)
    assert crossing >= 3                  # the check saw cells cut by block borders
