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
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from omegaconf import OmegaConf
from scipy import ndimage
from tqdm.auto import tqdm

from emfm.data.volume import Volume
from emfm.errors import EmfmError
from emfm.evaluation.metrics import adjusted_rand_index, matched_iou, merged_iou
from emfm.explore.features import (
    FEATURES,
    PCA,
    check_store,
    extract_features,
    open_store,
    stored_pca,
)
from emfm.paths import refuse_overlap
from emfm.predict.blocks import BlockGrid, parse_roi
from emfm.predict.predict import create_array, ome_attrs

METHODS = ("kmeans", "gmm")
BACKENDS = ("sklearn", "minibatch", "faiss")
CLUSTERS, BASELINE = "0", "intensity_baseline"
HALO = 12   # voxels of context for the baseline's local statistics (3 sigma)


def sample_store(path: str, array: str, n: int, seed: int, max_blocks: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``n`` feature vectors (n, F) float32 and their cell coordinates (n, ndim), from up to
    ``max_blocks`` random chunks of ``path/array`` (reading whole chunks, never scattered cells)."""
    data = zarr.open_array(f"{path}/{array}", mode="r")
    grid = BlockGrid(tuple(data.shape[1:]), tuple(data.chunks[1:]))
    rng = np.random.default_rng(seed)
    blocks = list(grid)
    chosen = sorted(rng.permutation(len(blocks))[:max_blocks])
    per_block = -(-n // len(chosen))
    vectors, coords = [], []
    for i in chosen:
        region = grid.region(blocks[i])
        block = np.asarray(data[(slice(None), *region)], dtype=np.float32)        # (F, *cells)
        flat = block.reshape(block.shape[0], -1)                                      # (F, cells)
        pick = rng.choice(flat.shape[1], size=min(per_block, flat.shape[1]), replace=False)
        vectors.append(flat[:, pick].T)
        local = np.stack(np.unravel_index(pick, block.shape[1:]), 1)
        coords.append(local + [r.start for r in region])
    vectors, coords = np.concatenate(vectors), np.concatenate(coords)
    keep = rng.permutation(len(vectors))[:n]
    return vectors[keep], coords[keep]


@dataclass
class Projection:
    """Principal components of features fitted on a sample: ``(x - mean) @ components.T``."""

    mean: np.ndarray          # (F,)
    components: np.ndarray    # (K, F)
    explained: float          # fraction of the sample's variance kept

    @classmethod
    def fit(cls, vectors: np.ndarray, k: int) -> Projection:
        from sklearn.decomposition import PCA as SkPCA

        if not 1 <= k <= min(vectors.shape):
            raise EmfmError(f"pca={k}: expected 1..{min(vectors.shape)} components for {vectors.shape[0]} sampled "
                            f"vectors of {vectors.shape[1]} features")
        pca = SkPCA(n_components=k, random_state=0).fit(vectors)
        return cls(pca.mean_.astype(np.float32), pca.components_.astype(np.float32),
                   float(pca.explained_variance_ratio_.sum()))

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        return (vectors - self.mean) @ self.components.T

    def write(self, store: str, progress: bool = True) -> None:
        """Add the projected features to ``store`` as array ``pca`` (K, *grid), chunked like the features."""
        source = zarr.open_array(f"{store}/{FEATURES}", mode="r")
        root = zarr.open_group(store, mode="r+")
        if PCA in root:
            del root[PCA]
        k, axes = len(self.components), "c" + "".join(source.metadata.dimension_names[1:])
        create_array(root, PCA, (k, *source.shape[1:]), (k, *source.chunks[1:]), "float16", axes)
        target = zarr.open_array(f"{store}/{PCA}", mode="r+")
        grid = BlockGrid(tuple(source.shape[1:]), tuple(source.chunks[1:]))
        for index in tqdm(list(grid), desc="pca", unit="block", disable=not progress):
            region = (slice(None), *grid.region(index))
            block = np.asarray(source[region], dtype=np.float32)
            flat = block.reshape(block.shape[0], -1).T                                 # (cells, F)
            target[region] = self(flat).T.reshape(k, *block.shape[1:]).astype(np.float16)
        root.attrs["emfm"] = {**root.attrs["emfm"], "pca": {"components": k, "explained_variance": self.explained}}


class Clusterer:
    """A fitted clustering: ``scores(x)`` (N, k), larger = more likely; the label is the argmax."""

    def __init__(self, method: str, k: int, backend: str = "sklearn", seed: int = 0) -> None:
        if method not in METHODS:
            raise EmfmError(f"method={method}: expected one of {', '.join(METHODS)}")
        if backend not in BACKENDS:
            raise EmfmError(f"backend={backend}: expected one of {', '.join(BACKENDS)}")
        if k < 2:
            raise EmfmError(f"k={k}: expected at least 2 clusters")
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
            self.centers = kmeans.centroids.copy()
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

    def __init__(self, spec: str | Mapping[str, str], shape: tuple[int, ...], ignore: int | None = None) -> None:
        if isinstance(spec, Mapping):
            self.volumes = [Volume(p) for p in spec.values()]
            self.names = {0: "background", **{i + 1: str(n) for i, n in enumerate(spec)}}
        else:
            self.volumes = [Volume(spec)]
            self.names = {int(k): str(v) for k, v in (open_store(str(spec)).get("classes") or {}).items()}
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
        self.k, self.counts = k, {}

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
    image = volume.normalize(volume.read(tuple(slice(o.start + w.start, o.start + w.stop) for w, o in zip(window, roi))))
    inner = tuple(slice(r.start - w.start, r.stop - w.start) for r, w in zip(region, window))
    return intensity_features(image)[(slice(None), *inner)]


def prepare_output(cfg: Any, volume: Volume, roi: tuple[slice, ...], settings: dict[str, Any],
                   inputs: Mapping[str, Any]) -> zarr.Group:
    """Create the cluster map's group, or take over one of these settings (its finished feature
    store is reused). Another emfm cluster map is replaced only with overwrite=true; a feature store
    inside it survives (it is kept or replaced by its own settings). Never one of ``inputs``."""
    refuse_overlap("output", cfg.output, inputs)
    out = Path(cfg.output)
    if out.exists():
        previous = open_store(str(out))
        if previous.get("kind") != "clusters":
            raise EmfmError(f"output={out} already holds something that is not an emfm cluster map; choose another output")
        if previous.get("clusters") != settings and not cfg.overwrite:
            raise EmfmError(f"output={out} already holds a cluster map of other settings; choose another output "
                            f"or set overwrite=true")
        root = zarr.open_group(str(out), mode="r+")
        for name in (CLUSTERS, BASELINE):
            if name in root:
                del root[name]
    else:
        root = zarr.open_group(str(out), mode="w-")
    vs = list(volume.voxel_size or (1.0,) * volume.ndim)
    root.attrs.update(ome_attrs("clusters", volume.axes, vs, [r.start * v for r, v in zip(roi, vs)])
                      | {"emfm": {"kind": "clusters", "clusters": settings, "complete": False}})
    return root


def write_report(report: Mapping[str, Any], path: str) -> None:
    """JSON written to a temporary file and moved into place (never half a report)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(partial, path)


