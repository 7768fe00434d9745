"""Segmentation metrics: hand-computed tiny cases, agreement with scikit-image, invariances, bad input."""

import itertools
import math

import numpy as np
import pytest
from skimage.metrics import adapted_rand_error, variation_of_information

from emfm.errors import EmfmError
from emfm.metrics import (
    DEFAULT_THRESHOLDS,
    ISBI_THRESHOLDS,
    bootstrap_interval,
    class_scores,
    contingency_table,
    instance_scores,
    isbi_scores,
    pixel_error,
    rand_scores,
    thinned_cells,
    voi,
)

# Semantic 2x4 case. Wrong pixels: (0, 1) and (1, 1).
SEM_TRUTH = np.array([[0, 0, 1, 1], [0, 1, 1, 2]])
SEM_PRED = np.array([[0, 1, 1, 1], [0, 0, 1, 2]])

# Instance-agreement 2x4 case: the segmentation splits true object 1 into two halves.
TRUTH = np.array([[1, 1, 1, 1], [2, 2, 2, 2]])
SPLIT = np.array([[1, 1, 2, 2], [3, 3, 3, 3]])


def random_labels(rng: np.random.Generator, shape: tuple[int, ...], ids: int) -> np.ndarray:
    """Blocky random labels (4x4 blocks of one id in-plane), so segments overlap like real objects."""
    coarse = rng.integers(0, ids, size=(shape[0], shape[1] // 4, shape[2] // 4))
    return coarse.repeat(4, axis=1).repeat(4, axis=2)


def test_pixel_error_by_hand() -> None:
    assert pixel_error(SEM_PRED, SEM_TRUTH) == 2 / 8
    # ignoring truth == 0 leaves (0,2) (0,3) (1,1) (1,2) (1,3), of which (1,1) is wrong
    assert pixel_error(SEM_PRED, SEM_TRUTH, ignore_index=0) == 1 / 5


def test_class_iou_and_dice_by_hand() -> None:
    scores = class_scores(SEM_PRED, SEM_TRUTH, classes=4)
    # class 0: pred {(0,0) (1,0) (1,1)}, truth {(0,0) (0,1) (1,0)}: inter 2, union 4, sizes 3 + 3
    # class 1: pred {(0,1) (0,2) (0,3) (1,2)}, truth {(0,2) (0,3) (1,1) (1,2)}: inter 3, union 5, sizes 4 + 4
    # class 2: both {(1,3)}; class 3: absent from both -> nan
    assert scores["iou"][0] == pytest.approx(2 / 4) and scores["dice"][0] == pytest.approx(4 / 6)
    assert scores["iou"][1] == pytest.approx(3 / 5) and scores["dice"][1] == pytest.approx(6 / 8)
    assert scores["iou"][2] == 1.0 and scores["dice"][2] == 1.0
    assert math.isnan(scores["iou"][3]) and math.isnan(scores["dice"][3])
    # ignoring truth == 0 drops (0,1) from the class 1 prediction: pred 3, truth 4, inter 3, union 4
    ignored = class_scores(SEM_PRED, SEM_TRUTH, classes=[1], ignore_index=0)
    assert ignored["iou"] == {1: pytest.approx(3 / 4)} and ignored["dice"] == {1: pytest.approx(6 / 7)}


def test_rand_scores_by_hand() -> None:
    scores = rand_scores(SPLIT, TRUTH)
    # 8 pixels, 28 pairs. Same truth: 2 * C(4,2) = 12. Same seg: C(2,2) + C(2,2) + C(4,2) = 8.
    # Same in both: overlaps 2, 2, 4 -> 1 + 1 + 6 = 8. Disagreements: the 2x2 pairs across the split = 4.
    assert scores["vrand_split"] == pytest.approx(8 / 12)  # the split is penalised ...
    assert scores["vrand_merge"] == 1.0  # ... and nothing is merged
    assert scores["vrand"] == pytest.approx(2 * 8 / (12 + 8))
    assert scores["adapted_rand_error"] == pytest.approx(1 - 0.8)
    assert scores["rand_index"] == pytest.approx(24 / 28)
    merged = rand_scores(TRUTH, SPLIT)  # roles swapped: now a merge
    assert merged["vrand_merge"] == pytest.approx(8 / 12) and merged["vrand_split"] == 1.0


def test_rand_index_matches_brute_force_over_pairs() -> None:
    rng = np.random.default_rng(1)
    seg, truth = rng.integers(0, 3, size=(2, 5)), rng.integers(0, 3, size=(2, 5))
    pairs = list(itertools.combinations(zip(seg.ravel(), truth.ravel()), 2))
    agree = sum((a[0] == b[0]) == (a[1] == b[1]) for a, b in pairs)
    assert rand_scores(seg, truth, foreground_only=False)["rand_index"] == pytest.approx(agree / len(pairs))


def test_voi_by_hand() -> None:
    scores = voi(SPLIT, TRUTH)
    # H(truth) = 1 bit (halves); H(seg) = H(1/4, 1/4, 1/2) = 1.5 bits; seg refines truth so H(joint) = 1.5.
    # H(seg|truth) = 1.5 - 1 = 0.5, H(truth|seg) = 0, I = 1 + 1.5 - 1.5 = 1.
    assert scores["vi_split"] == pytest.approx(0.5) and scores["vi_merge"] == pytest.approx(0.0)
    assert scores["vi"] == pytest.approx(0.5)
    assert scores["vinfo_split"] == pytest.approx(1 / 1.5) and scores["vinfo_merge"] == pytest.approx(1.0)
    assert scores["vinfo"] == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    merged = voi(TRUTH, SPLIT)
    assert merged["vi_merge"] == pytest.approx(0.5) and merged["vi_split"] == pytest.approx(0.0)


def test_foreground_restriction_drops_truth_background() -> None:
    truth = np.array([[1, 1, 0, 0], [2, 2, 2, 0]])
    seg = np.array([[5, 5, 5, 6], [7, 7, 6, 6]])
    keep = truth != 0
    for fn in (rand_scores, voi):
        assert fn(seg, truth) == pytest.approx(fn(seg[keep], truth[keep], foreground_only=False))
    assert rand_scores(seg, truth)["vrand_merge"] == 1.0  # seg 5/6 spill only into truth background
    assert rand_scores(seg, truth, foreground_only=False)["vrand_merge"] < 1.0


@pytest.mark.parametrize("foreground_only", [True, False])
def test_agrees_with_skimage_on_random_volumes(foreground_only: bool) -> None:
    rng = np.random.default_rng(0)
    truth = random_labels(rng, (4, 32, 32), 8)
    seg = np.where(rng.random(truth.shape) < 0.2, rng.integers(0, 12, truth.shape), truth * 3 % 11)
    ignore = (0,) if foreground_only else ()
    are, split, merge = adapted_rand_error(truth, seg, ignore_labels=ignore)  # skimage's "precision", "recall"
    rand = rand_scores(seg, truth, foreground_only=foreground_only)
    assert rand["adapted_rand_error"] == pytest.approx(are, rel=1e-10)
    assert rand["vrand_split"] == pytest.approx(split, rel=1e-10)  # skimage#6485: its precision is the split score
    assert rand["vrand_merge"] == pytest.approx(merge, rel=1e-10)
    vi_split, vi_merge = variation_of_information(truth, seg, ignore_labels=ignore)
    info = voi(seg, truth, foreground_only=foreground_only)
    assert info["vi_split"] == pytest.approx(vi_split, rel=1e-9)
    assert info["vi_merge"] == pytest.approx(vi_merge, rel=1e-9)


def test_instance_scores_split_merge_miss_and_false_positive() -> None:
    # Columns:   A=1 (seg covers 3 of 4), B=2 (split in two), C=3 and D=4 (merged), E=5 (missed), 2 false positives
    truth = np.array([1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 4, 4, 4, 4, 5, 5, 0, 0, 0, 0])
    seg = np.array([1, 1, 1, 0, 3, 3, 4, 4, 5, 5, 5, 5, 5, 5, 0, 0, 6, 6, 7, 7])
    truth, seg = np.tile(truth, (2, 1)), np.tile(seg, (2, 1))
    # IoU: A-1 = 6/8 = 0.75; B-3 = B-4 = 4/8 = 0.5 (not > 0.5); D-5 = 8/12 = 0.667; C-5 = 4/12.
    # 5 true objects, 6 predicted. Thresholds 0.5..0.65: TP 2 (A, D), FP 4, FN 3. 0.7: TP 1 (A), FP 5, FN 4.
    # 0.75 and up: nothing matches (0.75 is not > 0.75).
    scores = instance_scores(seg, truth)
    assert scores["thresholds"] == list(DEFAULT_THRESHOLDS)
    assert scores["tp"] == [2, 2, 2, 2, 1, 0, 0, 0, 0, 0]
    assert scores["fp"] == [4, 4, 4, 4, 5, 6, 6, 6, 6, 6]
    assert scores["fn"] == [3, 3, 3, 3, 4, 5, 5, 5, 5, 5]
    expect = {
        "precision": [2 / 6] * 4 + [1 / 6] + [0] * 5,
        "recall": [2 / 5] * 4 + [1 / 5] + [0] * 5,
        "f1": [4 / 11] * 4 + [2 / 11] + [0] * 5,
        "ap": [2 / 9] * 4 + [1 / 10] + [0] * 5,
    }
    for key, values in expect.items():
        assert scores[key] == pytest.approx(values), key
    assert scores["mean_ap"] == pytest.approx((4 * 2 / 9 + 1 / 10) / 10)
    assert instance_scores(seg, truth, thresholds=[0.7])["ap"] == pytest.approx([1 / 10])


def test_identical_segmentations_score_perfectly_and_ids_do_not_matter() -> None:
    rng = np.random.default_rng(2)
    truth = random_labels(rng, (3, 16, 16), 20)
    assert rand_scores(truth, truth)["vrand"] == 1.0 and rand_scores(truth, truth)["rand_index"] == 1.0
    info = voi(truth, truth)
    assert info["vi"] == pytest.approx(0.0, abs=1e-12) and info["vinfo"] == pytest.approx(1.0)
    assert instance_scores(truth, truth)["ap"] == [1.0] * len(DEFAULT_THRESHOLDS)

    seg = np.where(rng.random(truth.shape) < 0.1, 0, truth)  # an imperfect segmentation ...
    ids = np.concatenate([[0], rng.permutation(np.arange(1, 20)) + 1000])  # ... relabelled, 0 kept as background
    relabelled = ids[seg]
    assert rand_scores(relabelled, truth) == pytest.approx(rand_scores(seg, truth))
    assert voi(relabelled, truth) == pytest.approx(voi(seg, truth))
    instances, expected = instance_scores(relabelled, truth), instance_scores(seg, truth)
    assert expected["mean_ap"] < 1 and instances.keys() == expected.keys()
    for key, value in expected.items():
        assert instances[key] == pytest.approx(value), key


def test_degenerate_cases_are_defined() -> None:
    ones = np.ones((2, 4), dtype=np.int64)
    assert voi(ones, ones)["vinfo"] == 1.0 and rand_scores(ones, ones)["vrand"] == 1.0  # H = 0 on both sides
    assert voi(ones, TRUTH)["vinfo_split"] == 1.0 and voi(ones, TRUTH)["vinfo_merge"] == 0.0  # all merged
    empty = np.zeros((2, 4), dtype=np.int64)
    assert instance_scores(empty, empty)["mean_ap"] == 1.0  # nothing to find, nothing found
    assert instance_scores(empty, TRUTH)["mean_ap"] == 0.0


def test_contingency_table_is_sparse_and_handles_huge_ids() -> None:
    seg = np.array([[2**40, 2**40], [7, 0]], dtype=np.uint64)
    truth = np.array([[1, 2], [2, 2]])
    table, seg_ids, truth_ids = contingency_table(seg, truth)
    assert table.shape == (3, 2) and list(seg_ids) == [0, 7, 2**40] and list(truth_ids) == [1, 2]
    assert table.toarray().tolist() == [[0, 1], [0, 1], [1, 1]]


def test_bad_input_raises() -> None:
    shapes = r"segmentation shape \[4, 32, 32\] differs from ground truth shape \[4, 32, 30\]"
    with pytest.raises(EmfmError, match=shapes):
        rand_scores(np.zeros((4, 32, 32), int), np.zeros((4, 32, 30), int))
    with pytest.raises(EmfmError, match="prediction has dtype float32, but labels must be integers"):
        pixel_error(np.zeros((2, 2), np.float32), np.zeros((2, 2), int))
    with pytest.raises(EmfmError, match="ground truth has dtype float64"):
        voi(np.zeros((2, 2), int), np.zeros((2, 2)))
    with pytest.raises(EmfmError, match="no foreground"):
        voi(np.ones((2, 2), int), np.zeros((2, 2), int))
    with pytest.raises(EmfmError, match="thresholds must lie in"):
        instance_scores(TRUTH, TRUTH, thresholds=[0.3])


def membrane_grid(width: int) -> np.ndarray:
    """A 40x40 membrane mask: one vertical and one horizontal membrane ``width`` px wide, four cells."""
    mask = np.zeros((40, 40), bool)
    mask[:, 20 - width // 2: 20 - width // 2 + width] = True
    mask[20 - width // 2: 20 - width // 2 + width, :] = True
    return mask


def test_thinning_leaves_one_pixel_borders_between_the_same_cells() -> None:
    cells = thinned_cells(membrane_grid(5))
    assert len(np.unique(cells)) == 5                               # four cells and the border
    assert (cells == 0).sum(axis=1)[5] == 1 and (cells == 0).sum(axis=0)[5] == 1   # one pixel wide, away from the cross


def test_isbi_scores_ignore_membrane_width_and_punish_a_gap_as_a_merge() -> None:
    truth = membrane_grid(1)
    wide = isbi_scores(membrane_grid(7).astype(float), truth)      # the same cells, drawn 7x wider
    assert list(wide) == list(ISBI_THRESHOLDS)
    assert all(wide[t]["vrand"] == pytest.approx(1.0) for t in ISBI_THRESHOLDS[:-1])   # any t below the map's 1.0
    assert wide[1.0]["vrand"] < 0.5                               # nothing above 1.0: one cell, everything merged
    gap = membrane_grid(3).astype(float)
    gap[:10, 18:23] = 0.0                                          # the vertical membrane open at the top
    merged = isbi_scores(gap, truth)
    assert max(m["vrand"] for m in merged.values()) < 0.9          # two cells joined at every threshold
    unknown = np.ones_like(truth)
    unknown[:, :21] = False                                        # only the right-hand cells are labelled
    assert isbi_scores(gap, truth, unknown)[0.5]["vrand"] == pytest.approx(1.0)    # the gap is outside them


def test_bootstrap_interval_brackets_the_mean_and_is_reproducible() -> None:
    values = np.array([0.2, 0.4, 0.9, 0.5, 0.3])
    low, high = bootstrap_interval(len(values), values.take, np.mean)
    assert values.min() <= low < values.mean() < high <= values.max()
    assert (low, high) == bootstrap_interval(len(values), values.take, np.mean)
    assert bootstrap_interval(3, np.full(3, 0.7).take, np.mean) == pytest.approx((0.7, 0.7))
