"""OME-Zarr as emfm writes it: NGFF 0.5 on zarr v3 or NGFF 0.4 on zarr v2, the input's units, pyramids, labels.

One home for the format, used by ``emfm ingest`` and by the stores of predict / features / cluster /
seeds: arrays (zstd, v3 dimension names or v2 ``/`` chunk keys), ``multiscales`` metadata with per-level
scale and translation, ``image-label`` metadata with colours (so viewers open label images as labels),
and the pyramid: each level halves the finest axes, built from the level above in slabs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, cast

import numpy as np
import zarr
from numcodecs import Blosc
from zarr.codecs import ZstdCodec

from emfm.errors import EmfmError

log = logging.getLogger(__name__)

MIN_PYRAMID_SIZE = 64   # keep downsampling while the smallest in-plane size is at least this
NGFF_UNITS = ("angstrom", "nanometer", "micrometer", "millimeter", "centimeter", "meter", "picometer")
# What inputs written by other tools say instead (NGFF names only the words; viewers read only those).
UNIT_ALIASES = {"A": "angstrom", "Å": "angstrom", "nm": "nanometer", "um": "micrometer", "µm": "micrometer",
                "μm": "micrometer", "micron": "micrometer", "mm": "millimeter", "cm": "centimeter", "m": "meter",
                "pm": "picometer"}
ZARR_FORMATS = {3: "0.5", 2: "0.4"}     # zarr format -> the NGFF version written on it
ZarrFormat = Literal[2, 3]
CHANNEL = "c"                            # the name of a channel axis (probabilities, features) in ``axes``


class Level(NamedTuple):
    shape: tuple[int, ...]
    factors: tuple[int, ...]    # downsampling relative to the previous level
    scale: tuple[float, ...]    # voxel size at this level


def check_zarr_format(value: Any, key: str = "zarr_format") -> ZarrFormat:
    """``value`` as a zarr format emfm writes, or a one-line error naming ``key``."""
    if value not in ZARR_FORMATS or isinstance(value, bool):
        raise EmfmError(f"{key}={value!r}: expected 3 (zarr v3, OME-Zarr 0.5) or 2 (zarr v2, OME-Zarr 0.4)")
    return cast(ZarrFormat, int(value))


def pyramid_plan(shape: tuple[int, ...], voxel_size: Sequence[float], levels: int | None) -> list[Level]:
    """Halve the finest axes each level; a thick axis (ssTEM z) waits until the others catch up.

    ``levels``: how many (fewer if the image runs out); None: until the in-plane size drops below
    MIN_PYRAMID_SIZE.
    """
    plan = [Level(shape, (1,) * len(shape), tuple(voxel_size))]
    while (len(plan) < levels) if levels is not None else (min(plan[-1].shape[-2:]) >= MIN_PYRAMID_SIZE):
        shp, sc = plan[-1].shape, plan[-1].scale
        finest = min((v for s, v in zip(shp, sc) if s > 1), default=0.0)
        f = tuple(2 if s > 1 and v <= 1.5 * finest else 1 for s, v in zip(shp, sc))
        if max(f) == 1:
            break
        plan.append(Level(tuple(-(-s // k) for s, k in zip(shp, f)), f, tuple(v * k for v, k in zip(sc, f))))
    return plan


def downsample(block: np.ndarray, factors: tuple[int, ...], is_label: bool) -> np.ndarray:
    """Mean pooling for intensities (same dtype, rounded ints); stride pick for labels (never mixes ids)."""
    if is_label:
        return block[tuple(slice(None, None, k) for k in factors)]
    pad = [(0, -s % k) for s, k in zip(block.shape, factors)]
    if any(p for _, p in pad):
        block = np.pad(block, pad, mode="edge")
    split = [n for s, k in zip(block.shape, factors) for n in (s // k, k)]
    acc = np.float32 if block.dtype.itemsize <= 2 or block.dtype == np.float32 else np.float64
    mean = block.reshape(split).mean(axis=tuple(range(1, len(split), 2)), dtype=acc)
    return (np.rint(mean) if block.dtype.kind in "ui" else mean).astype(block.dtype)


def build_pyramid(arrays: Sequence[Any], plan: list[Level], is_label: bool, channels: bool = False,
                  bar: Any = None) -> None:
    """Fill levels 1.. each from the zarr level above, in slabs of the level's chunk depth along the first
    spatial axis (memory: one slab). ``channels``: the arrays have a leading channel axis, never pooled."""
    lead = (slice(None),) if channels else ()
    for prev, cur, lv in zip(arrays, arrays[1:], plan[1:]):
        f0, depth = lv.factors[0], cur.chunks[len(lead)]
        for a in range(0, lv.shape[0], depth):
            b = min(a + depth, lv.shape[0])
            block = np.asarray(prev[(*lead, slice(a * f0, b * f0))])
            cur[(*lead, slice(a, b))] = downsample(block, (1,) * len(lead) + lv.factors, is_label)
            if bar is not None:
                bar.update()


def create_array(group: zarr.Group, name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: Any,
                 axes: str, every_chunk: bool = False) -> zarr.Array:
    """A zero-filled, zstd-compressed array in the group's zarr format, its chunks clipped to its shape.

    ``every_chunk``: writes through the returned array store chunks of zeros too (zarr leaves them out), so that
    a reader can tell a chunk lost from the store from an empty one.
    """
    ch = tuple(min(c, s) for c, s in zip(chunks, shape))
    if group.metadata.zarr_format == 3:
        return group.create_array(name, shape=shape, chunks=ch, dtype=dtype, fill_value=0,
                                  compressors=ZstdCodec(level=3), dimension_names=tuple(axes),
                                  config={"write_empty_chunks": every_chunk})
    return group.create_array(name, shape=shape, chunks=ch, dtype=dtype, fill_value=0,
                              compressors=Blosc(cname="zstd", clevel=5, shuffle=Blosc.SHUFFLE),
                              chunk_key_encoding={"name": "v2", "separator": "/"},
                              config={"write_empty_chunks": every_chunk})


def image_attrs(name: str, axes: str, units: Sequence[str | None], plan: list[Level], origin: Sequence[float],
                zarr_format: int, *, is_label: bool, label: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The NGFF attributes of a multiscale image with ``axes`` (``c``: a channel axis, the others spatial in
    ``units``; None: unknown, no unit written), its levels ``plan`` (spatial), placed at ``origin``.

    Mean-pooled levels move voxel centres by half the pooling; stride-picked ones (labels) do not.
    ``label``: the image is a label image, with this ``image-label`` content (``source``, ``colors``).
    """
    lead = len(axes) - len(plan[0].shape)
    datasets = []
    for i, lv in enumerate(plan):
        shift = [0.0 if is_label else (s - s0) / 2 for s, s0 in zip(lv.scale, plan[0].scale)]
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": [1.0] * lead + list(lv.scale)}]
        translation = [o + d for o, d in zip(origin, shift)]
        if any(translation):
            transforms.append({"type": "translation", "translation": [0.0] * lead + translation})
        datasets.append({"path": str(i), "coordinateTransformations": transforms})
    described = [{"name": a, "type": "channel"} for a in axes[:lead]]
    described += [{"name": a, "type": "space", **({"unit": u} if (u := ngff_unit(unit)) else {})}
                  for a, unit in zip(axes[lead:], units)]
    multiscale = {"name": name, "axes": described, "datasets": datasets, "type": "nearest" if is_label else "mean",
                  "metadata": {"method": "stride pick" if is_label else "mean pooling"}}
    ome: dict[str, Any] = {"multiscales": [multiscale]}
    if label is not None:
        ome["image-label"] = dict(label)
    if zarr_format == 3:
        return {"ome": {"version": ZARR_FORMATS[3], **ome}}
    multiscale["version"] = ZARR_FORMATS[2]
    if label is not None:
        ome["image-label"]["version"] = ZARR_FORMATS[2]
    return ome


