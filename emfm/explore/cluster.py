"""``emfm cluster``: k-means (or a Gaussian mixture) of dense features, as a cluster map.

The features -- a network's, or the filter bank's with ``source=filters`` -- are computed (``emfm features``)
unless given, the clusterer (:mod:`emfm.explore.clusterer`)
is fitted on a sample of them and applied to every voxel block by block, on the raw voxel grid. With a
label volume the map is scored (:mod:`emfm.explore.scoring`), and so is the same clustering of raw
intensity and local statistics: what the features add.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from omegaconf import DictConfig
from tqdm.auto import tqdm

from emfm.blockwise.executor import Executor
from emfm.blockwise.grid import BlockGrid, parse_roi
from emfm.blockwise.store import create_array, finish, placement, write
from emfm.data.ngff import check_zarr_format, image_attrs, label_colors, read_attrs
from emfm.data.volume import Volume
from emfm.errors import EmfmError
from emfm.explore.clusterer import (
    Clusterer,
    assign_clusters,
    baseline_clusters,
    cells_to_voxels,
    cluster_colors,
    cluster_dtype,
    fit_baseline,
)
from emfm.explore.features import (
    FEATURES,
    PCA,
    FeatureStoreRequest,
    Network,
    Projection,
    check_store,
    extract_features,
    sample_store,
    source_network,
    stored_pca,
)
from emfm.explore.scoring import Labels, Table
from emfm.paths import local_output, refuse_foreign, refuse_overlap, remove

log = logging.getLogger(__name__)

CLUSTERS, BASELINE = "0", "intensity_baseline"
ARMS = {False: "learned", True: "filters"}     # the report's name of the features' clusters: filter-bank ones or not
REPORT_KEYS = ("input", "output", "features", "k", "method", "cluster_fraction")   # in every report emfm wrote


@dataclass(frozen=True)
class ClusterRequest(FeatureStoreRequest):
    """What ``emfm cluster`` is asked: the feature store's keys (``output`` is the cluster map) and these."""

    k: int = 8
    method: str = "kmeans"
    backend: str = "sklearn"
    labels: str | dict[str, str] | None = None         # a class volume, or {name: mask}
    ignore_label: int | None = None
    report: str | None = None
    pictures: str | None = None


def cluster(cfg: DictConfig) -> dict[str, Any]:
    """The ``emfm cluster`` command: features -> sample -> fit -> cluster map (+ scores, pictures)."""
    start = time.perf_counter()
    request, executor = ClusterRequest.from_config(cfg), Executor(cfg.executor, **cfg.dask)
    run = plan(request)
    root = prepare_output(request, run)
    fitted = fit(request, run, executor)
    sizes, tables = write_map(root, run, fitted, request)
    centers = fitted.clusterer.centers
    finish(str(Path(request.output).resolve()), centers=None if centers is None else centers.tolist())
    report = report_run(request, run, fitted, root, sizes, tables, time.perf_counter() - start)
    log.info("wrote %s: %d clusters%s", report["output"], fitted.clusterer.k,
             f", report {request.report}" if request.report else "")
    if run.labels is not None:
        for arm in (fitted.arm, "intensity_baseline"):
            ious = ", ".join(f"{n} {v:.3f}" for n, v in report[arm]["iou"].items())
            log.info("  %s: IoU %s; ARI %.3f", arm, ious, report[arm]["ari"])
    return report


@dataclass
class Plan:
    """A cluster run with its inputs checked, before anything is written."""

    volume: Volume
    roi: tuple[slice, ...]
    labels: Labels | None
    clusterer: Clusterer                 # not fitted yet: its settings are checked
    settings: dict[str, Any]             # what makes two cluster maps the same
    inputs: dict[str, Any]               # paths the outputs must stay clear of
    network: Network | None              # the checkpoint's, when its features are to be computed


def plan(request: ClusterRequest) -> Plan:
    """Check every input and setting before anything is created: a refused run leaves nothing behind."""
    clusterer = Clusterer(request.method, request.k, request.backend, request.seed)
    check_zarr_format(request.zarr_format)
    if request.k > request.sample:
        raise EmfmError(f"k={request.k} is larger than sample={request.sample}: the clustering is fitted on that "
                        f"many feature vectors; lower k or raise sample")
    output = str(local_output("output", request.output))
    volume = Volume(request.input, request.level, request.missing_chunks)
    roi = parse_roi(request.roi, volume.shape)
    labels = Labels(request.labels, volume.shape, request.ignore_label, request.missing_chunks) if request.labels \
        else None
    store = request.store
    settings = {"input": str(volume.path), "input_shape": list(volume.shape), "roi": [[r.start, r.stop] for r in roi],
                "k": request.k, "method": request.method, "backend": request.backend, "seed": request.seed,
                "sample": request.sample, "pca": request.pca, "features": store, "labels": request.labels,
                "zarr_format": request.zarr_format}
    given = request.labels                           # None, a path or {name: path}
    inputs = {"input": request.input, "checkpoint": request.checkpoint,
              **({f"labels {k}": v for k, v in given.items()} if isinstance(given, dict) else {"labels": given}),
              # the store kept inside the map's own output is not replaced with it
              "features store": None if store == f"{output}/features" else store}
    if request.report:
        refuse_overlap("report", request.report, inputs)
        check_report(request.report, output, request.overwrite)
    if request.features:                             # a given store is checked first
        check_store(store, volume, roi, request.checkpoint)
    network = None if request.features else source_network(request)
    return Plan(volume, roi, labels, clusterer, settings, inputs, network)


