"""``emfm classify``: ilastik's pixel classification on any features -- a few labelled voxels, a whole volume.

A random forest or a logistic regression (:mod:`emfm.explore.classifier`) learns from the feature vectors of the
labelled voxels of ``train_slices`` -- whole labelled slices, or sparse scribbles beside an ``ignore_label`` -- and
gives class probabilities block by block into an OME-Zarr, stored as ``emfm predict`` stores a network's. The
features (one vector a voxel) are the filter bank's, a network's (by default the full-resolution decoder of a
whole-network checkpoint) or a given store's. With ``eval_slices`` the probabilities are scored as ``emfm evaluate``
and fine-tuning's validation score a network's: IoU and Dice per class (:func:`~emfm.models.segmenter.overlap_counts`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from omegaconf import DictConfig

from emfm.blockwise.executor import Executor, run_blocks
from emfm.blockwise.grid import Block, BlockGrid, parse_roi
from emfm.blockwise.store import Progress, claim, create, create_array, decode, encode, finish, placement, write
from emfm.data.labeled import IGNORE, parse_slices
from emfm.data.ngff import check_zarr_format, image_attrs
from emfm.data.volume import Volume
from emfm.errors import EmfmError
from emfm.explore.classifier import PixelClassifier
from emfm.explore.cluster import write_report
from emfm.explore.features import FEATURES, FeatureStoreRequest, Network, check_store, extract_features, source_network
from emfm.explore.scoring import Labels
from emfm.models.segmenter import overlap_counts
from emfm.paths import local_output, refuse_foreign, refuse_overlap

log = logging.getLogger(__name__)

PROBABILITIES, MODEL = "0", "classifier.skops"
CLASSIFIER_KEYS = ("kind", "trees", "max_depth", "balanced", "max_pixels")      # PixelClassifier's settings
SIDE = 512          # voxels of a block in y and x (one slice deep)


@dataclass(frozen=True)
class ClassifyRequest(FeatureStoreRequest):
    """What ``emfm classify`` is asked: the feature store's keys (``output`` is the probabilities) and these."""

    labels: str | dict[str, str] | None = None         # a class volume, or {name: mask}
    ignore_label: int | None = None
    train_slices: Any = None
    eval_slices: Any = None
    eval_labels: str | dict[str, str] | None = None    # what eval_slices are scored against; None: labels
    classifier: Any = None                             # PixelClassifier's settings (kind, trees, ...)
    report: str | None = None


@dataclass
class Plan:
    """A classification with its inputs checked and its training labels read, before anything is written."""

    volume: Volume
    roi: tuple[slice, ...]
    labels: Labels
    truth_labels: Labels               # what eval_slices are scored against
    train: list[int]                   # slices of the volume
    evaluate: list[int]
    truth: np.ndarray                  # classes of the train slices (n, y, x), -1 where not labelled
    classes: list[int]
    classifier: PixelClassifier        # not fitted yet
    network: Network | None            # the checkpoint's, when its features are to be computed


def classify(cfg: DictConfig) -> dict[str, Any]:
    """The ``emfm classify`` command: features -> classifier on the labelled voxels -> probabilities (+ scores)."""
    start = time.perf_counter()
    request, executor = ClassifyRequest.from_config(cfg), Executor(cfg.executor, **cfg.dask)
    run = plan(request)
    output = str(local_output("output", request.output))
    stamp = settings(request, run.train)
    complete = claim(output, "classify", stamp, request.overwrite, inputs=inputs(request), describe="classification")
    if complete is None:
        create_output(output, request, run, stamp)
    seconds = {} if complete else compute(output, request, run, executor)
    report: dict[str, Any] = {"output": output, "features": request.store,
                              "classes": {str(c): run.labels.names.get(c, str(c)) for c in run.classes},
                              "train_slices": run.train, "train_voxels": int((run.truth != IGNORE).sum())}
    if run.evaluate:
        report["eval"] = score(output, run, run.evaluate)
        log.info("eval slices %s: IoU %.3f, Dice %.3f", run.evaluate, report["eval"]["iou"], report["eval"]["dice"])
    report["seconds"] = {**{k: round(v, 1) for k, v in seconds.items()}, "total": round(time.perf_counter() - start, 1)}
    if request.report:
        write_report(report, request.report)
    log.info("wrote %s: probabilities of classes %s", output, list(report["classes"].values()))
    return report


