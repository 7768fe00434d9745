"""Segmentation metrics for EM: how far is a predicted segmentation from the ground truth?

Four families, all taking ``(prediction or segmentation, ground truth)`` in that order:

* semantic (class maps): pixel error, per-class IoU and Dice;
* instance agreement (label volumes, ids need not match): Rand scores and variation of information,
  optionally restricted to the ground-truth foreground as in the ISBI 2012 / SNEMI3D / CREMI challenges;
* instance matching (label volumes, label 0 = background): precision, recall, F1 and AP at IoU thresholds,
  as in StarDist, Cellpose and the 2018 Data Science Bowl;
* clusters against classes (from a contingency table): IoU after Hungarian or majority matching, adjusted Rand;
* the ISBI 2012 protocol on a membrane probability map (borders thinned to one pixel, best of 11 thresholds),
  so that a score can be set beside published ones.

The instance functions share one sparse contingency table (pixels per pair of labels), so they work on
large 3-D volumes with millions of ids: memory grows with the pixels and the overlapping pairs, never
with (segments x ground-truth objects).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage, sparse
from scipy.optimize import linear_sum_assignment
from skimage.morphology import skeletonize
from skimage.segmentation import expand_labels

from emfm.errors import EmfmError

# IoU thresholds of the COCO / DSB2018 / StarDist evaluations: 0.5, 0.55, ..., 0.95.
DEFAULT_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
# The ISBI 2012 challenge's thresholds of a membrane probability map: 0.0, 0.1, ..., 1.0.
ISBI_THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(11))


def check_labels(
    seg: np.ndarray, truth: np.ndarray, names: tuple[str, str] = ("segmentation", "ground truth")
) -> tuple[np.ndarray, np.ndarray]:
    """Both as arrays of one shape holding integer (or bool) labels; anything else is an EmfmError."""
    seg, truth = np.asarray(seg), np.asarray(truth)
    if seg.shape != truth.shape:
        raise EmfmError(f"{names[0]} shape {list(seg.shape)} differs from {names[1]} shape {list(truth.shape)}")
    for name, array in zip(names, (seg, truth)):
        if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
            raise EmfmError(f"{name} has dtype {array.dtype}, but labels must be integers "
                            "(threshold or argmax a probability map first)")
    return seg, truth


# ----------------------------------------------------------------------------------------------------------------
# Semantic segmentation


def pixel_error(pred: np.ndarray, truth: np.ndarray, ignore_index: int | None = None) -> float:
    """Fraction of pixels whose predicted class differs from the true one (1 - pixel accuracy).

    Pixels where ``truth == ignore_index`` (e.g. unlabelled) are left out of both counts.
    """
    pred, truth = check_labels(pred, truth, ("prediction", "ground truth"))
    wrong = pred != truth
    if ignore_index is not None:
        valid = truth != ignore_index
        wrong &= valid
        total = int(np.count_nonzero(valid))
    else:
        total = truth.size
    if total == 0:
        raise EmfmError(f"no pixels to score: ground truth is empty or all ignore_index={ignore_index}")
    return int(np.count_nonzero(wrong)) / total


def class_scores(
    pred: np.ndarray, truth: np.ndarray, classes: int | Sequence[int], ignore_index: int | None = None
) -> dict[str, dict[int, float]]:
    """Per-class IoU and Dice, ``{"iou": {c: ...}, "dice": {c: ...}}``.

    ``classes``: an int K means classes 0..K-1 (background included; drop it yourself if unwanted), a
    sequence lists the class values. A class absent from both prediction and truth scores nan (there
    is nothing to get right or wrong), so ``np.nanmean`` averages over the classes that occur. Pixels where
    ``truth == ignore_index`` count for no class.
    """
    pred, truth = check_labels(pred, truth, ("prediction", "ground truth"))
    valid = None if ignore_index is None else truth != ignore_index
    ids = range(classes) if isinstance(classes, int) else [int(c) for c in classes]
    scores: dict[str, dict[int, float]] = {"iou": {}, "dice": {}}
    for c in ids:
        p, t = pred == c, truth == c
        if valid is not None:
            p &= valid
            t &= valid
        inter = int(np.count_nonzero(p & t))
        total = int(np.count_nonzero(p)) + int(np.count_nonzero(t))
        scores["iou"][c] = inter / (total - inter) if total else float("nan")
        scores["dice"][c] = 2 * inter / total if total else float("nan")
    return scores


# ----------------------------------------------------------------------------------------------------------------
# The shared contingency table


def contingency_table(
    seg: np.ndarray, truth: np.ndarray, foreground_only: bool = False
) -> tuple[sparse.csr_array, np.ndarray, np.ndarray]:
    """Sparse pixel counts per label pair: ``table[i, j]`` = #pixels labelled ``seg_ids[i]`` and ``truth_ids[j]``.

    Labels are renumbered to 0..n-1 first, so huge ids (uint64 from proofreading tools) cost nothing,
    and only overlapping pairs are stored. ``foreground_only`` keeps just the pixels where ``truth != 0``.
    Returns ``(table, seg_ids, truth_ids)``; the ids are sorted.
    """
    seg, truth = check_labels(seg, truth)
    if foreground_only:
        keep = truth != 0
        seg, truth = seg[keep], truth[keep]
    seg_ids, seg_index = np.unique(seg.ravel(), return_inverse=True)
    truth_ids, truth_index = np.unique(truth.ravel(), return_inverse=True)
    ones = np.ones(seg_index.size, dtype=np.int64)
    table = sparse.coo_array((ones, (seg_index.ravel(), truth_index.ravel())), shape=(seg_ids.size, truth_ids.size))
    return table.tocsr(), seg_ids, truth_ids  # tocsr() sums the duplicate (i, j) entries


def _scored_table(seg: np.ndarray, truth: np.ndarray, foreground_only: bool) -> tuple[sparse.csr_array, int]:
    """The contingency table and its pixel count, which must not be zero."""
    table, _, _ = contingency_table(seg, truth, foreground_only)
    n = int(table.sum())
    if n == 0:
        what = "ground truth has no foreground (label != 0) pixels" if foreground_only else "the label images are empty"
        raise EmfmError(f"nothing to score: {what}")
    return table, n


def _ratio(num: float, den: float, if_empty: float) -> float:
    return num / den if den else if_empty


# ----------------------------------------------------------------------------------------------------------------
# Instance agreement: Rand and information-theoretic scores
#
# Foreground restriction (``foreground_only=True``, the default) is the ISBI 2012 convention: pixels whose
# ground-truth label is 0 (membrane / background) are dropped before scoring (Arganda-Carreras et al. 2015,
# "we exclude the zero component of the original labels"), exactly like ``ignore_labels=(0,)`` in
# skimage.metrics. Segmentation label 0 inside the ground-truth foreground is then an ordinary segment, as
# in skimage; SNEMI3D/CREMI instead count each such pixel as its own segment, and ISBI's final scores first
# grow the segments over their boundaries ("thinning") so that no 0 is left. Pass segmentations without
# boundary pixels (or grown over them) if that difference matters.


def _pairs(counts: np.ndarray) -> float:
    """Number of unordered pixel pairs inside groups of the given sizes: sum n (n - 1) / 2."""
    counts = np.asarray(counts, dtype=np.float64)
    return float(np.sum(counts * (counts - 1))) / 2


def rand_scores(seg: np.ndarray, truth: np.ndarray, foreground_only: bool = True) -> dict[str, float]:
    """Pair-counting agreement of two labelings (ids need not match); higher is better, 1 = identical.

    Over all unordered pairs of distinct (foreground) pixels:

    * ``vrand_split`` = P(same segment | same true object): penalises splits (ISBI V^Rand_split;
      what skimage 0.26's ``adapted_rand_error`` returns as "precision", see scikit-image#6485);
    * ``vrand_merge`` = P(same true object | same segment): penalises merges (ISBI V^Rand_merge,
      skimage's "recall");
    * ``vrand`` = their harmonic mean (Rand F-score), ``adapted_rand_error`` = 1 - vrand (SNEMI3D/CREMI);
    * ``rand_index`` = fraction of pairs on which both labelings agree (same-same or different-different).

    Pairs are distinct pixels, as in skimage; the ISBI paper's sum-of-squared-probabilities form also
    counts each pixel paired with itself, which differs by O(1/pixels). Split (merge) scores are 1 when
    no two pixels share a true object (a segment), as nothing can then be split (merged).
    """
    table, n = _scored_table(seg, truth, foreground_only)
    same_both = _pairs(table.data)
    same_seg = _pairs(table.sum(axis=1))
    same_truth = _pairs(table.sum(axis=0))
    all_pairs = n * (n - 1) / 2
    vrand = _ratio(2 * same_both, same_seg + same_truth, 1.0)
    return {
        "rand_index": _ratio(all_pairs - same_seg - same_truth + 2 * same_both, all_pairs, 1.0),
        "adapted_rand_error": 1.0 - vrand,
        "vrand": vrand,
        "vrand_split": _ratio(same_both, same_truth, 1.0),
        "vrand_merge": _ratio(same_both, same_seg, 1.0),
    }


def _entropy(counts: np.ndarray, n: int) -> float:
    """Shannon entropy in bits of the distribution ``counts / n``."""
    p = np.asarray(counts, dtype=np.float64).ravel() / n
    p = p[p > 0]
    return float(-np.sum(p * np.log2(p)))


def voi(seg: np.ndarray, truth: np.ndarray, foreground_only: bool = True) -> dict[str, float]:
    """Variation of information and the ISBI normalised information scores, in bits.

    * ``vi_split`` = H(seg | truth): over-segmentation (splits), 0 when seg refines truth;
    * ``vi_merge`` = H(truth | seg): under-segmentation (merges), 0 when truth refines seg;
    * ``vi`` = vi_split + vi_merge (lower is better, 0 = identical up to relabelling);
    * ``vinfo_split`` = I(seg; truth) / H(seg) and ``vinfo_merge`` = I(seg; truth) / H(truth) (ISBI
      V^Info_split / V^Info_merge, higher is better), ``vinfo`` = their harmonic mean
      2 I / (H(seg) + H(truth)).

    ``vi_split``/``vi_merge`` are skimage's ``variation_of_information(truth, seg)``. If H(seg) = 0 (a
    single segment) nothing is split and ``vinfo_split`` = 1; likewise ``vinfo_merge`` = 1 when H(truth) = 0.
    """
    table, n = _scored_table(seg, truth, foreground_only)
    h_seg, h_truth = _entropy(table.sum(axis=1), n), _entropy(table.sum(axis=0), n)
    h_joint = _entropy(table.data, n)
    vi_split, vi_merge = max(h_joint - h_truth, 0.0), max(h_joint - h_seg, 0.0)  # max: float round-off
    mutual = max(h_seg + h_truth - h_joint, 0.0)
    vinfo_split, vinfo_merge = _ratio(mutual, h_seg, 1.0), _ratio(mutual, h_truth, 1.0)
    return {
        "vi": vi_split + vi_merge,
        "vi_split": vi_split,
        "vi_merge": vi_merge,
        "vinfo": _ratio(2 * vinfo_split * vinfo_merge, vinfo_split + vinfo_merge, 0.0),
        "vinfo_split": vinfo_split,
        "vinfo_merge": vinfo_merge,
    }


# ----------------------------------------------------------------------------------------------------------------
# Instance matching


def instance_scores(
    seg: np.ndarray, truth: np.ndarray, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> dict[str, Any]:
    """Object-level detection scores at IoU thresholds; label 0 is background, every other id one object.

    A predicted and a true object match when their IoU > threshold. Per threshold (lists aligned with
    ``thresholds``): ``tp``, ``fp`` (unmatched predictions), ``fn`` (unmatched true objects),
    ``precision`` = TP/(TP+FP), ``recall`` = TP/(TP+FN), ``f1`` = 2TP/(2TP+FP+FN), and
    ``ap`` = TP/(TP+FP+FN), the per-threshold "average precision" of the DSB2018 / Cellpose / StarDist
    evaluations (StarDist names it "accuracy"; it is not the area under a precision-recall curve).
    ``mean_ap`` is ``ap`` averaged over the thresholds (DSB2018's score with the default thresholds,
    also called mean segmentation accuracy), ``mean_f1`` likewise for F1.

    A ratio whose denominator is 0 is 0 (as in StarDist), except that with no objects in either image
    every score is 1.
    """
    thresholds = [float(t) for t in thresholds]
    if not thresholds or not all(0.5 <= t <= 1 for t in thresholds):
        raise EmfmError(f"instance IoU thresholds must lie in [0.5, 1], got {thresholds} "
                        "(below 0.5 an object can match several, which needs an assignment step)")
    table, seg_ids, truth_ids = contingency_table(seg, truth)
    seg_sizes, truth_sizes = table.sum(axis=1), table.sum(axis=0)
    pairs = table.tocoo()
    objects = (seg_ids[pairs.row] != 0) & (truth_ids[pairs.col] != 0)
    rows, cols, inter = pairs.row[objects], pairs.col[objects], pairs.data[objects].astype(np.float64)
    iou = inter / (seg_sizes[rows] + truth_sizes[cols] - inter)
    n_seg, n_truth = int(np.count_nonzero(seg_ids)), int(np.count_nonzero(truth_ids))
    empty = 1.0 if n_seg == n_truth == 0 else 0.0
    scores: dict[str, list[float]] = {k: [] for k in ("tp", "fp", "fn", "precision", "recall", "f1", "ap")}
    for t in thresholds:
        # IoU > 0.5 means the overlap is more than half of each object, so every object has at most one
        # partner above a threshold >= 0.5: counting the pairs is the matching, no Hungarian step needed.
        tp = int(np.count_nonzero(iou > t))
        fp, fn = n_seg - tp, n_truth - tp
        scores["tp"].append(tp)
        scores["fp"].append(fp)
        scores["fn"].append(fn)
        scores["precision"].append(_ratio(tp, tp + fp, empty))
        scores["recall"].append(_ratio(tp, tp + fn, empty))
        scores["f1"].append(_ratio(2 * tp, 2 * tp + fp + fn, empty))
        scores["ap"].append(_ratio(tp, tp + fp + fn, empty))
    return {
        "thresholds": thresholds,
        **scores,
        "mean_ap": float(np.mean(scores["ap"])),
        "mean_f1": float(np.mean(scores["f1"])),
    }


def matched_iou(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class IoU after the one-to-one (Hungarian) matching of clusters to classes.

    ``table[i, j]`` counts voxels of cluster i and class j. Returns (IoU per class, the cluster
    matched to each class, -1 where there are fewer clusters than classes).
    """
    table = np.asarray(table, dtype=np.float64)
    union = table.sum(1, keepdims=True) + table.sum(0, keepdims=True) - table
    iou = np.divide(table, union, out=np.zeros_like(table), where=union > 0)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    matched = np.full(table.shape[1], -1)
    matched[cols] = rows
    scores = np.array([iou[m, j] if m >= 0 else 0.0 for j, m in enumerate(matched)])
    return scores, matched


def merged_iou(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class IoU when every cluster joins the class it overlaps most (several clusters per class).

    Returns (IoU per class, the class each cluster joined).
    """
    table = np.asarray(table, dtype=np.float64)
    joined = table.argmax(1)
    merged = np.stack([table[joined == j].sum(0) for j in range(table.shape[1])])   # (classes, classes)
    inter = np.diag(merged)
    union = merged.sum(1) + table.sum(0) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0), joined


def adjusted_rand_index(table: np.ndarray) -> float:
    """Hubert and Arabie's adjusted Rand index of two labelings from their contingency table."""
    table = np.asarray(table, dtype=np.float64)
    n = table.sum()
    pairs = _pairs(table.ravel())
    rows, cols = _pairs(table.sum(1)), _pairs(table.sum(0))
    expected = rows * cols / max(_pairs(np.array([n])), 1.0)
    top = 0.5 * (rows + cols)
    return 1.0 if top == expected else float((pairs - expected) / (top - expected))


# ----------------------------------------------------------------------------------------------------------------
# The ISBI 2012 protocol


def thinned_cells(borders: np.ndarray) -> np.ndarray:
    """Cells of a 2-D border mask after thinning the borders to one pixel (the borders' skeleton, label 0): the
    ISBI 2012 scoring's step that makes V_rand robust to how wide anyone draws membranes. The mask is extended past
    the image's edge first: a skeleton's ends retreat by half a border's width, which would open every border that
    meets the edge."""
    pad = 32
    skeleton = skeletonize(np.pad(borders, pad, mode="edge"))[pad:-pad, pad:-pad]
    return ndimage.label(~skeleton)[0]


def isbi_scores(membrane: np.ndarray, truth: np.ndarray, known: np.ndarray | None = None,
                thresholds: Sequence[float] = ISBI_THRESHOLDS) -> dict[float, dict[str, float]]:
    """V_rand and V_info of a 2-D membrane probability map against a 2-D membrane mask, per threshold, as the ISBI
    2012 challenge scores them: both border sets thinned to one pixel, scores restricted to the true cells (the
    thinned true borders and ``known == False`` pixels are left out); the proposal's one-pixel borders join the
    nearest cell. The challenge reports the best threshold's V_rand (and that threshold's V_info)."""
    cells = thinned_cells(truth > 0)
    if known is not None:
        cells = np.where(known, cells, 0)
    scores = {}
    for t in thresholds:
        proposal = expand_labels(thinned_cells(membrane > t), distance=2)
        scores[float(t)] = {"vrand": rand_scores(proposal, cells)["vrand"], "vinfo": voi(proposal, cells)["vinfo"]}
    return scores


def bootstrap_interval(n: int, pick: Callable[[np.ndarray], Any], statistic: Callable[[Any], Any],
                       draws: int = 1000, seed: int = 0) -> tuple[float, float]:
    """A 95 % percentile interval of ``statistic(pick(regions))`` over resamples, with replacement, of the indices
    of ``n`` scored regions: how much a score owes to which eval slices were drawn."""
    resamples = np.random.default_rng(seed).integers(0, n, size=(draws, n))
    low, high = np.percentile([float(statistic(pick(r))) for r in resamples], [2.5, 97.5])
    return float(low), float(high)