def prepare_output(request: ClusterRequest, run: Plan) -> zarr.Group:
    """Create the cluster map's group, or take over one of these settings (its finished feature
    store is reused) or one a failed run left unfinished. Another complete emfm cluster map is
    replaced only with overwrite=true; a feature store inside it survives (it is kept or replaced by
    its own settings). Never one of the run's inputs."""
    refuse_overlap("output", request.output, run.inputs)
    out = Path(request.output)
    if out.exists():
        previous = read_attrs(out)
        if previous.get("kind") != "clusters":
            raise EmfmError(f"output={out} already holds something that is not an emfm cluster map; choose another "
                            f"output")
        if previous.get("clusters") != run.settings and previous.get("complete") and not request.overwrite:
            raise EmfmError(f"output={out} already holds a cluster map of other settings; choose another output "
                            f"or set overwrite=true")
        root = zarr.open_group(str(out), mode="r+")
        if root.metadata.zarr_format != request.zarr_format:     # the other format: replaced whole
            remove(out)
        else:
            for name in (CLUSTERS, BASELINE):
                if name in root:
                    del root[name]
    if not out.exists():
        try:
            root = zarr.open_group(str(out), mode="w-", zarr_format=check_zarr_format(request.zarr_format))
        except OSError as e:
            raise EmfmError(f"output={out}: cannot create the cluster map ({e.strerror or e})") from None
    volume, roi = run.volume, run.roi
    plan, origin = placement(volume, tuple(r.stop - r.start for r in roi), [r.start for r in roi])
    label = {"colors": label_colors(dict(enumerate(cluster_colors(request.k))))}
    root.attrs.update(image_attrs("clusters", volume.axes, volume.units, plan, origin, request.zarr_format,
                                  is_label=True, label=label)
                      | {"emfm": {"kind": "clusters", "clusters": run.settings, "complete": False}})
    return root


@dataclass
class Fit:
    """The clustering fitted on a sample of the feature store."""

    store: str
    array: str                         # the store's array clustered: the features or their projection
    stride: tuple[int, ...]
    vectors: np.ndarray                # the sample (projected), (n, F)
    coords: np.ndarray                 # its cells, (n, ndim)
    projection: Projection | None      # applied here to a given store without the projection asked for
    clusterer: Clusterer
    arm: str                           # the report's name of these clusters (ARMS)


def fit(request: ClusterRequest, run: Plan, executor: Executor) -> Fit:
    """Features (computed unless given), a sample of them, the projection and the clustering.

    Features computed here are stored without their projection: the map projects each block as it reads it, one
    pass over the store where a stored projection takes two (a given store's projection is used when it has
    the ``pca`` components asked for).
    """
    store = request.store
    if not request.features:
        extract_features(replace(request.feature_request(), pca=None), executor, run.network)
    meta = read_attrs(store)
    array = PCA if request.pca and stored_pca(store) == request.pca else FEATURES
    vectors, coords = sample_store(store, array, request.sample, request.seed)
    projection = None
    if array == FEATURES and request.pca:            # a given store without this projection: project here
        projection = Projection.fit(vectors, request.pca)
        vectors = projection(vectors)
    return Fit(store, array, tuple(meta["features"]["stride"]), vectors, coords, projection,
               run.clusterer.fit(vectors), ARMS["bank" in meta["features"]])