def cluster(cfg: Any) -> dict[str, Any]:
    """The ``emfm cluster`` command: features -> sample -> fit -> cluster map (+ scores, pictures)."""
    start = time.perf_counter()
    volume = Volume(cfg.input, cfg.get("level", 0))
    roi = parse_roi(cfg.get("roi"), volume.shape)
    labels = Labels(cfg.labels, volume.shape, cfg.get("ignore_label")) if cfg.get("labels") else None
    output = str(Path(cfg.output).resolve())
    store = str(Path(cfg.features).resolve()) if cfg.get("features") else f"{output}/features"
    settings = {"input": str(volume.path), "input_shape": list(volume.shape), "roi": [[r.start, r.stop] for r in roi],
                "k": int(cfg.k), "method": cfg.method, "backend": cfg.backend, "seed": int(cfg.seed),
                "sample": int(cfg.sample), "pca": cfg.get("pca"), "features": store,
                "labels": OmegaConf.to_container(cfg.labels) if OmegaConf.is_config(cfg.get("labels")) else cfg.get("labels")}
    given = settings["labels"]                       # None, a path or {name: path}
    inputs = {"input": cfg.input, "checkpoint": cfg.get("checkpoint"),
              **({f"labels {k}": v for k, v in given.items()} if isinstance(given, dict) else {"labels": given}),
              # the store kept inside the map's own output is not replaced with it
              "features store": None if store == f"{output}/features" else store}
    if cfg.get("report"):
        refuse_overlap("report", cfg.report, inputs)
    meta = check_store(store, volume, roi) if cfg.get("features") else None   # a given store is checked first
    root = prepare_output(cfg, volume, roi, settings, inputs)
    if meta is None:
        extract_features(cfg, store)
        meta = open_store(store)
    array = PCA if cfg.get("pca") and stored_pca(store) == int(cfg.pca) else FEATURES
    vectors, coords = sample_store(store, array, int(cfg.sample), int(cfg.seed))
    projection = None
    if array == FEATURES and cfg.get("pca"):            # a given store without this projection: project here
        projection = Projection.fit(vectors, int(cfg.pca))
        vectors = projection(vectors)
    clusterer = Clusterer(cfg.method, int(cfg.k), cfg.backend, int(cfg.seed)).fit(vectors)
    features = zarr.open_array(f"{store}/{array}", mode="r")
    stride, grid = tuple(meta["features"]["stride"]), tuple(features.shape[1:])
    cells = BlockGrid(grid, tuple(features.chunks[1:]))
    chunks = tuple(b * k for b, k in zip(cells.block, stride))
    shape = tuple(r.stop - r.start for r in roi)
    for name in (CLUSTERS, BASELINE) if labels is not None else (CLUSTERS,):
        create_array(root, name, shape, chunks, "uint8" if cfg.k <= 255 else "uint16", volume.axes)
    baseline = fit_baseline(volume, roi, int(cfg.k), int(cfg.sample), int(cfg.seed), cells_to_voxels(cells, stride, roi),
                            cfg.method, cfg.backend) if labels is not None else None
    tables = {"learned": Table(int(cfg.k)), "intensity_baseline": Table(int(cfg.k))}
    sizes = np.zeros(int(cfg.k), dtype=np.int64)
    for index in tqdm(list(cells), desc="clusters", unit="block", disable=not cfg.progress):
        region = cells.region(index)
        voxels = tuple(slice(c.start * k, min(c.stop * k, r.stop - r.start)) for c, k, r in zip(region, stride, roi))
        margin = tuple(slice(max(0, c.start - 1), min(n, c.stop + 1)) for c, n in zip(region, grid))
        block = np.asarray(features[(slice(None), *margin)], dtype=np.float32)           # (F, *cells)
        flat = block.reshape(block.shape[0], -1).T                                        # (cells, F)
        flat = projection(flat) if projection is not None else flat
        scores = clusterer.scores(flat).T.reshape(clusterer.k, *block.shape[1:])           # (k, *cells)
        assigned = upsample_linear(scores, margin, voxels, stride, grid).argmax(0).astype(root[CLUSTERS].dtype)
        root[CLUSTERS][voxels] = assigned
        sizes += np.bincount(assigned.ravel(), minlength=clusterer.k)
        if labels is not None:
            truth = labels.read(tuple(slice(r.start + v.start, r.start + v.stop) for r, v in zip(roi, voxels)))
            tables["learned"].add(assigned, truth)
            model, mean, std = baseline
            feats = baseline_block(volume, roi, voxels)
            flat = (feats.reshape(3, -1).T - mean) / std
            base = model.predict(flat).reshape(assigned.shape).astype(assigned.dtype)
            root[BASELINE][voxels] = base
            tables["intensity_baseline"].add(base, truth)
    root.attrs["emfm"] = {**root.attrs["emfm"], "complete": True,
                          "centers": clusterer.centers.tolist() if clusterer.centers is not None else None}
    report: dict[str, Any] = {"input": str(volume.path), "output": output, "features": store, "k": clusterer.k,
                              "method": cfg.method, "stride": list(stride), "array": array,
                              "cluster_fraction": (sizes / max(sizes.sum(), 1)).round(4).tolist()}
    if projection is not None:
        report["pca"] = {"components": len(projection.components), "explained_variance": round(projection.explained, 4)}
    if labels is not None:
        report["learned"] = tables["learned"].score(labels.names)
        report["intensity_baseline"] = tables["intensity_baseline"].score(labels.names)
    if cfg.get("pictures"):
        from emfm.explore.pictures import cluster_pictures

        report["pictures"] = cluster_pictures(volume, roi, root, vectors, coords, clusterer, stride, labels,
                                              Path(cfg.pictures), int(cfg.seed))
    report["seconds"] = round(time.perf_counter() - start, 1)
    if cfg.get("report"):
        write_report(report, cfg.report)
    print(f"wrote {output}: {clusterer.k} clusters" + (f", report {cfg.report}" if cfg.get("report") else ""))
    if labels is not None:
        for arm in ("learned", "intensity_baseline"):
            ious = ", ".join(f"{n} {v:.3f}" for n, v in report[arm]["iou"].items())
            print(f"  {arm}: IoU {ious}; ARI {report[arm]['ari']:.3f}")
    return report


