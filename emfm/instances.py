"""Instances from the probability maps of a network, 2-D (Y, X) and 3-D (Z, Y, X): numpy in, labels out.

The one home of cutting maps into cells: ``from_probabilities`` is what ``emfm evaluate`` (and the
label-efficiency comparison) scores, and ``emfm predict`` writes the same cells block by block
(emfm/predict/stitch.py: the same ``maps`` and ``grow``, with the seeds merged across block faces).

Every method goes the same way: seeds (one per object, ideally) in the pixels surely inside an
object, a watershed from the seeds inside the foreground, which also gives the boundary pixels
back to the objects, then ``size_filter``. Labels are uint32 (uint64 past 2**32 - 1 objects), 0 = background, objects
numbered 1..n.

- ``from_boundaries``: foreground + boundary predictions (``boundary`` target).
- ``from_membranes``: a membrane probability only (``membrane`` target, the ISBI 2012 convention):
  cells are the basins of the non-membrane pixels, there is no background.
- ``from_affinities``: nearest-neighbour affinities (``affinity`` target), over-segmented by a
  watershed and agglomerated along the affinities between fragments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage
from skimage.morphology import h_maxima
from skimage.segmentation import relabel_sequential, watershed

from emfm.data.targets import offset_slices
from emfm.errors import EmfmError

if TYPE_CHECKING:
    from skimage.graph import RAG

KINDS = ("membrane", "boundary", "foreground", "affinity")    # the targets whose probabilities hold instances
METHODS = ("watershed", "components")
SEEDING = "components"       # emfm predict's seeds: the interior's components, merged across blocks


def _as_labels(labels: np.ndarray) -> np.ndarray:
    """uint32 unless the ids need uint64."""
    dtype = np.uint32 if labels.size == 0 or labels.max() <= np.iinfo(np.uint32).max else np.uint64
    return labels.astype(dtype, copy=False)


def size_filter(labels: np.ndarray, min_size: int = 0) -> np.ndarray:
    """Objects smaller than ``min_size`` pixels become background; the rest are renumbered 1..n.

    Small objects are removed rather than merged into a neighbour: a merge would have to pick one
    neighbour and can glue two real objects together through a fragment, a hole cannot.
    """
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise EmfmError(f"size_filter: expected non-negative integer labels, got dtype {labels.dtype}")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise EmfmError(f"size_filter min_size: expected an integer >= 0, got {min_size!r}")
    labels = labels.astype(np.int64)
    if min_size > 1:
        sizes = np.bincount(labels.ravel())
        small = sizes < min_size
        small[0] = False
        labels = np.where(small[labels], 0, labels)
    return _as_labels(relabel_sequential(labels)[0])


def _check(name: str, arrays: Sequence[np.ndarray], sampling: Sequence[float] | None, method: str) -> None:
    shape = arrays[0].shape
    if len(shape) not in (2, 3) or any(a.shape != shape for a in arrays):
        raise EmfmError(f"{name}: expected 2-D (Y, X) or 3-D (Z, Y, X) maps of one shape, "
                        f"got {[list(a.shape) for a in arrays]}")
    if sampling is not None and len(sampling) != len(shape):
        raise EmfmError(f"{name} sampling: expected {len(shape)} voxel sizes, got {list(sampling)}")
    if method not in METHODS:
        raise EmfmError(f"{name} method: expected one of {', '.join(METHODS)}, got {method!r}")


def _seeds(interior: np.ndarray, method: str, seed_distance: float, sampling: Sequence[float] | None) -> np.ndarray:
    """Labelled seeds in ``interior``, the pixels surely inside an object.

    ``components``: each connected component of the interior is one seed, so a gap in a boundary
    merges the two sides. ``watershed``: seeds are the maxima of the interior's distance transform
    standing at least ``seed_distance`` above the saddle to any higher maximum (h-maxima): two
    blobs joined by a neck narrower than the blobs split, a long neurite with a bumpy
    distance-transform ridge does not.
    """
    if method == "components":
        return ndimage.label(interior)[0]
    dist = ndimage.distance_transform_edt(interior, sampling=sampling)
    faces = ndimage.generate_binary_structure(interior.ndim, 1)  # diagonal contact does not join maxima
    return ndimage.label(h_maxima(dist, seed_distance, footprint=faces) & interior)[0]


def maps(probs: np.ndarray, kind: str, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(interior, relief, mask) of the probabilities (K, *spatial) of a ``kind`` target: seeds are made in the
    interior and grow over the relief inside the mask (``None``: everywhere)."""
    if kind == "membrane":
        return probs[0] <= threshold, probs[0], None
    if kind == "boundary":
        mask = probs[0] > threshold
        return mask & (probs[1] <= threshold), probs[1], mask
    if kind == "foreground":
        mask = probs[0] > threshold
        return mask, 1 - probs[0], mask
    if kind == "affinity":
        mean = probs.mean(0)                                # strongly linked voxels are inside
        return mean > threshold, 1 - mean, None
    raise EmfmError(f"a {kind!r} target has no instances; needs one of {', '.join(KINDS)}")