def write_map(root: zarr.Group, run: Plan, fitted: Fit, request: ClusterRequest) -> tuple[np.ndarray, dict[str, Table]]:
    """The cluster map (and with labels the intensity baseline's) block by block, on the raw grid; returns the
    voxels per cluster and the (cluster, class) counts of both maps."""
    features = zarr.open_array(f"{fitted.store}/{fitted.array}", mode="r")
    stride, grid, roi, k = fitted.stride, tuple(features.shape[1:]), run.roi, fitted.clusterer.k
    root_path = str(Path(request.output).resolve())
    cells = BlockGrid(grid, tuple(features.chunks[1:]))
    chunks = tuple(b * s for b, s in zip(cells.block, stride))
    shape = tuple(r.stop - r.start for r in roi)
    names = (CLUSTERS, BASELINE) if run.labels is not None else (CLUSTERS,)
    maps = {name: create_array(root, name, shape, chunks, cluster_dtype(k), run.volume.axes)
            for name in names}
    baseline = fit_baseline(run.volume, roi, k, request.sample, request.seed, cells_to_voxels(cells, stride, roi),
                            request.method, request.backend) if run.labels is not None else None
    tables = {"learned": Table(k), "intensity_baseline": Table(k)}
    sizes = np.zeros(k, dtype=np.int64)
    for index in tqdm(list(cells), desc="clusters", unit="block", disable=not request.progress):
        region = cells.region(index)
        voxels = tuple(slice(c.start * s, min(c.stop * s, r.stop - r.start)) for c, s, r in zip(region, stride, roi))
        margin = tuple(slice(max(0, c.start - 1), min(n, c.stop + 1)) for c, n in zip(region, grid))
        block = np.asarray(features[(slice(None), *margin)], dtype=np.float32)           # (F, *cells)
        flat = block.reshape(block.shape[0], -1).T                                        # (cells, F)
        flat = fitted.projection(flat) if fitted.projection is not None else flat
        scores = fitted.clusterer.scores(flat).T.reshape(k, *block.shape[1:])               # (k, *cells)
        assigned = assign_clusters(scores, margin, voxels, stride, grid).astype(maps[CLUSTERS].dtype)
        write(root_path, CLUSTERS, voxels, assigned)
        sizes += np.bincount(assigned.ravel(), minlength=k)
        if run.labels is not None and baseline is not None:
            truth = run.labels.read(tuple(slice(r.start + v.start, r.start + v.stop) for r, v in zip(roi, voxels)))
            tables["learned"].add(assigned, truth)
            base = baseline_clusters(baseline, run.volume, roi, voxels).astype(assigned.dtype)
            write(root_path, BASELINE, voxels, base)
            tables["intensity_baseline"].add(base, truth)
    return sizes, tables


def report_run(request: ClusterRequest, run: Plan, fitted: Fit, root: zarr.Group, sizes: np.ndarray,
               tables: dict[str, Table], seconds: float) -> dict[str, Any]:
    """The run's report (cluster sizes, scores against the labels, pictures), written to ``report`` if asked."""
    clusterer = fitted.clusterer
    report: dict[str, Any] = {"input": str(run.volume.path), "output": str(Path(request.output).resolve()),
                              "features": fitted.store, "k": clusterer.k, "method": request.method,
                              "stride": list(fitted.stride), "array": fitted.array,
                              "cluster_fraction": (sizes / max(sizes.sum(), 1)).round(4).tolist()}
    if fitted.projection is not None:
        report["pca"] = {"components": len(fitted.projection.components),
                         "explained_variance": round(fitted.projection.explained, 4)}
    if run.labels is not None:
        report[fitted.arm] = tables["learned"].score(run.labels.names)
        report["intensity_baseline"] = tables["intensity_baseline"].score(run.labels.names)
    if request.pictures:
        from emfm.explore.pictures import cluster_pictures

        title = "filter-bank clusters" if fitted.arm == "filters" else "learned clusters"
        report["pictures"] = cluster_pictures(run.volume, run.roi, root, fitted.vectors, fitted.coords, clusterer,
                                              fitted.stride, run.labels, Path(request.pictures), request.seed,
                                              title=title)
    report["seconds"] = round(seconds, 1)
    if request.report:
        write_report(report, request.report)
    return report


def read_report(path: Path) -> dict[str, Any]:
    """The cluster report at ``path``; ``{}`` if it is none (a JSON object with the keys every report had)."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):       # a folder, not text, not JSON
        return {}
    return report if isinstance(report, dict) and all(key in report for key in REPORT_KEYS) else {}


def check_report(path: str, output: str, overwrite: bool) -> None:
    """A report is written over only an earlier one of emfm's: of this cluster map (a rerun), or with overwrite."""
    previous = read_report(Path(path))
    if refuse_foreign("report", path, "cluster report", lambda _: bool(previous)) and not overwrite:
        if Path(str(previous["output"])).resolve() != Path(output):
            raise EmfmError(f"report={path} holds the report of another cluster map ({previous['output']}); choose "
                            f"another report or set overwrite=true")


def write_report(report: Mapping[str, Any], path: str) -> None:
    """JSON written to a temporary file and moved into place (never half a report)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(partial, target)
