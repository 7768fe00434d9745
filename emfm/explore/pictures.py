"""Pictures of what an encoder learned: cluster maps over raw slices, a UMAP of the features,
example patches per cluster, principal components as colour. Each returns a matplotlib figure
(for notebooks); ``cluster_pictures`` writes the set that ``emfm cluster`` leaves behind."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from emfm.data.volume import Volume


def palette(k: int) -> np.ndarray:
    """(k, 3) distinct colours in [0, 1]."""
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    return np.array([cmap(i % cmap.N)[:3] for i in range(k)])


def grey(image: np.ndarray) -> np.ndarray:
    """A slice stretched to its 1-99 % percentiles, as RGB (Y, X, 3)."""
    lo, hi = np.percentile(image, [1, 99])
    g = np.clip((image.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1)
    return np.repeat(g[..., None], 3, axis=-1)


def overlay(image: np.ndarray, labels: np.ndarray, k: int, alpha: float = 0.45) -> np.ndarray:
    """A raw slice with a label map tinted over it; labels < 0 (ignored) stay grey."""
    rgb = grey(image)
    known = labels >= 0
    rgb[known] = (1 - alpha) * rgb[known] + alpha * palette(k)[labels[known]]
    return rgb


def pca_rgb(features: np.ndarray) -> np.ndarray:
    """Features (F, *spatial) as colour (*spatial, 3): the first three principal components, fitted
    over all the places given (so several slices share one colouring), each stretched to 1-99 %."""
    flat = features.reshape(features.shape[0], -1).T.astype(np.float32)          # (pixels, F)
    flat = flat - flat.mean(0)
    _, _, vt = np.linalg.svd(flat[:: max(1, len(flat) // 20000)], full_matrices=False)
    rgb = flat @ vt[:3].T                                                            # (pixels, 3)
    lo, hi = np.percentile(rgb, [1, 99], axis=0)
    rgb = np.clip((rgb - lo) / np.maximum(hi - lo, 1e-6), 0, 1)
    return rgb.reshape(*features.shape[1:], 3)


def panels_figure(rows: Sequence[Sequence[tuple[str, np.ndarray]]], k: int | None = None) -> Figure:
    """A grid of titled RGB images (one row per slice), with a legend of cluster colours."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.2 * n_cols, 3.2 * n_rows), squeeze=False)
    for ax_row, row in zip(axes, rows):
        for ax, (title, image) in zip(ax_row, row):
            ax.imshow(image, interpolation="nearest")
            ax.set_title(title, fontsize=9)
        for ax in ax_row:
            ax.axis("off")
    if k is not None:
        handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in palette(k)]
        fig.legend(handles, [str(i) for i in range(k)], loc="lower center", ncol=min(k, 12), title="cluster",
                   fontsize=8)
    fig.tight_layout(rect=(0, 0.06 if k is not None else 0, 1, 1))
    return fig


def umap_embedding(vectors: np.ndarray, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """A 2-D UMAP embedding (n, 2) of feature vectors.

    The neighbours come exact from scikit-learn: umap-learn's own search is a Python loop over pairs below
    4096 vectors, or a numba compile of ~50 s above, either way most of an ``emfm cluster`` of a small volume.
    """
    from sklearn.neighbors import NearestNeighbors

    with warnings.catch_warnings():      # umap-learn warns at import that TensorFlow (ParametricUMAP) is absent
        warnings.simplefilter("ignore", ImportWarning)
        import umap

    n_neighbors = min(n_neighbors, len(vectors) - 1)
    distances, indices = NearestNeighbors(n_neighbors=n_neighbors).fit(vectors).kneighbors(vectors)
    reducer = umap.UMAP(n_neighbors=n_neighbors, random_state=seed, n_jobs=1,
                        precomputed_knn=(indices, distances, None))
    with warnings.catch_warnings():      # without a search index the reducer cannot transform new data: not needed
        warnings.filterwarnings("ignore", message=".*precomputed_knn.*")
        return reducer.fit_transform(vectors)


def scatter_figure(embedding: np.ndarray, labels: np.ndarray, k: int, title: str = "UMAP of features") -> Figure:
    """The embedding coloured by cluster."""
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.scatter(embedding[:, 0], embedding[:, 1], c=palette(k)[labels], s=3, linewidths=0)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c) for c in palette(k)]
    ax.legend(handles, [str(i) for i in range(k)], title="cluster", fontsize=8, markerscale=1.5, loc="best")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    return fig


