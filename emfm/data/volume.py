"""Lazy, picklable reader for one EM volume in zarr (v2/v3) or OME-Zarr (0.4/0.5), at any pyramid level.

Only metadata is read on construction and the zarr handle is reopened in each process, so a Volume
can be handed to DataLoader workers cheaply. A volume is a local path or the URL of a remote store
(``http(s)://``, ``s3://``, through fsspec), read chunk by chunk as regions are asked for. Intensity
percentiles are computed once per volume, so training and inference normalise identically: ``emfm
ingest`` stores them in the attrs of the store it writes; for any other input they are kept in
emfm's cache folder (:func:`emfm.paths.cache_dir`), keyed by the input's path or URL and metadata
files -- a job never writes into its input.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, cast

import numpy as np
import zarr
from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from emfm.errors import EmfmError, first_line
from emfm.paths import URL_SCHEMES, cache_dir, is_url, join, location, read_cache, resolved, write_cache

log = logging.getLogger(__name__)

NORM_PERCENTILES = (1.0, 99.5)
NORM_MIN_VOXELS = 1_000_000      # use the coarsest level that still has this many voxels
NORM_SAMPLE_VOXELS = 2_000_000   # upper bound (in whole chunks) on what is read to estimate percentiles
NORM_SEED = 0                    # fixed: the same volume always gets the same normalisation
SPATIAL = "zyx"
METADATA_FILES = ("zarr.json", ".zarray", ".zgroup", ".zattrs")
# What a read does where chunks are absent from a store (zarr reads them as the fill value): a store that holds
# every chunk lost them (an interrupted copy), but many writers leave out the chunks that hold only the fill value.
MISSING_CHUNKS = ("warn", "error", "fill")
_REPORTED: set[str] = set()      # the arrays whose absent chunks this process has warned about


def check_missing_chunks(value: Any, key: str = "missing_chunks") -> str:
    """``value`` as one of MISSING_CHUNKS, or a one-line error naming ``key``."""
    if value not in MISSING_CHUNKS:
        raise EmfmError(f"{key}={value}: expected warn (read absent chunks as the fill value, saying so once), "
                        f"error (refuse them) or fill (read them so without a word)")
    return str(value)


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for a remote store: S3 is read anonymously (public data) unless fsspec's own configuration
    says otherwise, e.g. ``FSSPEC_S3='{"anon": false}'`` to use the usual AWS credentials."""
    if url.startswith("s3://"):
        import fsspec.config

        if "anon" not in fsspec.config.conf.get("s3", {}):
            return {"anon": True}
    return {}


class _Misses(WrapperStore[Store]):
    """A store that counts the keys zarr asked for and did not find: a read's absent chunks (which zarr reads as
    the fill value) are known without asking the store again."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.count, self.last = 0, ""

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        found = await self._store.get(key, prototype, byte_range)
        if found is None:
            self.count, self.last = self.count + 1, key
        return found


def _open_node(path: str | Path, array: bool = False) -> Any:
    """The zarr group or array at a local path or URL (``array``: an array only), read-only, through a store
    that counts the chunks it does not find (:class:`_Misses`)."""
    opener = zarr.open_array if array else zarr.open
    if not is_url(str(path)):
        if not Path(path).exists():
            raise EmfmError(f"{path}: no such file or folder")       # as `emfm ingest` says it
        try:
            return opener(store=_Misses(LocalStore(path, read_only=True)), mode="r")
        except (FileNotFoundError, KeyError, ValueError, zarr.errors.BaseZarrError):
            raise EmfmError(f"{path}: no zarr array or OME-Zarr image found") from None
    url = str(path)
    scheme = url.split("://")[0].lower()
    if scheme not in URL_SCHEMES:
        raise EmfmError(f"{url}: unsupported URL scheme; emfm reads {', '.join(s + '://' for s in URL_SCHEMES)} "
                        f"stores and local paths")
    try:
        _probe(url)
        return opener(store=_Misses(FsspecStore.from_url(url, storage_options(url), read_only=True)), mode="r")
    except ImportError as e:
        raise EmfmError(f"{url}: reading {scheme}:// stores needs {e.name or 'fsspec'}: "
                        f"pip install 'emfm[remote]'") from None
    except (FileNotFoundError, KeyError, ValueError, zarr.errors.BaseZarrError):
        raise EmfmError(f"{url}: no zarr array or OME-Zarr image found (no zarr metadata at that URL)") from None
    except Exception as e:       # unreachable host, refused access, timeouts: each library has its own types
        raise EmfmError(f"{url}: cannot read ({type(e).__name__}: {first_line(e)})") from None


def _probe(url: str) -> None:
    """Reach the store with one request before zarr sends several at once: a failure (host, network, access)
    then comes from that one request alone (several failing together leave noise from the S3 client behind)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **storage_options(url))
    with contextlib.suppress(FileNotFoundError):            # a zarr v2 store, or no store: zarr says which
        fs.cat_file(f"{root}/zarr.json")


