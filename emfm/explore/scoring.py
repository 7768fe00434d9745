"""Scores of a cluster map against labels: IoU per class after Hungarian matching, and the adjusted Rand index,
from voxel counts per (cluster, class) pair summed block by block."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from emfm.data.ngff import read_attrs
from emfm.data.volume import Volume
from emfm.errors import EmfmError
from emfm.metrics import adjusted_rand_index, matched_iou, merged_iou


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