def gallery_figure(patches: Sequence[Sequence[np.ndarray]], k: int) -> Figure:
    """One row per cluster of example patches, framed in the cluster's colour."""
    n = max(1, max(len(p) for p in patches))
    fig, axes = plt.subplots(k, n, figsize=(1.2 * n, 1.25 * k), squeeze=False)
    for c, (row, examples) in enumerate(zip(axes, patches)):
        for ax, patch in zip(row, examples):
            ax.imshow(grey(patch))
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_color(palette(k)[c])
                side.set_linewidth(3)
        row[0].set_ylabel(str(c), rotation=0, labelpad=12, fontsize=9)
    fig.suptitle("examples per cluster (centred on a sampled feature cell)", fontsize=9)
    fig.tight_layout()
    return fig


def patch_at(volume: Volume, centre: Sequence[int], size: int = 64) -> np.ndarray:
    """An in-plane patch of ``volume`` centred on ``centre`` (clipped at the borders), (size, size)."""
    key: list[Any] = [int(np.clip(c, 0, n - 1)) for c, n in zip(centre[:-2], volume.shape[:-2])]
    for c, n in zip(centre[-2:], volume.shape[-2:]):
        start = int(np.clip(c - size // 2, 0, max(0, n - size)))
        key.append(slice(start, min(n, start + size)))
    patch = volume.read(tuple(slice(k, k + 1) if isinstance(k, int) else k for k in key))
    return patch.reshape(patch.shape[-2:])


def cluster_pictures(volume: Volume, roi: tuple[slice, ...], root: Any, vectors: np.ndarray, coords: np.ndarray,
                     clusterer: Any, stride: Sequence[int], labels: Any, out_dir: Path, seed: int = 0,
                     slices: int = 3, examples: int = 8, title: str = "learned clusters") -> dict[str, str]:
    """``cluster_maps.png``, ``umap.png`` and ``gallery.png`` for an ``emfm cluster`` run; returns their paths.
    ``title``: of the cluster map's panels."""
    out_dir.mkdir(parents=True, exist_ok=True)
    k, written = clusterer.k, {}
    clusters = root["0"]
    baseline = root["intensity_baseline"] if "intensity_baseline" in root else None
    depth = clusters.shape[0] if clusters.ndim == 3 else 1
    rows = []
    for z in sorted({int(i) for i in np.linspace(0, depth - 1, min(slices, depth))}):
        at = (z,) if clusters.ndim == 3 else ()
        raw = volume.read(tuple(slice(r.start + a, r.start + a + 1) for r, a in zip(roi, at)) + tuple(roi[len(at):]))
        raw = raw.reshape(raw.shape[-2:])
        row = [(f"raw z={roi[0].start + z}" if at else "raw", grey(raw)),
               (title, overlay(raw, np.asarray(clusters[at]).astype(int), k))]
        if baseline is not None:
            row.append(("intensity baseline", overlay(raw, np.asarray(baseline[at]).astype(int), k)))
        if labels is not None:
            truth = labels.read(tuple(slice(r.start + a, r.start + a + 1) for r, a in zip(roi, at))
                                + tuple(roi[len(at):]))
            n_classes = max(int(truth.max()) + 1, 2)
            row.append(("labels", overlay(raw, truth.reshape(raw.shape), n_classes)))
        rows.append(row)
    for name, fig in (("cluster_maps.png", panels_figure(rows, k)),):
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written[name] = str(out_dir / name)
    assigned = clusterer.predict(vectors)
    pick = np.random.default_rng(seed).permutation(len(vectors))[:3000]
    fig = scatter_figure(umap_embedding(vectors[pick], seed), assigned[pick], k,
                         f"UMAP of {len(pick)} sampled feature vectors")
    fig.savefig(out_dir / "umap.png", dpi=110)
    plt.close(fig)
    written["umap.png"] = str(out_dir / "umap.png")
    rng = np.random.default_rng(seed)
    centres = coords * np.asarray(stride) + np.asarray(stride) // 2 + [r.start for r in roi]
    gallery = []
    for c in range(k):
        members = np.flatnonzero(assigned == c)
        chosen = rng.choice(members, size=min(examples, len(members)), replace=False)
        gallery.append([patch_at(volume, centres[i]) for i in chosen])
    fig = gallery_figure(gallery, k)
    fig.savefig(out_dir / "gallery.png", dpi=110)
    plt.close(fig)
    written["gallery.png"] = str(out_dir / "gallery.png")
    return written
