"""``emfm evaluate``: predict a labeled region with a fine-tuned model, derive instances, score both.

Semantic scores (IoU, Dice per class) use the same sliding window and counting as validation
during fine-tuning. Instance scores follow the ISBI 2012 convention for membrane and boundary
predictions: the prediction is turned into cells at a threshold and compared with the ground-truth
cells on the ground-truth foreground. The cells are cut by :func:`emfm.instances.from_probabilities`,
which ``emfm predict`` runs block by block: with the default ``seeding: components`` the scores are
those of what the tool writes. The threshold is the
one with the best mean Rand F-score on ``tune_slices``, other slices than the scored ones; without
them it is the best on the scored slices themselves, an optimistic choice the report names.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from omegaconf import DictConfig
from scipy import ndimage

from emfm.checkpoints import fine_tuning_data, load_segmenter
from emfm.data.labeled import IGNORE, HeldOutSlices, LabeledVolume, parse_slices
from emfm.data.targets import Target
from emfm.errors import EmfmError
from emfm.instances import KINDS, METHODS, SEEDING, from_probabilities
from emfm.metrics import bootstrap_interval, instance_scores, isbi_scores, rand_scores, voi
from emfm.models.segmenter import overlap_counts
from emfm.paths import resolved
from emfm.requests import Request

log = logging.getLogger(__name__)

THRESHOLDS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # down to 0.02: gappy membranes cut best low


@dataclass(frozen=True)
class EvaluateRequest(Request):
    """What ``emfm evaluate`` is asked: the keys of its config (emfm/configs/evaluate.yaml)."""

    checkpoint: str
    raw: str
    labels: str
    output_dir: str
    slices: int | str | Sequence[int] | None = None         # z-slices scored; None: all but tune_slices
    tune_slices: int | str | Sequence[int] | None = None    # other z-slices the instance threshold is chosen on
    ignore_label: int | None = None
    missing_chunks: str = "warn"
    thresholds: Sequence[float] = THRESHOLDS
    seeding: str = SEEDING
    min_size: int = 0


class Segments(Protocol):
    """What scoring asks of a model: a :class:`~emfm.models.segmenter.Segmenter`, or a peer tool's network behind
    the same members (:class:`~emfm.evaluation.peers.PeerSegmenter`), so that both are scored by this one code."""

    @property
    def hparams(self) -> Mapping[str, Any]: ...          # "target": the target config

    @property
    def target(self) -> Target: ...

    @property
    def input_shape(self) -> tuple[int, ...]: ...        # the sliding window's tile

    def predict_region(self, image: torch.Tensor) -> torch.Tensor: ...


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
                    min_size: int = 0, seeding: str = SEEDING, reported: bool = True) -> dict[str, Any]:
    """Scores of ``module`` on every region of ``regions`` (instances at the best of ``thresholds``),
    plus the probabilities for pictures; ``reported``: also the ISBI 2012 scores and bootstrap intervals, which
    choosing a threshold does not need."""
    target = dict(module.hparams["target"])
    counts: list[torch.Tensor] = []
    per_threshold: dict[float, list[dict[str, float]]] = {t: [] for t in thresholds}
    isbi: list[dict[float, dict[str, float]]] = []
    last = None
    for index in range(len(regions)):
        item = regions[index]
        probs = module.predict_region(item["image"])
        truth = module.target(item["labels"])[0]
        counts.append(overlap_counts(probs, truth, module.target.loss))
        labels = item["labels"][0].numpy()
        probs_np = probs.numpy()
        gt = true_instances(labels, target["kind"])
        # a semantic target, or a region without true objects, has no instance scores
        for t in thresholds if target["kind"] in KINDS and gt.any() else ():
            per_threshold[t].append(score_instances(from_probabilities(probs_np, target, t, seeding, min_size), gt))
        if reported and target["kind"] == "membrane" and gt.any():
            isbi += [isbi_scores(m, y == 1, y != IGNORE) for m, y in zip(*sections(probs_np[0], labels))]
        last = (item["image"][0].numpy(), probs_np, labels)
    stacked = torch.stack(counts)

    def mean_iou(counts: torch.Tensor) -> float:          # pooled over the regions, as the score itself
        inter, pred, true = counts.sum(0)
        return float((inter / (pred + true - inter).clamp(min=1)).mean())

    inter, pred, true = stacked.sum(0)
    iou, dice = (inter / (pred + true - inter).clamp(min=1)), (2 * inter / (pred + true).clamp(min=1))
    report: dict[str, Any] = {
        "iou": float(iou.mean()), "dice": float(dice.mean()),
        "per_class": {str(c + 1): {"iou": float(i), "dice": float(d)} for c, (i, d) in enumerate(zip(iou, dice))},
    }
    if reported:
        report["interval95"] = {"iou": bootstrap_interval(len(counts), stacked.__getitem__, mean_iou)}
    scored = {t: rows for t, rows in per_threshold.items() if rows}
    if scored:
        means = {t: {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} for t, rows in scored.items()}
        best = max(means, key=lambda t: means[t]["vrand"])
        report.update({"threshold": best, **means[best], "per_threshold": {str(t): m for t, m in means.items()},
                       "instance_regions": f"{len(scored[best])} of {len(regions)}"})
        for key in ("vrand", "vi") if reported else ():
            values = np.array([r[key] for r in scored[best]])
            report["interval95"][key] = bootstrap_interval(len(values), values.take, np.mean)
    if isbi:
        means = {t: {k: float(np.mean([s[t][k] for s in isbi])) for k in ("vrand", "vinfo")} for t in isbi[0]}
        best = max(means, key=lambda t: means[t]["vrand"])
        report["isbi2012"] = {**means[best], "threshold": best, "slices": len(isbi)}
    return {"report": report, "example": last}


def sections(membrane: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 2-D sections (N, Y, X) of a region's membrane map and labels, which the ISBI protocol scores one by one."""
    return membrane.reshape(-1, *membrane.shape[-2:]), labels.reshape(-1, *labels.shape[-2:])