def compute(output: str, request: ClassifyRequest, run: Plan, executor: Executor) -> dict[str, float]:
    """Features (computed unless given), the classifier, then its pending blocks; returns the seconds of each."""
    seconds = {"features": 0.0}
    if not request.features:
        seconds["features"] = extract_features(request.feature_request(), executor, run.network).get("seconds", 0.0)
    tick = time.perf_counter()
    classifier = trained(output, run, request.store)
    seconds["train"] = time.perf_counter() - tick
    grid = BlockGrid(tuple(r.stop - r.start for r in run.roi), block_of(run.roi))
    pending = Progress(output, "classify", grid).pending()
    seconds["predict"] = run_blocks(classify_block, pending, output, f"{request.store}/{FEATURES}", classifier, grid,
                                    desc="classify", progress=request.progress)
    finish(output)
    return seconds


def plan(request: ClassifyRequest) -> Plan:
    """Check every input and setting, and read the training labels, before anything is created."""
    check_zarr_format(request.zarr_format)
    volume = Volume(request.input, request.level, request.missing_chunks)
    if volume.ndim != 3:
        raise EmfmError(f"input={volume.path}: a {volume.ndim}-D image; emfm classify trains on slices of a stack "
                        f"(z, y, x)")
    if request.labels is None:
        raise EmfmError("labels: required (a class volume on the raw grid, or {name: mask, ...})")
    roi = parse_roi(request.roi, volume.shape)
    labels = Labels(request.labels, volume.shape, request.ignore_label, request.missing_chunks)
    truth_labels = labels if request.eval_labels is None else \
        Labels(request.eval_labels, volume.shape, request.ignore_label, request.missing_chunks)
    train, evaluate = (parse_slices(request.train_slices, volume.shape[0], "train_slices"),
                       parse_slices(request.eval_slices, volume.shape[0], "eval_slices"))
    if not train:
        raise EmfmError("train_slices: required, the z-slices whose labelled voxels train the classifier (e.g. [0])")
    for key, slices in (("train_slices", train), ("eval_slices", evaluate)):
        if any(not roi[0].start <= z < roi[0].stop for z in slices):
            raise EmfmError(f"{key}={slices}: outside the region's slices {roi[0].start}-{roi[0].stop - 1}")
    if not request.features and request.stride != 1:
        raise EmfmError(f"stride={request.stride}: the classifier needs a feature vector per voxel; set stride=1")
    options = dict(request.classifier or {})
    if unknown := sorted(set(options) - set(CLASSIFIER_KEYS)):
        raise EmfmError(f"classifier.{unknown[0]}: not a classifier setting; expected {', '.join(CLASSIFIER_KEYS)}")
    classifier = PixelClassifier(**options, seed=request.seed)
    truth = np.concatenate([labels.read((slice(z, z + 1), *roi[1:])) for z in train])          # (n, y, x)
    classes = sorted(set(np.unique(truth).tolist()) - {IGNORE})
    if len(classes) < 2:
        raise EmfmError(f"labels={request.labels}: train_slices {train} hold {len(classes)} labelled class(es) "
                        f"{classes}; the classifier needs at least 2")
    given = check_store(request.store, volume, roi, request.checkpoint) if request.features else None
    if given is not None and any(k != 1 for k in given["features"]["stride"]):
        raise EmfmError(f"features={request.features}: not at stride 1; the classifier needs a feature vector per "
                        f"voxel")
    if request.report:
        refuse_overlap("report", request.report, inputs(request))
        refuse_foreign("report", request.report, "classification report", is_report)
    network = None if request.features else source_network(request)
    return Plan(volume, roi, labels, truth_labels, train, evaluate, truth, classes, classifier, network)


