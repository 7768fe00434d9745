"""``emfm seeds``: chosen clusters of a cluster map as sparse labels for ``emfm finetune``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import zarr

from emfm.blockwise.store import add_attrs
from emfm.data.ngff import read_attrs, set_label_colors
from emfm.data.volume import Volume
from emfm.errors import EmfmError
from emfm.explore.clusterer import cluster_colors


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