def labels_attrs(names: Sequence[str], zarr_format: int) -> dict[str, Any]:
    """The attributes of an image's ``labels`` group listing its label images."""
    return {"ome": {"version": ZARR_FORMATS[3], "labels": list(names)}} if zarr_format == 3 else {"labels": list(names)}


def ngff_unit(unit: str | None) -> str | None:
    """An input's space unit as NGFF names it (``nm`` -> ``nanometer``); None if unknown (then none is written)."""
    if unit in NGFF_UNITS:
        return unit
    if unit is not None and unit not in UNIT_ALIASES:
        log.warning("unit %r is not an OME-Zarr space unit; the output names no unit", unit)
    return UNIT_ALIASES.get(unit) if unit is not None else None


def label_colors(colors: Mapping[int, Sequence[float]]) -> list[dict[str, Any]]:
    """``image-label`` colours: label value -> RGB or RGBA in [0, 1], as 0-255 RGBA (opaque unless given)."""
    return [{"label-value": int(value), "rgba": [int(round(255 * c)) for c in (*rgb, 1.0)[:4]]}
            for value, rgb in sorted(colors.items())]


def set_label_colors(group: zarr.Group, colors: Mapping[int, Sequence[float]]) -> None:
    """Give the label image ``group`` (written by :func:`image_attrs`) these colours."""
    attrs: dict[str, Any] = dict(group.attrs)
    ome: dict[str, Any] = attrs["ome"] if group.metadata.zarr_format == 3 else attrs
    ome["image-label"] = {**ome["image-label"], "colors": label_colors(colors)}
    group.attrs.update(attrs)


def read_attrs(path: str | Path) -> dict[str, Any]:
    """The ``emfm`` attributes of the store at ``path``: what it holds (``kind``) and how it was made; ``{}`` if it
    is none (or they are malformed). Every store emfm writes carries them: they mark it as emfm's."""
    try:
        attrs = dict(zarr.open_group(str(path), mode="r").attrs).get("emfm")
    except (OSError, ValueError):      # not a zarr group: zarr's errors derive from these
        return {}
    return attrs if isinstance(attrs, dict) else {}