def cells_to_voxels(cells: BlockGrid, stride: tuple[int, ...], roi: tuple[slice, ...]) -> BlockGrid:
    """The voxel blocks matching the feature-cell blocks."""
    return BlockGrid(tuple(r.stop - r.start for r in roi), tuple(b * k for b, k in zip(cells.block, stride)))


class SeedLabels:
    """Chosen clusters as classes over the whole raw grid, ``ignore`` elsewhere; read in slabs by the writer."""

    def __init__(self, clusters: str, mapping: Mapping[int, int], slices: list[int] | None, ignore: int) -> None:
        meta = open_store(clusters)
        if meta.get("kind") != "clusters" or not meta.get("complete"):
            raise EmfmError(f"{clusters}: not a complete emfm cluster map (make one with `emfm cluster`)")
        settings = meta["clusters"]
        k = int(settings["k"])
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
        self.dtype, self.voxel_size, self.name = np.dtype(np.uint8), self.map.voxel_size, f"seeds of {clusters}"

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
    written = write_ome_zarr(seeds, out, is_label=True, overwrite=overwrite, inputs={"cluster map": clusters})
    group = zarr.open_group(str(written), mode="r+")
    group.attrs["emfm"] = {**dict(group.attrs).get("emfm", {}), "seeds": {
        "clusters": str(clusters), "mapping": {str(c): int(v) for c, v in mapping.items()}, "ignore_label": ignore}}
    return written