def _malformed(path: str | Path, key: str, value: Any, expected: str) -> EmfmError:
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    return EmfmError(f"{path}: malformed attributes: {key} is {shown}, expected {expected}")


def _mapping(value: Any, path: str | Path, key: str) -> dict[str, Any]:
    """An attribute that must be a JSON object (absent: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _malformed(path, key, value, "an object")
    return value


def _objects(value: Any, path: str | Path, key: str) -> list[dict[str, Any]]:
    """An attribute that must be a list of JSON objects (absent: empty)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise _malformed(path, key, value, "a list of objects")
    return value


def _axes(value: Any, path: str | Path) -> tuple[list[str], list[str | None], list[str | None]]:
    """(names, types, units) of OME axes: objects with a ``name`` (0.4+), or plain names (0.3)."""
    if not isinstance(value, list) or not all(isinstance(a, str) or isinstance(a, dict) and isinstance(
            a.get("name"), str) for a in value):
        raise _malformed(path, "multiscales[0].axes", value, "a list of axes, each an object with a 'name'")
    fields = [a if isinstance(a, dict) else {"name": a} for a in value]
    units = [a.get("unit") if isinstance(a.get("unit"), str) else None for a in fields]
    return [a["name"] for a in fields], [a.get("type") for a in fields], units


def _scale(transforms: Any, n: int, path: str | Path, key: str) -> list[float]:
    """The scale of a list of OME coordinate transformations (1 per axis if it has none); a scale that is not
    one positive number per axis is refused, never read as 1."""
    for t in _objects(transforms, path, key):
        if t.get("type") == "scale":
            scale = t.get("scale")
            if not (isinstance(scale, list) and len(scale) == n and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in scale)):
                raise _malformed(path, f"{key} scale", scale, f"{n} positive numbers")
            return [float(v) for v in scale]
    return [1.0] * n


