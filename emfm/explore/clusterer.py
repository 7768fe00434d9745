"""The clusterings of ``emfm cluster``: k-means (or a Gaussian mixture) of feature vectors, mapped to voxels,
and the intensity baseline it is compared with.

The clusterer is fitted on a sample of feature vectors. Each cluster's score is linear in the features
(k-means: ``2 f.c - |c|^2``), so interpolating the scores of the feature cells linearly and taking the
best is exactly k-means on linearly interpolated features, at a cost of k channels, not F. The baseline
clusters raw intensity and local statistics the same way: what the features add over it is what
the encoder learned.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from emfm.blockwise.grid import BlockGrid
from emfm.data.volume import Volume
from emfm.errors import EmfmError
from emfm.explore.features import Projection

METHODS = ("kmeans", "gmm")
BACKENDS = ("sklearn", "minibatch", "faiss")
HALO = 12   # voxels of context for the baseline's local statistics (3 sigma)


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
        out = interpolate_axis(out, axis, c, v, k, n)
    return out


def interpolate_axis(values: np.ndarray, axis: int, cells: slice, voxels: slice, stride: int, size: int) -> np.ndarray:
    """``values`` interpolated along ``axis`` from ``cells`` (of a grid of ``size``) onto ``voxels``.

    Each voxel gets ``a + (b - a) * w`` from the two cells around it, with ``b - a`` taken once per cell: four
    passes over the output. At stride 1 every voxel is a cell's centre, and the values are taken as they are.
    """
    u = np.clip((np.arange(voxels.start, voxels.stop) + 0.5) / stride - 0.5, 0, size - 1) - cells.start
    lo = np.clip(np.floor(u).astype(int), 0, values.shape[axis] - 1)
    w = (u - lo).astype(np.float32)
    out = np.take(values, lo, axis=axis)
    if w.any():
        rise = np.diff(values, axis=axis, append=np.take(values, [-1], axis=axis))      # b - a; 0 past the last
        step = np.take(rise, lo, axis=axis)
        step *= w.reshape([-1 if a == axis else 1 for a in range(values.ndim)])
        out += step
    return out


def assign_clusters(scores: np.ndarray, cells: tuple[slice, ...], voxels: tuple[slice, ...],
                    stride: tuple[int, ...], grid: tuple[int, ...]) -> np.ndarray:
    """The cluster of each voxel: the argmax over k of :func:`upsample_linear`, the first of equal scores.

    The last axis, where the voxels multiply, is interpolated one cluster at a time against the best so far, so
    the k score maps at full resolution are never held together: k times less memory, and half the time.
    """
    coarse = upsample_linear(scores, cells[:-1], voxels[:-1], stride[:-1], grid[:-1])       # (k, *voxels, Xc)
    axis = coarse.ndim - 2
    best = interpolate_axis(coarse[0], axis, cells[-1], voxels[-1], stride[-1], grid[-1])
    labels = np.zeros(best.shape, dtype=cluster_dtype(len(scores)))
    for cluster in range(1, len(scores)):
        score = interpolate_axis(coarse[cluster], axis, cells[-1], voxels[-1], stride[-1], grid[-1])
        better = score > best
        np.maximum(best, score, out=best)
        labels += better * (cluster - labels)      # = cluster where better (modulo the dtype), without branches
    return labels


def cluster_map(clusterer: Clusterer, features: np.ndarray, stride: tuple[int, ...], shape: tuple[int, ...],
                projection: Projection | None = None) -> np.ndarray:
    """Cluster ids on the voxel grid of ``shape`` from features (F, *cells) held in memory (notebooks)."""
    flat = features.reshape(len(features), -1).T                                    # (cells, F)
    scores = clusterer.scores(projection(flat) if projection is not None else flat)
    scores = scores.T.reshape(clusterer.k, *features.shape[1:])                     # (k, *cells)
    cells = tuple(slice(0, n) for n in features.shape[1:])
    return assign_clusters(scores, cells, tuple(slice(0, n) for n in shape), stride, features.shape[1:])


def cluster_dtype(k: int) -> str:
    """The smallest unsigned integer type that holds the ids of k clusters (and 255 as a fill value below 255)."""
    return "uint8" if k <= 255 else "uint16"


def fit_clusters(features: np.ndarray, k: int, pca: int, sample: int,
                 seed: int = 0) -> tuple[Clusterer, Projection, np.ndarray]:
    """k-means of features (F, *cells) held in memory (notebooks), with ``emfm cluster``'s steps (a projection on
    ``pca`` principal components, then k-means), both fitted on one sample of ``sample`` random cells. Returns it,
    the projection and the sampled cells' flat indices."""
    vectors = features.reshape(len(features), -1).T                                  # (cells, F)
    picked = np.random.default_rng(seed).permutation(len(vectors))[:sample]
    projection = Projection.fit(vectors[picked], pca)
    return Clusterer("kmeans", k, seed=seed).fit(projection(vectors[picked])), projection, picked


def cluster_colors(k: int) -> np.ndarray:
    """(k, 3) the colours of clusters 0..k-1 in the pictures' legend, also stored with the map for viewers."""
    from emfm.explore.pictures import palette

    return palette(k)


def intensity_features(image: np.ndarray, sigma: float = 4.0) -> np.ndarray:
    """The baseline's features (3, *shape): smoothed intensity, local mean and local standard deviation,
    in-plane (EM stacks are anisotropic and 2-D models see slices too)."""
    plane = (0,) * (image.ndim - 2) + (1, 1)
    smooth = ndimage.gaussian_filter(image, [p * 1.0 for p in plane])
    mean = ndimage.gaussian_filter(image, [p * sigma for p in plane])
    var = ndimage.gaussian_filter(image**2, [p * sigma for p in plane]) - mean**2
    return np.stack([smooth, mean, np.sqrt(np.maximum(var, 0))])


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


def baseline_clusters(baseline: tuple[Clusterer, np.ndarray, np.ndarray], volume: Volume, roi: tuple[slice, ...],
                      region: tuple[slice, ...]) -> np.ndarray:
    """The cluster of each voxel of a region (region coordinates) by the baseline :func:`fit_baseline` fitted."""
    model, mean, std = baseline
    feats = baseline_block(volume, roi, region)                                      # (3, *region)
    return model.predict((feats.reshape(3, -1).T - mean) / std).reshape(feats.shape[1:])


def cells_to_voxels(cells: BlockGrid, stride: tuple[int, ...], roi: tuple[slice, ...]) -> BlockGrid:
    """The voxel blocks matching the feature-cell blocks."""
    return BlockGrid(tuple(r.stop - r.start for r in roi), tuple(b * k for b, k in zip(cells.block, stride)))