def grow(relief: np.ndarray, seeds: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The seeds flooded over the relief inside the mask (a seeded watershed).

    Equal heights (common in a uint8 map) are flooded in raster order, not in the order of the
    watershed's queue, which depends on everything else in the image: so a block read with enough
    halo floods exactly as the whole region does.
    """
    order = np.argsort(relief, axis=None, kind="stable")
    rank = np.empty(relief.size, np.int64)
    rank[order] = np.arange(relief.size)
    return watershed(rank.reshape(relief.shape), seeds, mask=mask)


def _from_maps(probs: np.ndarray, kind: str, threshold: float, method: str, min_size: int, seed_distance: float,
               sampling: Sequence[float] | None) -> np.ndarray:
    interior, relief, mask = maps(probs, kind, threshold)
    return size_filter(grow(relief, _seeds(interior, method, seed_distance, sampling), mask), min_size)


def from_probabilities(probs: np.ndarray, target: Mapping[str, Any], threshold: float = 0.5,
                       seeding: str = SEEDING, min_size: int = 0) -> np.ndarray:
    """Instances from the probabilities (K, *spatial) of a ``target`` config: the cells ``emfm predict`` writes
    and ``emfm evaluate`` scores.

    ``seeding="watershed"`` seeds at distance-transform maxima instead of the interior's
    components, and cuts affinities with ``from_affinities`` (a merge of fragments over the whole
    region, which blockwise prediction does not do). Foreground objects are the components of the
    foreground whatever the seeding.
    """
    kind = target["kind"]
    if kind == "affinity" and seeding == "watershed":
        return from_affinities(probs, target["offsets"], threshold, min_size=min_size)
    method = "components" if kind == "foreground" else seeding
    return _from_maps(np.asarray(probs, dtype=np.float32), kind, threshold, method, min_size, 1.0, None)


def from_boundaries(foreground: np.ndarray, boundary: np.ndarray, threshold: float = 0.5, method: str = "watershed",
                    min_size: int = 0, seed_distance: float = 1.0,
                    sampling: Sequence[float] | None = None) -> np.ndarray:
    """Instances from foreground and boundary probabilities (channels 0 and 1 of the ``boundary`` target).

    Seeds come from the interior (foreground > threshold and boundary <= threshold), see
    ``_seeds`` for ``method``; they flood the boundary map inside the foreground.
    ``sampling`` is the voxel size per axis, e.g. ``(4, 1, 1)`` for anisotropic serial sections, so
    the distance transform measures physical distances.
    """
    foreground, boundary = np.asarray(foreground, dtype=np.float32), np.asarray(boundary, dtype=np.float32)
    _check("from_boundaries", [foreground, boundary], sampling, method)
    return _from_maps(np.stack([foreground, boundary]), "boundary", threshold, method, min_size, seed_distance,
                      sampling)


def from_membranes(membrane: np.ndarray, threshold: float = 0.5, method: str = "watershed", min_size: int = 0,
                   seed_distance: float = 1.0, sampling: Sequence[float] | None = None) -> np.ndarray:
    """Cells from a membrane probability alone: basins of the non-membrane pixels, which fill the image.

    The ISBI 2012 convention: the image is all cells and membranes, so there is no background and
    the membrane pixels are shared out between the cells they separate (by the watershed).
    """
    membrane = np.asarray(membrane, dtype=np.float32)
    _check("from_membranes", [membrane], sampling, method)
    return _from_maps(membrane[None], "membrane", threshold, method, min_size, seed_distance, sampling)


def _pair_grid(shape: Sequence[int],
               offset: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...], tuple[slice, ...]]:
    """``(src, dst, between)``: the pairs (p, p + offset) as in ``offset_slices``, and where they sit in the
    doubled grid.

    The doubled grid (2 * shape - 1) puts pixel p at 2p and the pair (p, q) of neighbours at p + q,
    between them, so an image-based watershed on it walks from pixel to pixel across pairs.
    """
    src, dst = offset_slices(offset, shape)
    between = tuple(slice(2 * s.start + o, 2 * s.stop + o - 1, 2) for s, o in zip(src, offset))
    return src, dst, between


def _pair_watershed(affinities: np.ndarray, offsets: Sequence[Sequence[int]], seeds: np.ndarray,
                    mask: np.ndarray) -> np.ndarray:
    """Seeded watershed on the graph of nearest-neighbour pairs, crossing a pair costs 1 - its affinity.

    A pixel watershed on a per-pixel boundary map ties where a pixel has attractive pairs to one
    object and repulsive ones to another (corners, two-pixel-thin objects); the pairs themselves
    say where it belongs. The price is a grid 2**ndim times the size of the input.
    """
    pixels = tuple(slice(None, None, 2) for _ in seeds.shape)
    height = np.ones([2 * s - 1 for s in seeds.shape], np.float32)
    inside, markers = np.zeros(height.shape, bool), np.zeros(height.shape, np.int64)
    height[pixels], inside[pixels], markers[pixels] = 0, mask, seeds
    for aff, offset in zip(affinities, offsets):
        src, dst, between = _pair_grid(seeds.shape, offset)
        height[between], inside[between] = 1 - aff[src], mask[src] & mask[dst]
    return watershed(height, markers, mask=inside)[pixels]


def _agglomerate(fragments: np.ndarray, affinities: np.ndarray, offsets: Sequence[Sequence[int]],
                 threshold: float) -> np.ndarray:
    """Merge adjacent fragments while the mean affinity across their shared boundary is above ``threshold``.

    Greedy average linkage with skimage's ``merge_hierarchical``: the most attracted pair first,
    and the mean of a merged boundary is recomputed from its summed pair affinities. skimage's graphs are
    imported here: they bring networkx, 0.1-0.2 s at the start of every `emfm predict` that needs none.
    """
    from skimage.graph import RAG, merge_hierarchical

    ends, values = [], []  # every pair of pixels across two fragments: (smaller id, larger id), affinity
    for aff, offset in zip(affinities, offsets):
        src, dst = offset_slices(offset, fragments.shape)
        a, b = fragments[src], fragments[dst]
        cross = (a != b) & (a > 0) & (b > 0)
        ends.append(np.stack([np.minimum(a, b)[cross], np.maximum(a, b)[cross]], 1))
        values.append(aff[src][cross])
    edges, inverse = np.unique(np.concatenate(ends), axis=0, return_inverse=True)
    inverse = inverse.ravel()
    totals = np.bincount(inverse, np.concatenate(values), len(edges))
    counts = np.bincount(inverse, minlength=len(edges))

    rag = RAG()
    for node in range(1, int(fragments.max()) + 1):
        rag.add_node(node, labels=[node])
    for (u, v), total, count in zip(edges.tolist(), totals, counts):
        rag.add_edge(u, v, total=total, count=count, weight=1 - total / count)

    def combine(graph: RAG, src: int, dst: int, n: int) -> dict[str, float]:
        total = sum(graph[x][n]["total"] for x in (src, dst) if graph.has_edge(x, n))
        count = sum(graph[x][n]["count"] for x in (src, dst) if graph.has_edge(x, n))
        return {"total": total, "count": count, "weight": 1 - total / count}

    merge_hierarchical(fragments, rag, 1 - threshold, rag_copy=False, in_place_merge=True,
                       merge_func=lambda graph, src, dst: None, weight_func=combine)
    mapping = np.zeros(int(fragments.max()) + 1, dtype=np.int64)
    for new, (_, data) in enumerate(rag.nodes(data=True), start=1):
        mapping[data["labels"]] = new
    return mapping[fragments]


def from_affinities(affinities: np.ndarray, offsets: Sequence[Sequence[int]], threshold: float = 0.5,
                    merge_threshold: float = 0.5, min_size: int = 0, seed_distance: float = 1.0,
                    sampling: Sequence[float] | None = None) -> np.ndarray:
    """Instances from affinities (C, *spatial) with channel c comparing p and p + ``offsets[c]``.

    Only the nearest-neighbour channels are used (longer offsets are for training). The foreground
    is every pixel with an affinity > ``threshold`` to a neighbour; seeds are the distance-transform
    maxima (see ``_seeds``) of the foreground whose own pairs (p, p + o) are all > ``threshold``,
    so two touching objects do not share one interior. The seeds flood the pair graph
    (``_pair_watershed``) into fragments, and adjacent fragments are merged while the mean
    affinity across their boundary is above ``merge_threshold``.
    """
    affinities = np.asarray(affinities, dtype=np.float32)
    if affinities.ndim not in (3, 4) or len(offsets) != len(affinities):
        raise EmfmError(f"from_affinities: expected (C, *spatial) affinities with one offset per channel, "
                        f"got shape {list(affinities.shape)} and {len(offsets)} offsets")
    nearest = [c for c, o in enumerate(offsets) if len(o) == affinities.ndim - 1 and sum(abs(int(x)) for x in o) == 1]
    if not nearest:
        raise EmfmError(f"from_affinities offsets: need nearest-neighbour offsets such as [0, -1], got {list(offsets)}")
    affinities, offsets = affinities[nearest], [offsets[c] for c in nearest]
    _check("from_affinities", list(affinities), sampling, "watershed")
    shape = affinities.shape[1:]
    foreground, interior = np.zeros(shape, bool), np.ones(shape, bool)
    for aff, offset in zip(affinities, offsets):
        src, dst = offset_slices(offset, shape)
        interior[src] &= aff[src] > threshold  # one-sided: a contact takes one row of pixels, not two
        for side in (src, dst):
            foreground[side] |= aff[src] > threshold
    seeds = _seeds(interior & foreground, "watershed", seed_distance, sampling)
    fragments = _pair_watershed(affinities, offsets, seeds, foreground)
    return size_filter(_agglomerate(fragments, affinities, offsets, merge_threshold), min_size)