class Volume:
    """Lazy reader of one EM volume in zarr (v2, v3, OME-Zarr 0.4/0.5, any multiscale level).

    ``missing_chunks`` (MISSING_CHUNKS): what a read does where chunks are absent. Stores emfm wrote leave out
    chunks that hold only the fill value, as zarr does by default, so theirs are not looked at, except where
    ``emfm ingest`` marked its store as holding every chunk.
    """

    def __init__(self, path: str | Path, level: int = 0, missing_chunks: str = "warn") -> None:
        self.path, self.level = location(path), int(level)
        self.missing_chunks = check_missing_chunks(missing_chunks)
        node = _open_node(self.path)
        attrs = dict(node.attrs)
        ome = _mapping(attrs.get("ome"), self.path, "ome")
        emfm = _mapping(attrs.get("emfm"), self.path, "emfm")
        names: list[str]
        types: list[str | None]
        units: list[str | None]
        scale: list[float] | None = None
        if isinstance(node, zarr.Array):
            self._level_paths = [str(self.path)]
            given = node.metadata.dimension_names if node.metadata.zarr_format == 3 else None
            names = [str(n) for n in given] if given and all(given) else _default_names(node.ndim)
            types = units = [None] * node.ndim
        else:
            found = _objects(ome.get("multiscales") or attrs.get("multiscales"), self.path, "multiscales")
            if not found:
                inside = _members(node)
                holding = "" if inside is None else f", holding: {', '.join(inside[:10]) or 'nothing'}"
                raise EmfmError(f"{self.path}: no zarr array or OME-Zarr image found (group without "
                                f"multiscales{holding})")
            ms, datasets = found[0], _objects(found[0].get("datasets"), self.path, "multiscales[0].datasets")
            if not datasets or not all(isinstance(d.get("path"), str) for d in datasets):
                raise EmfmError(f"{self.path}: malformed OME multiscales: each dataset needs a 'path'")
            self._level_paths = [str(join(self.path, d["path"])) for d in datasets]
            if not 0 <= self.level < len(datasets):
                raise EmfmError(f"{self.path}: level {level} not available; levels: "
                                f"{', '.join(map(str, range(len(datasets))))}")
            node = _open_node(self._level_paths[self.level], array=True)
            names, types, units = _axes(ms.get("axes") or _default_names(node.ndim), self.path)
            top = _scale(ms.get("coordinateTransformations"), len(names), self.path,
                         "multiscales[0].coordinateTransformations")
            own = _scale(datasets[self.level].get("coordinateTransformations"), len(names), self.path,
                         f"multiscales[0].datasets[{self.level}].coordinateTransformations")
            scale = [a * b for a, b in zip(own, top)]
        if not 0 <= self.level < len(self._level_paths):
            raise EmfmError(f"{self.path}: level {level} not available; levels: 0")
        if len(names) != node.ndim:
            raise EmfmError(f"{self.path}: {len(names)} axes in metadata but the array is {node.ndim}-D")
        self._keep: list[int] = []
        for i, (n, t, s) in enumerate(zip(names, types, node.shape)):
            if t == "space" or (t is None and n in SPATIAL):
                self._keep.append(i)
            elif s != 1:
                raise EmfmError(f"{self.path}: non-singleton {n!r} axis of size {s}; single-channel expected")
        if len(self._keep) not in (2, 3):
            raise EmfmError(f"{self.path}: {len(self._keep)} spatial axes {tuple(node.shape)}; 2-D or 3-D expected")
        self._raw_ndim = node.ndim
        self.axes = "".join(str(names[i]) for i in self._keep)
        self.shape = tuple(int(node.shape[i]) for i in self._keep)
        self.chunks = tuple(int(node.chunks[i]) for i in self._keep)
        self.dtype = np.dtype(node.dtype)
        self.voxel_size = None if scale is None else tuple(scale[i] for i in self._keep)
        self.units = tuple(units[i] for i in self._keep)     # of the spatial axes; None where the input names none
        self.levels = len(self._level_paths)
        self.is_label = emfm.get("kind") == "labels" or "image-label" in attrs or "image-label" in ome
        self._checks_chunks = missing_chunks != "fill" and (not emfm or emfm.get("every_chunk") is True)
        self._norm: tuple[float, float] | None = None
        self._array: Any = node   # dropped when pickled or forked; reopened lazily
        self._pid = os.getpid()

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def _arr(self) -> Any:
        if self._array is None or self._pid != os.getpid():
            self._array, self._pid = _open_node(self._level_paths[self.level], array=True), os.getpid()
        return self._array

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}

    def _key(self, region: Any) -> tuple:
        region = region if isinstance(region, tuple) else (region,)
        if len(region) > self.ndim:
            raise IndexError(f"{self.path}: {len(region)} indices for a {self.ndim}-D volume")
        region = region + (slice(None),) * (self.ndim - len(region))
        key: list[Any] = [0] * self._raw_ndim
        for i, r in zip(self._keep, region):
            key[i] = r
        return tuple(key)

    def _read_raw(self, region: Any) -> np.ndarray:
        arr = self._arr
        misses = cast(_Misses, arr.store)
        before = misses.count
        try:
            data = np.asarray(arr[self._key(region)])
        except (IndexError, EmfmError):
            raise
        except Exception as e:
            raise self._unreadable(region, e) from None
        if self._checks_chunks and misses.count > before:
            self._absent(region, misses.count - before, misses.last)
        return data

    def _chunk_name(self, key: str) -> str:
        """A chunk's key in the array as a path in the store (``0/1/1/1``: level ``0``, chunk ``1/1/1``)."""
        level = str(self._level_paths[self.level])[len(str(self.path)):].strip("/")
        return f"{level}/{key}" if level else key

    def _unreadable(self, region: Any, error: Exception) -> EmfmError:
        """The one-line error of a failed read. On disk it names the first chunk of ``region`` that fails on its
        own (looked for only now: reads that succeed pay nothing); from a remote store, where the connection may
        be what failed, the region."""
        arr = self._arr
        if not isinstance(self.path, str):
            spans = []
            for k, n, c in zip(self._key(region), arr.shape, arr.chunks):
                start, stop, _ = k.indices(n) if isinstance(k, slice) else (int(k) % n, int(k) % n + 1, 1)
                spans.append(range(start // c, -(-stop // c)))
            for block in itertools.product(*spans):
                try:
                    arr.get_block_selection(block)
                except Exception as e:
                    chunk = self._chunk_name(arr.metadata.encode_chunk_key(block))
                    return EmfmError(f"{self.path}: chunk {chunk} cannot be read ({type(e).__name__}: "
                                     f"{first_line(e)}): a damaged or incomplete copy? Copy the store again")
        return EmfmError(f"{self.path}: cannot read region {_span(region)} ({type(error).__name__}: "
                         f"{first_line(error)})")

    def _absent(self, region: Any, count: int, key: str) -> None:
        """Chunks of ``region`` absent from a store that should hold them all: refused (missing_chunks=error) or
        said once per array and process."""
        where = (f"{self.path}: {count} chunk{'s' if count > 1 else ''} of region {_span(region)} "
                 f"{'are' if count > 1 else 'is'} missing from the store (e.g. {self._chunk_name(key)})")
        fill = self._arr.fill_value
        if self.missing_chunks == "error":
            raise EmfmError(f"{where}: an incomplete copy? Copy the store again, or set missing_chunks=warn to read "
                            f"absent chunks as the fill value {fill}")
        array = str(self._level_paths[self.level])
        if array not in _REPORTED:
            _REPORTED.add(array)
            log.warning("%s; read as the fill value %s: an incomplete copy? (said once; missing_chunks=error "
                        "refuses such reads, missing_chunks=fill reads them silently)", where, fill)

    def read(self, region: tuple[slice | int, ...] = ()) -> np.ndarray:
        """Numpy array of `region` (slices over the spatial axes), native dtype; NaN/Inf refused."""
        data = self._read_raw(region)
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            raise EmfmError(f"{self.path}: NaN/Inf values in region {_span(region)}")
        return data

    __getitem__ = read

    def normalization(self) -> tuple[float, float]:
        """(lo, hi) intensity percentiles NORM_PERCENTILES: stored by ingest in the attrs, else cached in emfm's
        cache folder, else computed (and cached there; never in the input)."""
        if self.is_label:
            raise EmfmError(f"{self.path}: label volume; intensity normalization does not apply")
        if self._norm is None:
            self._norm = self._find_normalization()
        return self._norm

    def _find_normalization(self) -> tuple[float, float]:
        """From the attrs (ingest's output), else from the cache folder, else computed and cached there."""
        emfm = dict(_open_node(self.path).attrs).get("emfm")
        stored = _checked(emfm.get("normalization") if isinstance(emfm, dict) else None,
                          f"{self.path}: attribute emfm.normalization.values",
                          "fix it, or delete emfm.normalization to have it recomputed")
        if stored is not None:
            return stored
        cache = self._cache_file()
        cached = _checked(read_cache(cache), f"{cache}: values", "delete the file to have it recomputed")
        if cached is not None:
            return cached
        values = compute_normalization(self)
        write_cache(cache, {"input": resolved(self.path), "percentiles": list(NORM_PERCENTILES),
                             "values": list(values)})
        return values

    def _cache_file(self) -> Path:
        """The cache file of this input's normalisation: named by its resolved path (or URL) and the bytes (and, on
        disk, modification times) of its metadata files, the store's and every level's, so a rewritten store is
        measured afresh."""
        identity: list[Any] = [resolved(self.path)]
        if isinstance(self.path, str):
            identity += [[url, hashlib.sha256(data).hexdigest()] for url, data in self._remote_metadata()]
        else:
            for folder in dict.fromkeys([self.path, *map(Path, self._level_paths)]):
                for name in METADATA_FILES:
                    file = folder / name
                    if file.is_file():
                        identity.append([str(file), file.stat().st_mtime_ns,
                                         hashlib.sha256(file.read_bytes()).hexdigest()])
        key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()
        return cache_dir() / "normalization" / f"{key}.json"

    def _remote_metadata(self) -> list[tuple[str, bytes]]:
        """(URL, bytes) of the remote store's metadata files that exist, fetched together."""
        import fsspec

        url = str(self.path)
        urls = [str(join(folder, name)) for folder in dict.fromkeys([url, *self._level_paths])
                for name in METADATA_FILES]
        try:
            fs, root = fsspec.core.url_to_fs(url, **storage_options(url))
            found = fs.cat([root + u[len(url):] for u in urls], on_error="omit")
        except Exception as e:
            raise EmfmError(f"{url}: cannot read its metadata files ({type(e).__name__}: {first_line(e)})") from None
        return [(u, found[root + u[len(url):]]) for u in urls if root + u[len(url):] in found]

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """float32 (x - lo) / (hi - lo); not clipped, so saturated voxels stay distinguishable."""
        lo, hi = self.normalization()
        return ((np.asarray(x, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo)).astype(np.float32)

    def __repr__(self) -> str:
        return (f"Volume({str(self.path)!r}, level={self.level}, shape={self.shape}, dtype={self.dtype}, "
                f"axes={self.axes!r}, voxel_size={self.voxel_size})")


def _members(group: Any) -> list[str] | None:
    """The names in a group; None where its store cannot list them (an HTTP server without folder pages)."""
    try:
        return sorted(group.keys())
    except Exception:
        return None


def _span(region: Any) -> str:
    """A region as a user writes one: ``[0:8, 32:64, 5]`` (``[:]``: all of it)."""
    parts = region if isinstance(region, tuple) else (region,)
    text = [f"{'' if r.start is None else r.start}:{'' if r.stop is None else r.stop}" if isinstance(r, slice)
            else str(r) for r in parts]
    return f"[{', '.join(text) or ':'}]"


def _default_names(ndim: int) -> list[str]:
    return [f"dim{i}" for i in range(max(ndim - 3, 0))] + list(SPATIAL[-min(ndim, 3):])


def compute_normalization(vol: Volume) -> tuple[float, float]:
    """Percentiles of a seeded random sample of whole chunks from a coarse-but-not-tiny level: cheap, stable."""
    pick = vol
    for k in reversed(range(vol.levels)):
        cand = vol if k == vol.level else Volume(vol.path, k, vol.missing_chunks)
        if math.prod(cand.shape) >= NORM_MIN_VOXELS or k == 0:
            pick = cand
            break
    sample = _sample_chunks(pick)
    if sample.dtype.kind == "f" and not np.isfinite(sample).all():
        raise EmfmError(f"{vol.path}: NaN/Inf values in the volume; cannot compute intensity normalization")
    lo, hi = (float(v) for v in np.percentile(sample, NORM_PERCENTILES))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _sample_chunks(vol: Volume) -> np.ndarray:
    if math.prod(vol.shape) <= NORM_SAMPLE_VOXELS:
        return vol._read_raw(()).ravel()
    grid = tuple(-(-s // c) for s, c in zip(vol.shape, vol.chunks))
    n = max(1, min(math.prod(grid), NORM_SAMPLE_VOXELS // math.prod(vol.chunks)))
    picks = np.random.default_rng(NORM_SEED).choice(math.prod(grid), size=n, replace=False)
    parts = []
    for idx in picks:
        pos = np.unravel_index(int(idx), grid)
        parts.append(vol._read_raw(tuple(slice(p * c, (p + 1) * c) for p, c in zip(pos, vol.chunks))).ravel())
    return np.concatenate(parts)


def _checked(cached: Any, where: str, remedy: str) -> tuple[float, float] | None:
    """The (lo, hi) of a stored normalisation of NORM_PERCENTILES, checked: equal or non-numeric values would
    train on NaN. None if none is stored, or one for other percentiles (then it is computed afresh)."""
    if not isinstance(cached, dict) or cached.get("percentiles") != list(NORM_PERCENTILES):
        return None
    values = cached.get("values")
    if not (isinstance(values, list) and len(values) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
            and values[0] < values[1]):
        raise EmfmError(f"{where} is {values!r}; expected two finite numbers low < high (the "
                        f"{list(NORM_PERCENTILES)} intensity percentiles); {remedy}")
    return float(values[0]), float(values[1])


def store_normalization(path: Path) -> None:
    """Compute the normalisation of an image store emfm is writing (ingest's output) into its own attrs, where
    every reader finds it. Never called on an input."""
    values = compute_normalization(Volume(path))
    node = zarr.open(str(path), mode="r+")
    stored = node.attrs.get("emfm")
    node.attrs["emfm"] = {**(stored if isinstance(stored, dict) else {}),
                          "normalization": {"percentiles": list(NORM_PERCENTILES), "values": list(values)}}