def evaluate_slices(module: Segments, data: LabeledVolume, slices: Sequence[int],
                    tune_slices: Sequence[int], thresholds: Sequence[float], min_size: int = 0,
                    seeding: str = SEEDING) -> dict[str, Any]:
    """``evaluate_region`` on ``slices``, the instance threshold chosen on ``tune_slices`` when given."""
    if seeding not in METHODS:
        raise EmfmError(f"seeding={seeding!r}: expected one of {', '.join(METHODS)}")
    shape = module.input_shape
    chosen = None
    if tune_slices:
        tuned = evaluate_region(module, HeldOutSlices(data, tune_slices, shape), thresholds, min_size, seeding,
                                reported=False)
        chosen = tuned["report"].get("threshold")   # None: no true objects on the tuning slices
    result = evaluate_region(module, HeldOutSlices(data, slices, shape),
                             thresholds if chosen is None else [chosen], min_size, seeding)
    if "threshold" in result["report"]:
        result["report"].update(seeding=seeding, threshold_chosen_on=(
            f"tune_slices {list(tune_slices)}" if chosen is not None else "the scored slices (optimistic)"))
    return result


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """The ``emfm evaluate`` command: writes ``report.json`` and ``report.csv`` to ``cfg.output_dir``."""
    request = EvaluateRequest.from_config(cfg)
    module = load_segmenter(request.checkpoint)
    data = LabeledVolume(request.raw, request.labels, request.ignore_label, missing_chunks=request.missing_chunks)
    tune = parse_slices(request.tune_slices, data.depth, "tune_slices")
    slices = parse_slices(request.slices, data.depth, "slices") or [z for z in range(data.depth) if z not in tune]
    if overlap := sorted(set(tune) & set(slices)):
        raise EmfmError(f"tune_slices {overlap} are also scored (slices): choose the threshold on other slices")
    if trained := training_slices(request.checkpoint, request.raw, slices):
        log.warning("slices %s of %s are training slices of checkpoint=%s (its data.labeled_slices): their scores "
                    "are optimistic; score held-out slices", trained, request.raw, request.checkpoint)
    result = evaluate_slices(module, data, slices, tune, list(request.thresholds), request.min_size, request.seeding)
    report = {"checkpoint": str(Path(request.checkpoint).resolve()), "raw": str(request.raw),
              "labels": str(request.labels), "slices": slices, "target": dict(module.hparams["target"]),
              **result["report"]}
    write_report(report, Path(request.output_dir))
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
