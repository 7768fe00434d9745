"""``emfm cluster``: k-means (or a Gaussian mixture) of an encoder's dense features, as a cluster map.

The clusterer is fitted on a sample of feature vectors and applied to every voxel block by block.
The map is at the raw voxel grid: each cluster's score is linear in the features (k-means:
``2 f.c - |c|^2``), so interpolating the scores of the feature cells linearly and taking the best
is exactly k-means on linearly interpolated features, at a cost of k channels, not F.

With a label volume the map is scored (IoU per class after Hungarian matching, adjusted Rand),
and so is the same clustering of raw intensity and local statistics: what the features add.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from omegaconf import DictConfig
from scipy import ndimage
from tqdm.auto import tqdm

from emfm.checkpoints import load_encoder
from emfm.data.ngff import check_zarr_format, image_attrs, label_colors, read_attrs, set_label_colors
from emfm.data.volume import Volume
from emfm.errors import EmfmError
from emfm.evaluation.metrics import adjusted_rand_index, matched_iou, merged_iou
from emfm.explore.features import (
    FEATURES,
    PCA,
    FeatureRequest,
    Projection,
    check_store,
    extract_features,
    sample_store,
    stored_pca,
)
from emfm.models.encoders import Encoder
from emfm.paths import local_output, refuse_foreign, refuse_overlap, remove
from emfm.predict.blocks import BlockGrid, Executor, parse_roi
from emfm.predict.store import add_attrs, create_array, finish, placement, write

log = logging.getLogger(__name__)

METHODS = ("kmeans", "gmm")
BACKENDS = ("sklearn", "minibatch", "faiss")
CLUSTERS, BASELINE = "0", "intensity_baseline"
HALO = 12   # voxels of context for the baseline's local statistics (3 sigma)
REPORT_KEYS = ("input", "output", "features", "k", "method", "cluster_fraction")   # in every report emfm wrote


class Clusterer:
    """A fitted clustering: ``scores(x)`` (N, k), larger = more likely; the label is the argmax."""

    def __init__(self, method: str, k: int, backend: str = "sklearn", seed: int = 0) -> None:
        if method not in METHODS:
            raise EmfmError(f"method={method}: expected one of {', '.join(METHODS)}")
        if backend not in BACKENDS:
            raise EmfmError(f"backend={backend}: expected one of {', '.join(BACKENDS)}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:   # Hydra passes k=2.5, k=a as typed
            # Quoted ('3'), a number is text to Hydra: refused like any key's, with the way to write it.
            unquote = f" (write k={k.strip()}, unquoted)" if isinstance(k, str) and k.strip().isdigit() else ""
            raise EmfmError(f"k={'null' if k is None else repr(k)}: expected a whole number of at least 2 "
                            f"clusters{unquote}")
        self.method, self.k, self.backend, self.seed = method, k, backend, seed
        self.centers: np.ndarray | None = None
        self.gmm: Any = None

    def fit(self, vectors: np.ndarray) -> Clusterer:
        if self.k > len(vectors):
            raise EmfmError(f"k={self.k} is larger than the {len(vectors)} sampled feature vectors; "
                            f"lower k or raise sample")
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.method == "gmm":
            from sklearn.mixture import GaussianMixture

            self.gmm = GaussianMixture(self.k, covariance_type="diag", random_state=self.seed).fit(x)
            self.centers = self.gmm.means_.astype(np.float32)
        elif self.backend == "faiss":
            try:
                import faiss
            except ImportError:
                raise EmfmError("backend=faiss needs faiss-cpu: pip install 'emfm[faiss]'") from None
            kmeans = faiss.Kmeans(x.shape[1], self.k, niter=50, nredo=3, seed=self.seed, verbose=False)
            kmeans.train(x)
            self.centers = np.array(kmeans.centroids, dtype=np.float32)
        else:
            from sklearn.cluster import KMeans, MiniBatchKMeans

            model = (KMeans(self.k, n_init=3, random_state=self.seed) if self.backend == "sklearn" else
                     MiniBatchKMeans(self.k, n_init=3, batch_size=4096, random_state=self.seed))
            self.centers = model.fit(x).cluster_centers_.astype(np.float32)
        return self

    def scores(self, vectors: np.ndarray) -> np.ndarray:
        """(N, k): k-means ``2 x.c - |c|^2`` (linear in x), or GMM log-likelihoods."""
        if self.gmm is not None:
            return self.gmm._estimate_weighted_log_prob(vectors.astype(np.float64)).astype(np.float32)
        assert self.centers is not None, "fit the clusterer first"
        return 2 * vectors @ self.centers.T - (self.centers**2).sum(1)

    def predict(self, vectors: np.ndarray) -> np.ndarray:
        return self.scores(vectors).argmax(1)


def upsample_linear(scores: np.ndarray, cells: tuple[slice, ...], voxels: tuple[slice, ...],
                    stride: tuple[int, ...], grid: tuple[int, ...]) -> np.ndarray:
    """Linear interpolation of ``scores`` (k, *cells) of feature cells onto the voxels of ``voxels``.

    Cell i's centre is voxel ``(i + 0.5) * stride - 0.5``; beyond the outer centres values are
    held. Coordinates are global, so adjacent blocks interpolate identically at their borders.
    """
    out = scores
    for axis, (c, v, k, n) in enumerate(zip(cells, voxels, stride, grid), start=1):
        u = np.clip((np.arange(v.start, v.stop) + 0.5) / k - 0.5, 0, n - 1) - c.start
        lo = np.clip(np.floor(u).astype(int), 0, out.shape[axis] - 1)
        hi = np.minimum(lo + 1, out.shape[axis] - 1)
        w = (u - lo).reshape([-1 if a == axis else 1 for a in range(out.ndim)]).astype(np.float32)
        out = np.take(out, lo, axis=axis) * (1 - w) + np.take(out, hi, axis=axis) * w
    return out


def cluster_map(clusterer: Clusterer, features: np.ndarray, stride: tuple[int, ...], shape: tuple[int, ...],
                projection: Projection | None = None) -> np.ndarray:
    """Cluster ids on the voxel grid of ``shape`` from features (F, *cells) held in memory (notebooks)."""
    flat = features.reshape(len(features), -1).T                                    # (cells, F)
    scores = clusterer.scores(projection(flat) if projection is not None else flat)
    scores = scores.T.reshape(clusterer.k, *features.shape[1:])                     # (k, *cells)
    cells = tuple(slice(0, n) for n in features.shape[1:])
    return upsample_linear(scores, cells, tuple(slice(0, n) for n in shape), stride, features.shape[1:]).argmax(0)


def intensity_features(image: np.ndarray, sigma: float = 4.0) -> np.ndarray:
    """The baseline's features (3, *shape): smoothed intensity, local mean and local standard deviation,
    in-plane (EM stacks are anisotropic and 2-D models see slices too)."""
    plane = (0,) * (image.ndim - 2) + (1, 1)
    smooth = ndimage.gaussian_filter(image, [p * 1.0 for p in plane])
    mean = ndimage.gaussian_filter(image, [p * sigma for p in plane])
    var = ndimage.gaussian_filter(image**2, [p * sigma for p in plane]) - mean**2
    return np.stack([smooth, mean, np.sqrt(np.maximum(var, 0))])


class Labels:
    """Ground truth classes over the raw grid: one integer class volume, or named binary masks
    (class i + 1 where mask i is set; later masks win)."""

    def __init__(self, spec: str | Mapping[str, str], shape: tuple[int, ...], ignore: int | None = None,
                 missing_chunks: str = "warn") -> None:
        if isinstance(spec, Mapping):
            self.volumes = [Volume(p, missing_chunks=missing_chunks) for p in spec.values()]
            self.names = {0: "background", **{i + 1: str(n) for i, n in enumerate(spec)}}
        else:
            self.volumes = [Volume(spec, missing_chunks=missing_chunks)]
            self.names = {int(k): str(v) for k, v in (read_attrs(spec).get("classes") or {}).items()}
        for volume in self.volumes:
            if volume.shape != shape:
                raise EmfmError(f"labels={volume.path}: shape {list(volume.shape)}, but the input has "
                                f"{list(shape)}; labels must cover the raw voxel grid")
            if volume.dtype.kind not in "iub":
                raise EmfmError(f"labels={volume.path}: expected integer classes, got {volume.dtype}")
        self.masks, self.ignore = isinstance(spec, Mapping), ignore

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        """Classes of ``region`` as int64; -1 where ignored."""
        if not self.masks:
            classes = self.volumes[0].read(region).astype(np.int64)
        else:
            classes = np.zeros(tuple(r.stop - r.start for r in region), dtype=np.int64)
            for i, volume in enumerate(self.volumes, start=1):
                classes[volume.read(region) > 0] = i
        if self.ignore is not None:
            classes[classes == self.ignore] = -1
        return classes


class Table:
    """Voxel counts per (cluster, class) pair, summed over blocks."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.counts: dict[int, int] = {}       # class * k + cluster -> voxels

    def add(self, clusters: np.ndarray, classes: np.ndarray) -> None:
        known = classes >= 0
        pairs, counts = np.unique(classes[known] * self.k + clusters[known], return_counts=True)
        for pair, count in zip(pairs.tolist(), counts.tolist()):
            self.counts[pair] = self.counts.get(pair, 0) + count

    def score(self, names: Mapping[int, str]) -> dict[str, Any]:
        classes = sorted({pair // self.k for pair in self.counts})
        table = np.zeros((self.k, len(classes)), dtype=np.int64)
        for pair, count in self.counts.items():
            table[pair % self.k, classes.index(pair // self.k)] = count
        iou, matched = matched_iou(table)
        merged, joined = merged_iou(table)
        name = [names.get(c, str(c)) for c in classes]
        return {"iou": dict(zip(name, iou.round(4).tolist())), "ari": round(adjusted_rand_index(table), 4),
                "matched_cluster": dict(zip(name, matched.tolist())),
                "iou_merged": dict(zip(name, merged.round(4).tolist())),
                "merged_into": {str(c): name[j] for c, j in enumerate(joined)},
                "voxels": int(table.sum())}


def fit_baseline(volume: Volume, roi: tuple[slice, ...], k: int, n: int, seed: int,
                 blocks: BlockGrid, method: str, backend: str) -> tuple[Clusterer, np.ndarray, np.ndarray]:
    """The intensity baseline fitted on ``n`` voxels of up to 8 random blocks; returns it with the
    standardisation (mean, std) of its features."""
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(blocks))[:8]
    all_blocks = list(blocks)
    samples = []
    for i in chosen:
        feats = baseline_block(volume, roi, blocks.region(all_blocks[i]))
        flat = feats.reshape(3, -1).T
        samples.append(flat[rng.choice(len(flat), size=min(len(flat), -(-n // len(chosen))), replace=False)])
    x = np.concatenate(samples)
    mean, std = x.mean(0), x.std(0) + 1e-6
    return Clusterer(method, k, backend, seed).fit((x - mean) / std), mean, std


def baseline_block(volume: Volume, roi: tuple[slice, ...], region: tuple[slice, ...]) -> np.ndarray:
    """Baseline features (3, *region) of a region (region coordinates), from a window with an in-plane halo."""
    plane = volume.ndim - 2
    window = tuple(slice(max(0, r.start - (HALO if a >= plane else 0)),
                         min(o.stop - o.start, r.stop + (HALO if a >= plane else 0)))
                   for a, (r, o) in enumerate(zip(region, roi)))
    image = volume.normalize(volume.read(tuple(slice(o.start + w.start, o.start + w.stop)
                                               for w, o in zip(window, roi))))
    inner = tuple(slice(r.start - w.start, r.stop - w.start) for r, w in zip(region, window))
    return intensity_features(image)[(slice(None), *inner)]


@dataclass(frozen=True)
class ClusterRequest(FeatureRequest):
    """What ``emfm cluster`` is asked: the feature request's keys (``output`` is the cluster map) and these."""

    k: int = 8
    method: str = "kmeans"
    backend: str = "sklearn"
    features: str | None = None                        # an existing feature store; None: <output>/features
    labels: str | dict[str, str] | None = None         # a class volume, or {name: mask}
    ignore_label: int | None = None
    report: str | None = None
    pictures: str | None = None

    @property
    def store(self) -> str:
        return str(Path(self.features).resolve()) if self.features else f"{Path(self.output).resolve()}/features"

    def feature_request(self) -> FeatureRequest:
        """What computes the feature store."""
        return FeatureRequest(**{**{f.name: getattr(self, f.name) for f in fields(FeatureRequest)},
                                 "output": self.store})


@dataclass
class Plan:
    """A cluster run with its inputs checked, before anything is written."""

    volume: Volume
    roi: tuple[slice, ...]
    labels: Labels | None
    clusterer: Clusterer                 # not fitted yet: its settings are checked
    settings: dict[str, Any]             # what makes two cluster maps the same
    inputs: dict[str, Any]               # paths the outputs must stay clear of
    encoder: Encoder | None              # the checkpoint's, when the features are to be computed


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
    encoder = None if request.features else load_encoder(request.checkpoint, as_timm=False, key="checkpoint")
    return Plan(volume, roi, labels, clusterer, settings, inputs, encoder)


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


def cluster_colors(k: int) -> np.ndarray:
    """(k, 3) the colours of clusters 0..k-1 in the pictures' legend, also stored with the map for viewers."""
    from emfm.explore.pictures import palette

    return palette(k)


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


def fit(request: ClusterRequest, run: Plan, executor: Executor) -> Fit:
    """Features (computed unless given), a sample of them, the projection and the clustering."""
    store = request.store
    if not request.features:
        extract_features(request.feature_request(), executor, run.encoder)
    meta = read_attrs(store)
    array = PCA if request.pca and stored_pca(store) == request.pca else FEATURES
    vectors, coords = sample_store(store, array, request.sample, request.seed)
    projection = None
    if array == FEATURES and request.pca:            # a given store without this projection: project here
        projection = Projection.fit(vectors, request.pca)
        vectors = projection(vectors)
    return Fit(store, array, tuple(meta["features"]["stride"]), vectors, coords, projection,
               run.clusterer.fit(vectors))


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
    maps = {name: create_array(root, name, shape, chunks, "uint8" if k <= 255 else "uint16", run.volume.axes)
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
        assigned = upsample_linear(scores, margin, voxels, stride, grid).argmax(0).astype(maps[CLUSTERS].dtype)
        write(root_path, CLUSTERS, voxels, assigned)
        sizes += np.bincount(assigned.ravel(), minlength=k)
        if run.labels is not None and baseline is not None:
            truth = run.labels.read(tuple(slice(r.start + v.start, r.start + v.stop) for r, v in zip(roi, voxels)))
            tables["learned"].add(assigned, truth)
            model, mean, std = baseline
            flat = (baseline_block(run.volume, roi, voxels).reshape(3, -1).T - mean) / std
            base = model.predict(flat).reshape(assigned.shape).astype(assigned.dtype)
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
        report["learned"] = tables["learned"].score(run.labels.names)
        report["intensity_baseline"] = tables["intensity_baseline"].score(run.labels.names)
    if request.pictures:
        from emfm.explore.pictures import cluster_pictures

        report["pictures"] = cluster_pictures(run.volume, run.roi, root, fitted.vectors, fitted.coords, clusterer,
                                              fitted.stride, run.labels, Path(request.pictures), request.seed)
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
        for arm in ("learned", "intensity_baseline"):
            ious = ", ".join(f"{n} {v:.3f}" for n, v in report[arm]["iou"].items())
            log.info("  %s: IoU %s; ARI %.3f", arm, ious, report[arm]["ari"])
    return report


def cells_to_voxels(cells: BlockGrid, stride: tuple[int, ...], roi: tuple[slice, ...]) -> BlockGrid:
    """The voxel blocks matching the feature-cell blocks."""
    return BlockGrid(tuple(r.stop - r.start for r in roi), tuple(b * k for b, k in zip(cells.block, stride)))


class SeedLabels:
    """Chosen clusters as classes over the whole raw grid, ``ignore`` elsewhere; read in slabs by the writer."""

    def __init__(self, clusters: str, mapping: Mapping[int, int], slices: list[int] | None, ignore: int) -> None:
        meta = read_attrs(clusters)
        if meta.get("kind") != "clusters" or not meta.get("complete"):
            raise EmfmError(f"{clusters}: not a complete emfm cluster map (make one with `emfm cluster`)")
        settings = meta["clusters"]
        self.k = k = int(settings["k"])
        if bad := [c for c in mapping if not 0 <= int(c) < k]:
            raise EmfmError(f"clusters {bad} do not exist in {clusters} (clusters 0..{k - 1})")
        if bad := [v for v in mapping.values() if not 0 <= int(v) < 256 or int(v) == ignore]:
            raise EmfmError(f"classes {bad}: expected values in 0..255 other than the ignore label {ignore}")
        self.table = np.full(max(k, 256), ignore, dtype=np.uint8)
        for c, v in mapping.items():
            self.table[int(c)] = int(v)
        self.map, self.ignore = Volume(clusters), ignore
        self.shape, self.roi = tuple(settings["input_shape"]), [slice(a, b) for a, b in settings["roi"]]
        self.slices = None if slices is None else set(slices)
        if self.slices is not None and len(self.shape) != 3:
            raise EmfmError(f"{clusters}: slices apply to 3-D cluster maps only")
        first = self.roi[0]
        if outside := sorted(z for z in self.slices or () if not first.start <= z < first.stop):
            raise EmfmError(f"slices {outside} lie outside the cluster map {clusters}, which covers slices "
                            f"{first.start}-{first.stop - 1}")
        self.dtype, self.voxel_size, self.name = np.dtype(np.uint8), self.map.voxel_size, f"seeds of {clusters}"
        if not self.labels_any():
            where = f" on slices {sorted(self.slices)}" if self.slices is not None else ""
            raise EmfmError(f"{clusters}: clusters {sorted(mapping)} hold no voxel{where}: every seed label would be "
                            f"the ignore label {ignore}, nothing to train on; choose other clusters")

    def labels_any(self) -> bool:
        """Whether any voxel becomes a class, read until the first one is found (at once, unless there is none)."""
        n, step = self.shape[0], self.map.chunks[0]
        slabs = ([(z, z + 1) for z in sorted(self.slices)] if self.slices is not None
                 else [(a, min(a + step, n)) for a in range(0, n, step)])
        return any((self[a:b] != self.ignore).any() for a, b in slabs)

    def __getitem__(self, key: slice) -> np.ndarray:
        a, b = key.start, key.stop
        out = np.full((b - a, *self.shape[1:]), self.ignore, dtype=np.uint8)
        first, roi = self.roi[0], self.roi[1:]
        lo, hi = max(a, first.start), min(b, first.stop)
        if lo < hi:
            part = self.map.read((slice(lo - first.start, hi - first.start),))
            out[(slice(lo - a, hi - a), *roi)] = self.table[part]
        if self.slices is not None:
            out[[i for i, z in enumerate(range(a, b)) if z not in self.slices]] = self.ignore
        return out


def clusters_to_labels(clusters: str | Path, mapping: Mapping[int, int], out: str | Path, *,
                       slices: list[int] | None = None, ignore: int = 255, overwrite: bool = False) -> Path:
    """Chosen clusters as a sparse label volume for ``emfm finetune`` (``data.ignore_label=ignore``):
    cluster c becomes class ``mapping[c]``; every other voxel, and slices not listed, ``ignore``."""
    from emfm.data.ingest import write_ome_zarr

    seeds = SeedLabels(str(clusters), mapping, slices, ignore)
    fmt = zarr.open_group(str(clusters), mode="r").metadata.zarr_format
    written = write_ome_zarr(seeds, out, axes=seeds.map.axes, unit=seeds.map.units[0], is_label=True,
                             zarr_format=fmt, overwrite=overwrite, inputs={"cluster map": clusters})
    group = zarr.open_group(str(written), mode="r+")
    # Each class in the colour of the first cluster that became it, as in the cluster picture; ignored: clear.
    colors = cluster_colors(seeds.k)
    set_label_colors(group, {ignore: (0, 0, 0, 0)} | {v: colors[c] for c, v in sorted(mapping.items(), reverse=True)})
    add_attrs(group, seeds={
        "clusters": str(clusters), "mapping": {str(c): int(v) for c, v in mapping.items()}, "ignore_label": ignore})
    return written
