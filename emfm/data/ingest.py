"""Turn EM data in common formats into chunked, compressed OME-Zarr: out of core and atomic.

Sources (`emfm.data.sources`) are lazy, so a volume larger than RAM is never loaded whole;
`write_ome_zarr` streams chunk-aligned slabs and builds each pyramid level from the zarr level above,
writing into a temporary sibling that is renamed into place only once everything succeeded.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from tqdm.auto import tqdm

from emfm.data.ngff import (
    NGFF_UNITS,
    Level,
    build_pyramid,
    check_zarr_format,
    create_array,
    image_attrs,
    labels_attrs,
    pyramid_plan,
    read_attrs,
)
from emfm.data.sources import Source, open_source, source_path
from emfm.data.volume import store_normalization
from emfm.errors import EmfmError, first_line
from emfm.paths import alive, refuse_foreign, refuse_overlap, remove

log = logging.getLogger(__name__)


def _out_dtype(dtype: np.dtype, is_label: bool, name: str) -> np.dtype:
    if dtype.kind == "b":
        return np.dtype("u1")
    if dtype.kind in "ui":
        return dtype.newbyteorder("=")
    if dtype.kind == "f":
        return np.dtype("u8" if dtype.itemsize > 4 else "u4") if is_label else dtype.newbyteorder("=")
    raise EmfmError(f"{name}: dtype {dtype} not supported; integer or float image expected")


def _prepare_slab(slab: np.ndarray, start: int, name: str, is_label: bool, dtype: np.dtype) -> np.ndarray:
    """Refuse NaN/Inf (and non-integer labels) here, naming the first bad slice, before anything is trained on it."""
    if slab.dtype.kind == "f":
        bad = ~np.isfinite(slab)
        if is_label:
            with np.errstate(invalid="ignore"):
                bad |= (slab != np.round(slab)) | (slab < 0)
        if bad.any():
            i = start + int(np.argmax(bad.reshape(len(bad), -1).any(axis=1)))
            what = "non-integer or negative label values" if is_label else "NaN/Inf values"
            raise EmfmError(f"{name}: {what} at {'slice' if slab.ndim == 3 else 'row'} {i}")
    return slab.astype(dtype, copy=False)


def _image_attrs(fmt: int, title: str, axes: str, unit: str | None, plan: list[Level], is_label: bool, source: str,
                 under_image: bool) -> dict:
    """A label image (``--labels``, ``--mask``, or one of ``labels``) carries ``image-label``: viewers open it as
    labels; one under an image's ``labels`` group names that image as its source. ``every_chunk``: the store holds
    every chunk, zeros too, so a reader knows an absent one was lost (``Volume``'s ``missing_chunks``)."""
    label = ({"source": {"image": "../../"}} if under_image else {}) if is_label else None
    attrs = image_attrs(title, axes, [unit] * len(axes), plan, [0.0] * len(axes), fmt, is_label=is_label, label=label)
    return {**attrs, "emfm": {"source": source, "kind": "labels" if is_label else "image", "every_chunk": True}}


def _read_slab(src: Any, a: int, b: int, name: str) -> np.ndarray:
    """Slices ``a:b`` of a source; damaged data is named (readers raise their own types for it)."""
    try:
        return np.asarray(src[a:b])
    except EmfmError:
        raise
    except Exception as err:
        raise EmfmError(f"{name}: cannot read slices {a}:{b} ({type(err).__name__}: {first_line(err)})") from None


def _write_image(group: Any, title: str, src: Any, name: str, plan: list[Level], chunks: tuple, axes: str,
                 unit: str | None, is_label: bool, fmt: int, bar: Any, under_image: bool = False) -> None:
    """Level 0 from the source in chunk-aligned slabs, then each level from the zarr level above."""
    dtype = _out_dtype(np.dtype(src.dtype), is_label, name)
    arrays = [create_array(group, str(i), lv.shape, chunks, dtype, axes, every_chunk=True)
              for i, lv in enumerate(plan)]
    full = plan[0].shape
    for a in range(0, full[0], arrays[0].chunks[0]):
        b = min(a + arrays[0].chunks[0], full[0])
        slab = _read_slab(src, a, b, name)
        if slab.shape != (b - a,) + full[1:]:
            raise EmfmError(f"{name}: reading [{a}:{b}] gave shape {slab.shape}, expected {(b - a,) + full[1:]}")
        arrays[0][a:b] = _prepare_slab(slab, a, name, is_label, dtype)
        bar.update()
    build_pyramid(arrays, plan, is_label, bar=bar)
    group.attrs.update(_image_attrs(fmt, title, axes, unit, plan, is_label, name, under_image))


def _check_axes(axes: str | None, nd: int) -> str:
    axes = axes or "zyx"[-nd:]
    if len(axes) != nd or len(set(axes)) != nd or not set(axes) <= set("zyx"):
        raise EmfmError(f"axes {axes!r}: expected {nd} distinct letters from 'zyx' for a {nd}-D image, "
                        f"e.g. {'zyx'[-nd:]!r}")
    return axes


def _check_voxel_size(vs: Any, nd: int, axes: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in vs)
    except (TypeError, ValueError):
        out = ()
    if len(out) != nd or not all(math.isfinite(v) and v > 0 for v in out):
        raise EmfmError(f"voxel_size {vs!r}: expected {nd} positive numbers in {axes} order")
    return out


def _check_chunks(chunks: Sequence[int] | None, shape: tuple[int, ...]) -> tuple[int, ...]:
    if chunks is None:
        chunks = (8, 256, 256) if len(shape) == 3 else (256, 256)
    if len(chunks) != len(shape) or not all(isinstance(c, (int, np.integer)) and c > 0 for c in chunks):
        raise EmfmError(f"chunks {chunks!r}: expected {len(shape)} positive integers")
    return tuple(min(int(c), s) for c, s in zip(chunks, shape))


def _check_labels(labels: Mapping[str, Any] | None, shape: tuple[int, ...]) -> dict[str, Any]:
    out = {}
    for key, arr in (labels or {}).items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(key)):
            raise EmfmError(f"labels name {key!r}: use letters, digits, '_', '-' or '.'")
        arr = open_source(arr) if isinstance(arr, (str, Path)) else arr
        if tuple(arr.shape) != shape:
            raise EmfmError(f"labels {key!r}: shape {tuple(arr.shape)} differs from the image shape {shape}")
        out[str(key)] = arr
    return out