def is_report(path: Path) -> bool:
    """Whether ``path`` holds a report of ``emfm classify`` (which a new one may replace)."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):       # a folder, not text, not JSON
        return False
    return isinstance(report, dict) and {"output", "classes", "train_slices"} <= report.keys()


def inputs(request: ClassifyRequest) -> dict[str, str | None]:
    """The paths no output may be, hold or lie in."""
    given = {"input": request.input, "checkpoint": request.checkpoint, "features store": request.features}
    for key in ("labels", "eval_labels"):
        value = getattr(request, key)
        given |= {f"{key} {k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value}
    return given


def settings(request: ClassifyRequest, train: list[int]) -> dict[str, Any]:
    """What makes two classifications the same: everything but where they go, how fast, and what is scored
    (``train``: the train slices however spelled)."""
    fast = ("output", "threads", "batch_size", "block_shape", "missing_chunks", "overwrite", "progress", "report",
            "eval_slices", "eval_labels", "pca", "sample")
    kept = {k: v for k, v in asdict(request).items() if k not in fast} | {"features": request.store,
                                                                          "train_slices": train}
    return json.loads(json.dumps(kept))       # as the store's attributes hold it


def block_of(roi: tuple[slice, ...]) -> tuple[int, ...]:
    """A block of the probabilities: one slice of up to SIDE² voxels."""
    return (1, *(min(SIDE, r.stop - r.start) for r in roi[1:]))


def create_output(output: str, request: ClassifyRequest, run: Plan, stamp: dict[str, Any]) -> None:
    """The new store: ``0`` (K, z, y, x) class probabilities as uint8 (255 = 1), placed on the volume."""
    shape = tuple(r.stop - r.start for r in run.roi)
    plan_, origin = placement(run.volume, shape, [r.start for r in run.roi])
    axes, zarr_format = "c" + run.volume.axes, check_zarr_format(request.zarr_format)
    attrs = image_attrs("probabilities", axes, run.volume.units, plan_, origin, zarr_format, is_label=False)

    def layout(root: zarr.Group) -> None:
        create_array(root, PROBABILITIES, (len(run.classes), *shape), (len(run.classes), *block_of(run.roi)),
                     "uint8", axes)

    emfm = {"kind": "classification", "classify": stamp, "classes": run.classes, "complete": False}
    create(output, attrs | {"emfm": emfm}, "classification", layout, zarr_format)


def trained(output: str, run: Plan, store: str) -> PixelClassifier:
    """The classifier of this store: the one a run of these settings saved before it was interrupted, or one
    fitted now on the features of the labelled voxels and saved (moved into place whole)."""
    path = Path(output) / MODEL
    if path.is_file():
        saved = PixelClassifier.load(path)
        if saved.classes != run.classes:
            raise EmfmError(f"labels={run.labels.volumes[0].path}: classes {run.classes} on train_slices, but the "
                            f"unfinished {output} was trained on {saved.classes}; set overwrite=true to start afresh")
        return saved
    features = zarr.open_array(f"{store}/{FEATURES}", mode="r")
    z0 = run.roi[0].start
    train = np.stack([np.asarray(features[:, z - z0], dtype=np.float32) for z in run.train], axis=1)  # (C, n, y, x)
    classifier = run.classifier.fit(train, run.truth, ignore=IGNORE)
    partial = path.with_name(f".{MODEL}.partial")
    classifier.save(partial)
    os.replace(partial, path)
    return classifier


def classify_block(output: str, features: str, classifier: PixelClassifier, grid: BlockGrid, index: Block) -> Block:
    """Compute, write and mark one block of the probabilities."""
    region = grid.region(index)
    vectors = np.asarray(zarr.open_array(features, mode="r")[(slice(None), *region)], dtype=np.float32)
    write(output, PROBABILITIES, (slice(None), *region), encode(classifier.predict_proba(vectors), "uint8"))
    Progress(output, "classify", grid).mark(index)
    return index


def score(output: str, run: Plan, slices: list[int]) -> dict[str, Any]:
    """IoU and Dice per class on ``slices``, pooled over them as ``emfm evaluate`` pools its regions; the first
    class (the smallest label value, the background of a mask) is not scored, as there."""
    probabilities = zarr.open_array(f"{output}/{PROBABILITIES}", mode="r")
    lookup = {c: i for i, c in enumerate(run.classes)}
    counts = []
    for z in slices:
        truth = run.truth_labels.read((slice(z, z + 1), *run.roi[1:]))[0]
        channel = np.full(truth.shape, IGNORE, np.int64)          # classes the classifier never saw are not scored
        for value, i in lookup.items():
            channel[truth == value] = i
        probs = decode(np.asarray(probabilities[:, z - run.roi[0].start]))
        counts.append(overlap_counts(torch.from_numpy(probs), torch.from_numpy(channel), "softmax"))
    inter, pred, true = torch.stack(counts).sum(0)
    iou, dice = inter / (pred + true - inter).clamp(min=1), 2 * inter / (pred + true).clamp(min=1)
    names = [run.labels.names.get(c, str(c)) for c in run.classes[1:]]
    return {"iou": round(float(iou.mean()), 4), "dice": round(float(dice.mean()), 4), "slices": slices,
            "per_class": {n: {"iou": round(float(i), 4), "dice": round(float(d), 4)}
                          for n, i, d in zip(names, iou, dice)}}
