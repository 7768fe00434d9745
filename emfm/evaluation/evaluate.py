"""``emfm evaluate``: predict a labeled region with a fine-tuned model, derive instances, score both.

Semantic scores (IoU, Dice per class) use the same sliding window and counting as validation
during fine-tuning. Instance scores follow the ISBI 2012 convention for membrane and boundary
predictions: the prediction is turned into cells at a threshold and compared with the ground-truth
cells on the ground-truth foreground. By default the cells are made as ``emfm predict`` makes them
(``seeding: components``), so the scores are those of what the tool writes. The threshold is the
one with the best mean Rand F-score on ``tune_slices``, other slices than the scored ones; without
them it is the best on the scored slices themselves, an optimistic choice the report names.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from scipy import ndimage

from emfm.checkpoints import fine_tuning_data
from emfm.data.labeled import IGNORE, HeldOutSlices, LabeledVolume, parse_slices
from emfm.data.targets import Target
from emfm.errors import EmfmError
from emfm.evaluation.metrics import instance_scores, rand_scores, voi
from emfm.finetune.instances import (
    METHODS,
    from_affinities,
    from_boundaries,
    from_membranes,
    size_filter,
)
from emfm.finetune.segmentation import load_segmenter, overlap_counts
from emfm.paths import resolved

log = logging.getLogger(__name__)

THRESHOLDS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # down to 0.02: gappy membranes cut best low
SEEDING = "components"  # the seeds of ``emfm predict``'s instances (emfm/predict/stitch.py)


class Segments(Protocol):
    """What scoring asks of a model: a ``SegmentationModule``, or a peer tool's network behind the same
    members (:class:`~emfm.finetune.peers.PeerSegmenter`), so that both are scored by this one code."""

    @property
    def hparams(self) -> Mapping[str, Any]: ...          # "target": the target config

    @property
    def target(self) -> Target: ...

    @property
    def input_shape(self) -> tuple[int, ...]: ...        # the sliding window's tile

    def predict_region(self, image: torch.Tensor) -> torch.Tensor: ...


def predicted_instances(probs: np.ndarray, target: Mapping[str, Any], threshold: float,
                        min_size: int, seeding: str = SEEDING) -> np.ndarray | None:
    """Instances from the probabilities of an instance-capable target; ``None`` for semantic targets."""
    kind = target["kind"]
    if kind == "membrane":
        return from_membranes(probs[0], threshold, method=seeding, min_size=min_size)
    if kind == "boundary":
        return from_boundaries(probs[0], probs[1], threshold, method=seeding, min_size=min_size)
    if kind == "affinity":
        return from_affinities(probs, target["offsets"], threshold, min_size=min_size)
    if kind == "foreground":
        return size_filter(ndimage.label(probs[0] > threshold)[0], min_size)
    return None


def true_instances(labels: np.ndarray, kind: str) -> np.ndarray:
    """Ground-truth objects: cells between membranes for ``membrane``, components for ``foreground``,
    the instance ids themselves otherwise; unlabeled pixels become background (not scored)."""
    known = labels != IGNORE
    if kind == "membrane":
        return ndimage.label((labels == 0) & known)[0]
    if kind == "foreground":
        return ndimage.label((labels > 0) & known)[0]
    return np.where(known, labels, 0)


def score_instances(seg: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Rand and VI scores on the ground-truth foreground, and instance AP."""
    if not truth.any():
        raise EmfmError("no ground-truth objects in the evaluated region")
    rand, info, inst = rand_scores(seg, truth), voi(seg, truth), instance_scores(seg, truth)
    return {**rand, **info, "ap50": inst["ap"][0], "mean_ap": inst["mean_ap"]}


def evaluate_region(module: Segments, regions: HeldOutSlices, thresholds: Sequence[float],
                    min_size: int = 0, seeding: str = SEEDING) -> dict[str, Any]:
    """Scores of ``module`` on every region of ``regions`` (instances at the best of ``thresholds``),
    plus the probabilities for pictures."""
    target = dict(module.hparams["target"])
    counts: list[torch.Tensor] = []
    per_threshold: dict[float, list[dict[str, float]]] = {t: [] for t in thresholds}
    last = None
    for index in range(len(regions)):
        item = regions[index]
        probs = module.predict_region(item["image"])
        truth = module.target(item["labels"])[0]
        counts.append(overlap_counts(probs, truth, module.target.loss))
        labels = item["labels"][0].numpy()
        probs_np = probs.numpy()
        gt = true_instances(labels, target["kind"])
        for t in thresholds if gt.any() else ():    # a region without true objects has no instance scores
            seg = predicted_instances(probs_np, target, t, min_size, seeding)
            if seg is not None:
                per_threshold[t].append(score_instances(seg, gt))
        last = (item["image"][0].numpy(), probs_np, labels)
    inter, pred, true = torch.stack(counts).sum(0)
    iou, dice = (inter / (pred + true - inter).clamp(min=1)), (2 * inter / (pred + true).clamp(min=1))
    report: dict[str, Any] = {
        "iou": float(iou.mean()), "dice": float(dice.mean()),
        "per_class": {str(c + 1): {"iou": float(i), "dice": float(d)} for c, (i, d) in enumerate(zip(iou, dice))},
    }
    scored = {t: rows for t, rows in per_threshold.items() if rows}
    if scored:
        means = {t: {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} for t, rows in scored.items()}
        best = max(means, key=lambda t: means[t]["vrand"])
        report.update({"threshold": best, **means[best], "per_threshold": {str(t): m for t, m in means.items()},
                       "instance_regions": f"{len(scored[best])} of {len(regions)}"})
    return {"report": report, "example": last}