def _discard(path: Path) -> None:
    """Remove a temporary after a failure, keeping the error that caused it."""
    with contextlib.suppress(OSError):
        remove(path)


def _clean_stale(out: Path) -> None:
    """Remove what writers into ``out`` killed midway (kill -9, power loss) left: ``.tmp-<pid>`` stores of
    processes that are gone. An ``.old-<pid>`` output they had moved aside is put back if nothing replaced it."""
    for path in sorted(out.parent.glob(f"{glob.escape(out.name)}.*-*")):
        kind, _, pid = path.name[len(out.name) + 1:].partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or alive(int(pid)):
            continue
        if kind == "old" and not (out.exists() or out.is_symlink()):
            os.replace(path, out)
        else:
            remove(path)


def is_image_store(path: Path) -> bool:
    """Whether ``path`` is an image or label store this module wrote (``emfm ingest``, ``synth``, ``seeds``):
    every version marked it in its attributes, and it appears only whole (renamed into place)."""
    return read_attrs(path).get("kind") in ("image", "labels")


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished temp store to OUT; an old OUT is moved aside first and restored on failure."""
    old = None
    if out.exists() or out.is_symlink():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        remove(old)
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        remove(old)


def write_ome_zarr(source: Any, out: str | Path, *, axes: str | None = None,
                   voxel_size: Sequence[float] | None = None, unit: str | None = "nanometer",
                   chunks: Sequence[int] | None = None, levels: int | None = None, is_label: bool = False,
                   labels: Mapping[str, Any] | None = None, zarr_format: Literal[2, 3] = 3, overwrite: bool = False,
                   progress: bool = False, inputs: Mapping[str, str | Path] | None = None) -> Path:
    """Write an array-like as OME-Zarr (NGFF 0.5 on zarr v3, 0.4 on v2) with a pyramid, out of core, atomically.

    `voxel_size` falls back to `source.voxel_size`, then 1.0. Memory stays ~ one slab of chunk depth.
    `inputs`: the paths the source is read from (label paths are added), which `out` must stay clear of.
    """
    out = Path(out)
    label_files = {f"labels {k}": source_path(v) for k, v in (labels or {}).items() if isinstance(v, (str, Path))}
    refuse_overlap("output", out, {**(inputs or {}), **label_files})
    _clean_stale(out)
    name = str(getattr(source, "name", None) or type(source).__name__)
    shape = tuple(int(s) for s in source.shape)
    if len(shape) not in (2, 3):
        raise EmfmError(f"{name}: shape {shape}; a single-channel 2-D or 3-D image expected")
    axes = _check_axes(axes, len(shape))
    vs = voxel_size if voxel_size is not None else getattr(source, "voxel_size", None)
    vs = _check_voxel_size((1.0,) * len(shape) if vs is None else vs, len(shape), axes)
    check_zarr_format(zarr_format)
    if unit is not None and unit not in NGFF_UNITS:
        raise EmfmError(f"unit {unit!r}: expected one of {', '.join(NGFF_UNITS)}, or None (no unit known)")
    if levels is not None and (not isinstance(levels, (int, np.integer)) or levels < 1):
        raise EmfmError(f"levels {levels!r}: expected a positive integer")
    chunks = _check_chunks(chunks, shape)
    label_srcs = _check_labels(labels, shape)
    if refuse_foreign("output", out, "image or label store", is_image_store) and not overwrite:
        raise EmfmError(f"{out} exists; pass --overwrite")
    plan = pyramid_plan(shape, vs, levels)
    if levels is not None and len(plan) < levels:
        log.warning("%s: only %d pyramid levels possible for shape %s", out, len(plan), shape)
    images: list[tuple[str | None, Any, str, bool]] = [(None, source, name, is_label)]
    images += [(k, v, str(getattr(v, "name", None) or f"labels/{k}"), True) for k, v in label_srcs.items()]
    n_slabs = len(images) * sum(-(-lv.shape[0] // min(chunks[0], lv.shape[0])) for lv in plan)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove(tmp)
        root = zarr.open_group(str(tmp), mode="w", zarr_format=zarr_format)
        with tqdm(total=n_slabs, disable=not progress, desc=f"writing {out.name}", unit="slab") as bar:
            for key, src, src_name, lab in images:
                group = root if key is None else root.require_group("labels").create_group(key)
                _write_image(group, key or out.name.split(".")[0], src, src_name, plan, chunks, axes, unit, lab,
                             zarr_format, bar, under_image=key is not None)
        if label_srcs:
            root["labels"].attrs.update(labels_attrs(list(label_srcs), zarr_format))
        if not is_label:
            store_normalization(tmp)       # computed once here, in the store's attrs for every reader
        _swap_into_place(tmp, out)
    except OSError as e:          # reading the sources raises EmfmError: this is the output's disk
        _discard(tmp)
        where = f"{e.filename}: " if e.filename and Path(e.filename) not in (out, tmp) else ""
        raise EmfmError(f"cannot write {out} ({where}{e.strerror or e}); nothing was replaced") from None
    except BaseException:
        _discard(tmp)
        raise
    return out


def binarized(src: Source) -> Source:
    """0/1 uint8 view of a mask image: 1 where the value is in the upper half of its dtype's range."""
    threshold = 1 if src.dtype == bool else (np.iinfo(src.dtype).max // 2 + 1 if src.dtype.kind in "iu" else 0.5)
    return Source(src.name, src.shape, np.uint8, lambda key: (src[key] >= threshold).astype(np.uint8),
                  src.voxel_size, handle=src)


def ingest(path: str | Path, out: str | Path, *, voxel_size: Sequence[float] | None = None, unit: str = "nanometer",
           axes: str | None = None, chunks: Sequence[int] | None = None, is_label: bool = False,
           zarr_format: Literal[2, 3] = 3, overwrite: bool = False, progress: bool = True, mask: bool = False) -> Path:
    """Convert one EM file or slice folder to OME-Zarr; voxel size: given (in `unit`), else file metadata (nm),
    else 1.0 nm (warned).

    `mask=True` reads a binary mask drawn as an image (anti-aliased edges, 255 = structure) as 0/1 labels.
    """
    src = open_source(path)
    if mask:
        src, is_label = binarized(src), True
    try:
        axes = _check_axes(axes, src.ndim)
        if voxel_size is None and unit != "nanometer":
            raise EmfmError(f"unit {unit!r} applies to a given voxel size; pass the voxel size in {unit}s too")
        if voxel_size is None:
            voxel_size = src.voxel_size
            if voxel_size is None:
                log.warning("%s: no voxel size given or found in metadata; using 1.0 nm, pass --voxel-size %s", path,
                            " ".join(axes.upper()))
            else:
                log.info("%s: voxel size %s nm from file metadata", path, voxel_size)
        return write_ome_zarr(src, out, axes=axes, voxel_size=voxel_size, unit=unit, chunks=chunks, is_label=is_label,
                              zarr_format=zarr_format, overwrite=overwrite, progress=progress,
                              inputs={"input": source_path(path)})
    finally:
        src.close()