def evaluate_slices(module: Segments, data: LabeledVolume, slices: Sequence[int],
                    tune_slices: Sequence[int], thresholds: Sequence[float], min_size: int = 0,
                    seeding: str = SEEDING) -> dict[str, Any]:
    """``evaluate_region`` on ``slices``, the instance threshold chosen on ``tune_slices`` when given."""
    if seeding not in METHODS:
        raise EmfmError(f"seeding={seeding!r}: expected one of {', '.join(METHODS)}")
    shape = module.input_shape
    chosen = None
    if tune_slices:
        tuned = evaluate_region(module, HeldOutSlices(data, tune_slices, shape), thresholds, min_size, seeding)
        chosen = tuned["report"].get("threshold")   # None: no true objects on the tuning slices
    result = evaluate_region(module, HeldOutSlices(data, slices, shape),
                             thresholds if chosen is None else [chosen], min_size, seeding)
    if "threshold" in result["report"]:
        result["report"].update(seeding=seeding, threshold_chosen_on=(
            f"tune_slices {list(tune_slices)}" if chosen is not None else "the scored slices (optimistic)"))
    return result


def evaluate(cfg: Any) -> dict[str, Any]:
    """The ``emfm evaluate`` command: writes ``report.json`` and ``report.csv`` to ``cfg.output_dir``."""
    module = load_segmenter(cfg.checkpoint)
    data = LabeledVolume(cfg.raw, cfg.labels, cfg.get("ignore_label"), missing_chunks=cfg.missing_chunks)
    tune = parse_slices(cfg.tune_slices, data.depth, "tune_slices")
    slices = parse_slices(cfg.slices, data.depth, "slices") or [z for z in range(data.depth) if z not in tune]
    if overlap := sorted(set(tune) & set(slices)):
        raise EmfmError(f"tune_slices {overlap} are also scored (slices): choose the threshold on other slices")
    if trained := training_slices(cfg.checkpoint, cfg.raw, slices):
        log.warning("slices %s of %s are training slices of checkpoint=%s (its data.labeled_slices): their scores "
                    "are optimistic; score held-out slices", trained, cfg.raw, cfg.checkpoint)
    result = evaluate_slices(module, data, slices, tune, list(cfg.thresholds), cfg.min_size, cfg.seeding)
    report = {"checkpoint": str(Path(cfg.checkpoint).resolve()), "raw": str(cfg.raw), "labels": str(cfg.labels),
              "slices": slices, "target": dict(module.hparams["target"]), **result["report"]}
    write_report(report, Path(cfg.output_dir))
    if "threshold" in report:
        log.info("instances at threshold %g (chosen on %s): emfm predict ... instances=true threshold=%g",
                 report["threshold"], report["threshold_chosen_on"], report["threshold"])
    return report


def training_slices(checkpoint: str, raw: str, slices: Sequence[int]) -> list[int]:
    """Which of ``slices`` of ``raw`` the fine-tuning ``checkpoint`` was trained on, by its record of its data."""
    trained = fine_tuning_data(checkpoint)
    labeled = trained.get("labeled_slices")
    if trained.get("raw") != resolved(raw) or not isinstance(labeled, list):
        return []
    return sorted(set(slices) & set(labeled))


def write_report(report: Mapping[str, Any], out_dir: Path) -> None:
    """``report.json`` (everything) and ``report.csv`` (one row per scalar), each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    scalars = [(k, v) for k, v in report.items() if isinstance(v, (int, float))]
    for name, write in (("report.json", lambda f: json.dump(report, f, indent=2)),
                        ("report.csv", lambda f: csv.writer(f).writerows([("metric", "value"), *scalars]))):
        partial = out_dir / f".{name}.partial"
        with partial.open("w", newline="") as f:
            write(f)
        os.replace(partial, out_dir / name)
    log.info("wrote %s and %s", out_dir / "report.json", out_dir / "report.csv")
