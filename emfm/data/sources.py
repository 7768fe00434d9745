"""Lazy readers for EM data in common formats: multi-page TIFF, slice folders, HDF5, MRC, npy, and zarr /
OME-Zarr stores, local or remote (``http(s)://``, ``s3://``).

Each returns a :class:`Source`, an array-like that reads only the slices asked for, so volumes larger
than memory are never loaded whole.
"""
from __future__ import annotations

import logging
import math
import re
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from emfm.data.volume import Volume
from emfm.errors import EmfmError, first_line
from emfm.paths import is_url, location

SLICE_EXTS = (".tif", ".tiff", ".png")
MRC_EXTS = (".mrc", ".map", ".rec")
SUPPORTED = ("TIFF (.tif/.tiff, multi-page = 3-D), PNG, a folder of 2-D TIFF/PNG slices, "
             "HDF5 ('file.h5:/dataset'), MRC (.mrc/.map/.rec), NumPy (.npy), zarr / OME-Zarr (a folder or an "
             "http(s):// or s3:// URL)")
ZARR_FILES = ("zarr.json", ".zarray", ".zgroup")
_H5 = re.compile(r"^(?P<file>.+?\.(?:h5|hdf5|hdf|he5))(?::(?P<key>.*))?$", re.IGNORECASE)
_UNIT_NM = {"nm": 1.0, "nanometer": 1.0, "nanometers": 1.0, "um": 1e3, "micron": 1e3, "microns": 1e3,
            "micrometer": 1e3, "\u00b5m": 1e3, "\u03bcm": 1e3, "\\u00b5m": 1e3, "mm": 1e6,
            "a": 0.1, "\u00e5": 0.1, "angstrom": 0.1, "picometer": 1e-3, "millimeter": 1e6, "centimeter": 1e7,
            "meter": 1e9}
# PIL mode -> dtype of the grey image we deliver (colour modes are accepted only with equal channels)
_PIL_DTYPES = {"L": "u1", "1": "u1", "P": "u1", "PA": "u1", "LA": "u1", "RGB": "u1", "RGBA": "u1", "I;16": "u2",
               "I;16L": "u2", "I;16B": "u2", "I": "i4", "F": "f4"}




class Source:
    """Lazy array-like over a file: `.shape`, `.dtype`, `.voxel_size` (nm or None), numpy-style slicing.

    Built on a raw reader; singleton raw axes are squeezed away so a 1-page TIFF is a 2-D image.
    """

    def __init__(self, name: str, raw_shape: Sequence[int], dtype: Any, read_raw: Callable[[tuple], Any],
                 voxel_size: Sequence[float] | None = None, handle: Any = None) -> None:
        self.name = name
        self.dtype = np.dtype(dtype)
        self._read_raw, self._handle, self._raw_ndim = read_raw, handle, len(raw_shape)
        self._keep = [i for i, s in enumerate(raw_shape) if s != 1]
        self.shape = tuple(int(raw_shape[i]) for i in self._keep)
        sizes = list(voxel_size) if voxel_size is not None and len(voxel_size) == len(raw_shape) else []
        fits = bool(sizes) and all(sizes[i] > 0 for i in self._keep)
        self.voxel_size = tuple(float(sizes[i]) for i in self._keep) if fits else None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        raw: list[Any] = [0] * self._raw_ndim
        for i, k in zip(self._keep, _full_key(key, self.ndim)):
            raw[i] = k
        return np.asarray(self._read_raw(tuple(raw)))

    def close(self) -> None:
        """Release the file handle (TIFF, HDF5, MRC); also done on garbage collection."""
        handle, self._handle = getattr(self, "_handle", None), None
        if handle is not None:
            handle.close()

    __del__ = close

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Source({self.name!r}, shape={self.shape}, dtype={self.dtype}, voxel_size={self.voxel_size})"


def _full_key(key: Any, ndim: int) -> tuple:
    key = key if isinstance(key, tuple) else (key,)
    dots = [i for i, k in enumerate(key) if k is Ellipsis]
    if dots:
        key = key[:dots[0]] + (slice(None),) * (ndim - len(key) + 1) + key[dots[0] + 1:]
    if len(key) > ndim or not all(isinstance(k, (slice, int, np.integer)) for k in key):
        raise IndexError(f"unsupported index {key!r} for a {ndim}-D source (ints and slices only)")
    return key + (slice(None),) * (ndim - len(key))


def _stack_reader(n: int, plane_shape: tuple[int, ...], dtype: np.dtype,
                  read_plane: Callable[[int], np.ndarray]) -> Callable[[tuple[Any, ...]], np.ndarray]:
    """Raw reader for a stack of 2-D planes read one at a time (TIFF pages, slice files)."""
    cache: dict[int, np.ndarray] = {}   # last plane only: 2-D images are sliced many times

    def plane(i: int, rest: tuple) -> np.ndarray:
        if i not in cache:
            cache.clear()
            cache[i] = read_plane(i)
        return cache[i][rest]

    def read(key: tuple) -> np.ndarray:
        first, rest = key[0], key[1:]
        if isinstance(first, slice):
            idx = range(*first.indices(n))
            if not idx:
                return np.empty((0,) + np.empty(plane_shape, dtype)[rest].shape, dtype)
            return np.stack([plane(i, rest) for i in idx])
        i = int(first) + n if first < 0 else int(first)
        if not 0 <= i < n:
            raise IndexError(f"index {first} out of range for {n} planes")
        return plane(i, rest)

    return read


def _grey(a: np.ndarray, name: str) -> np.ndarray:
    """Accept grey, grey+alpha, and RGB(A) whose colour channels are equal; refuse real colour."""
    if a.ndim == 3 and a.shape[-1] in (2, 3, 4):
        if a.shape[-1] >= 3 and not (np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])):
            raise EmfmError(f"{name}: colour image with differing channels; single-channel (grey) expected")
        a = a[..., 0]
    if a.ndim != 2:
        raise EmfmError(f"{name}: shape {a.shape}; a single-channel 2-D slice expected")
    a = a.astype(np.uint8) if a.dtype == bool else a
    return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))


def _tiff_layout(tif: Any, name: str) -> tuple[tuple, tuple, np.dtype]:
    """(leading shape, plane shape, dtype) of the first series; RGB(A) samples are checked per plane later."""
    s = tif.series[0]
    axes, shape = s.axes, tuple(s.shape)
    if "S" in axes and shape[axes.index("S")] > 1:
        if not axes.endswith("S"):
            raise EmfmError(f"{name}: {shape[axes.index('S')]} samples per pixel; single-channel expected")
        axes, shape = axes[:-1], shape[:-1]
    if "C" in axes and shape[axes.index("C")] > 1:
        raise EmfmError(f"{name}: {shape[axes.index('C')]} channels; single-channel expected")
    return shape[:-2], shape[-2:], np.dtype("u1" if s.dtype == bool else s.dtype)


def _imagej_voxel_size(tif: Any) -> tuple[float, float, float] | None:
    """(z, y, x) in nm from ImageJ metadata (unit, spacing, X/YResolution), else None."""
    ij = tif.imagej_metadata or {}
    scale = _UNIT_NM.get(str(ij.get("unit", "")).strip().lower())
    tags = tif.pages[0].tags
    if scale is None or "XResolution" not in tags or "YResolution" not in tags:
        return None
    (xn, xd), (yn, yd) = tags["XResolution"].value, tags["YResolution"].value
    if not (xn and yn):
        return None
    [spacing] = _numbers(ij.get("spacing", 0.0), f"{tif.filehandle.path}: ImageJ metadata spacing")
    return (spacing * scale, scale * yd / yn, scale * xd / xn)


def _numbers(values: Any, where: str) -> list[float]:
    """A voxel size from a file's metadata as numbers; anything else is refused, never taken for 1."""
    try:
        return [float(v) for v in np.ravel(values)]
    except (TypeError, ValueError):
        raise EmfmError(f"{where} is {values!r}: expected the voxel size as numbers") from None


def _open_tiff(path: Path) -> Source:
    import tifffile
    try:
        with _quiet("tifffile"):     # its warnings on a damaged file would precede our one-line error
            tif = tifffile.TiffFile(path)
            cut = _cut_short(tif)
    except Exception as e:
        raise EmfmError(f"{path}: cannot read as TIFF ({first_line(e)})") from None
    if cut:
        tif.close()
        raise EmfmError(f"{path}: truncated at {path.stat().st_size} bytes: {cut} (an interrupted copy or download?)")
    try:
        lead, plane_shape, dtype = _tiff_layout(tif, str(path))
    except EmfmError:
        tif.close()
        raise
    n = math.prod(lead)
    if sum(s > 1 for s in lead) > 1:
        tif.close()
        raise EmfmError(f"{path}: {len(lead) + 2}-D TIFF {lead + plane_shape}; a 2-D or 3-D single-channel image "
                        f"expected")
    if len(tif.series[0].pages) != n:   # e.g. >4 GB ImageJ stack with a single IFD: needs contiguous memmap
        tif.close()
        try:
            return _array_source(str(path), tifffile.memmap(path, mode="r"))
        except Exception:
            raise EmfmError(f"{path}: pages do not match the series shape; cannot read lazily") from None

    def read_plane(i: int) -> np.ndarray:
        try:
            page = tif.asarray(key=i, series=0)
        except Exception as err:  # each codec raises its own type for damaged data
            raise EmfmError(f"{path} page {i}: cannot decode the image data ({type(err).__name__}: "
                            f"{first_line(err)})") from None
        return _grey(page, f"{path} page {i}")

    return Source(str(path), (n,) + plane_shape, dtype, _stack_reader(n, plane_shape, dtype, read_plane),
                  _imagej_voxel_size(tif), handle=tif)


@contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Silence a library's log for a moment (tifffile logs damage as errors, then raises or not)."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _cut_short(tif: Any) -> str | None:
    """How a TIFF is cut short, else None: the chain of page headers (IFDs) or the pages' data run past the end of
    the file, or it has fewer pages than its metadata (ImageJ, OME, tifffile's shape) declares. tifffile reads
    such a file without a word as the pages it finds, a 16-slice stack as one image."""
    size, series = tif.filehandle.size, tif.series[0]
    pages = [page for page in tif.pages if page is not None]        # the whole chain, to where it ends or breaks
    whole = sum(all(o + c <= size for o, c in zip(page.dataoffsets, page.databytecounts)) for page in pages)
    planes = math.prod(n for n, axis in zip(series.shape, series.axes) if axis not in "YXS")
    from_pages = series.kind in ("generic", "uniform")      # tifffile's series of the pages found, not of metadata
    declared = max(0 if from_pages else planes, int((tif.imagej_metadata or {}).get("images", 0)))
    # One block of data may hold many planes behind one page header (ImageJ hyperstacks, tifffile's shaped files).
    contiguous = series.dataoffset is not None
    if not (whole < len(pages) or _next_page(tif, pages[-1]) != 0
            or (contiguous and series.dataoffset + series.nbytes > size)
            or (not contiguous and len(pages) < declared)):
        return None
    if declared > whole:
        return f"{whole} of {declared} pages found"
    return f"{whole} whole page{'s' if whole != 1 else ''} found, the rest lies past its end"


def _next_page(tif: Any, page: Any) -> int:
    """Where the page header after ``page``'s starts, as the file says (0: none, the last page; -1: cut off)."""
    fh, tiff = tif.filehandle, tif.tiff
    try:
        fh.seek(page.offset)
        tags = struct.unpack(tiff.tagnoformat, fh.read(tiff.tagnosize))[0]
        fh.seek(page.offset + tiff.tagnosize + tags * tiff.tagsize)
        return int(struct.unpack(tiff.offsetformat, fh.read(tiff.offsetsize))[0])
    except struct.error:
        return -1


def _slice_header(f: Path) -> tuple[tuple[int, int], np.dtype]:
    """Shape and dtype of a 2-D slice file, from its header only."""
    try:
        if f.suffix.lower() == ".png":
            from PIL import Image
            with Image.open(f) as im:
                if im.mode not in _PIL_DTYPES:
                    raise EmfmError(f"{f}: PNG mode {im.mode!r}; single-channel grey expected")
                return (im.size[1], im.size[0]), np.dtype(_PIL_DTYPES[im.mode])
        import tifffile
        with tifffile.TiffFile(f) as tif:
            lead, plane, dtype = _tiff_layout(tif, str(f))
    except EmfmError:
        raise
    except Exception as e:
        raise EmfmError(f"{f}: cannot read image header ({e})") from None
    if math.prod(lead) != 1:
        raise EmfmError(f"{f}: {math.prod(lead)} pages; a folder must hold 2-D slices")
    return plane, dtype


def _read_slice(f: Path) -> np.ndarray:
    if f.suffix.lower() == ".png":
        from PIL import Image
        with Image.open(f) as im:
            return _grey(np.asarray(im.convert("RGBA") if im.mode in ("P", "PA") else im), str(f))
    import tifffile
    return _grey(tifffile.imread(f), str(f))


def _open_folder(path: Path) -> Source:
    from natsort import natsorted
    files = natsorted((f for f in path.iterdir() if f.suffix.lower() in SLICE_EXTS and not f.name.startswith(".")),
                      key=lambda f: f.name)
    if not files:
        raise EmfmError(f"{path}: folder holds no {'/'.join(SLICE_EXTS)} slices")
    shape, dtype = _slice_header(files[0])
    for f in files[1:]:
        s, d = _slice_header(f)
        if (s, d) != (shape, dtype):
            raise EmfmError(f"{f}: slice shape {s} {d} differs from the first slice {files[0].name}: {shape} {dtype}")
    return Source(str(path), (len(files),) + shape, dtype,
                  _stack_reader(len(files), shape, dtype, lambda i: _read_slice(files[i])))


def _array_source(name: str, arr: Any, voxel_size: Sequence[float] | None = None, handle: Any = None) -> Source:
    return Source(name, tuple(arr.shape), arr.dtype, lambda key: arr[key], voxel_size, handle)


def _open_h5(file: Path, key: str | None) -> Source:
    import h5py
    try:
        h5 = h5py.File(file, "r")
    except OSError as e:
        raise EmfmError(f"{file}: cannot open as HDF5 ({e})") from None
    names: list[str] = []
    h5.visititems(lambda n, o: names.append("/" + n) if isinstance(o, h5py.Dataset) else None)
    if not key and len(names) == 1:
        key = names[0]
    ds = h5.get(key) if key else None
    if not isinstance(ds, h5py.Dataset):
        h5.close()
        raise EmfmError(f"{file}: no dataset {key!r}; give 'file.h5:/path', datasets: "
                        f"{', '.join(names[:20]) or 'none'}")
    vs = None
    try:
        if "element_size_um" in ds.attrs:   # Fiji / ilastik convention, zyx in micrometres
            vs = [1e3 * v for v in _numbers(ds.attrs["element_size_um"], f"{file}:{ds.name} attribute element_size_um")]
        elif "resolution" in ds.attrs:      # CREMI convention, zyx in nm
            vs = _numbers(ds.attrs["resolution"], f"{file}:{ds.name} attribute resolution")
    except EmfmError:
        h5.close()
        raise
    return _array_source(f"{file}:{ds.name}", ds, vs, handle=h5)


def _open_mrc(path: Path) -> Source:
    import mrcfile
    try:
        mrc = mrcfile.mmap(path, mode="r", permissive=True)
        data = mrc.data
        if data is None:
            raise ValueError("no data block")
    except Exception as e:
        raise EmfmError(f"{path}: cannot read as MRC ({e})") from None
    z, y, x = (float(v) / 10.0 for v in (mrc.voxel_size.z, mrc.voxel_size.y, mrc.voxel_size.x))   # Å -> nm
    return _array_source(str(path), data, (z, y, x)[-data.ndim:], handle=mrc)


def _open_zarr(path: str | Path) -> Source:
    """A zarr array or an OME-Zarr image's full-resolution level, local or remote, read chunk by chunk; its voxel
    size converted to nm where the axes name their units."""
    volume = Volume(path)
    nm = [_UNIT_NM.get(u.lower()) if u else None for u in volume.units]
    known = volume.voxel_size is not None and all(f is not None for f in nm)
    voxel_size = [v * f for v, f in zip(volume.voxel_size or (), nm) if f is not None] if known else None
    return Source(str(volume.path), volume.shape, volume.dtype, volume.read, voxel_size)


def source_path(path: str | Path) -> str | Path:
    """The file, folder or URL an input names (``file.h5:/dataset`` -> ``file.h5``)."""
    if is_url(str(path)):
        return location(str(path))
    h5 = _H5.match(str(path))
    return Path(h5["file"] if h5 else path)


def open_source(path: str | Path) -> Source:
    """Open an EM image/volume lazily; errors explain what was expected."""
    text = str(path)
    h5 = _H5.match(text)
    p = Path(h5["file"] if h5 else text)
    ext = p.suffix.lower()
    if is_url(text):
        src = _open_zarr(text)
    elif not p.exists():
        raise EmfmError(f"{p}: no such file or folder")
    elif h5:
        src = _open_h5(p, h5["key"])
    elif p.is_dir() and any((p / name).is_file() for name in ZARR_FILES):
        src = _open_zarr(p)
    elif p.is_dir():
        src = _open_folder(p)
    elif ext in (".tif", ".tiff"):
        src = _open_tiff(p)
    elif ext == ".png":
        shape, dtype = _slice_header(p)
        src = Source(str(p), (1,) + shape, dtype, _stack_reader(1, shape, dtype, lambda i: _read_slice(p)))
    elif ext in MRC_EXTS:
        src = _open_mrc(p)
    elif ext == ".npy":
        try:
            src = _array_source(str(p), np.load(p, mmap_mode="r", allow_pickle=False))
        except ValueError as e:
            raise EmfmError(f"{p}: cannot memory-map .npy ({e})") from None
    else:
        raise EmfmError(f"{p}: unsupported input {ext or '(no extension)'!r}; supported: {SUPPORTED}")
    if src.ndim not in (2, 3) or (src.ndim == 3 and src.shape[-1] <= 4):
        src.close()
        raise EmfmError(f"{text}: shape {src.shape}; a single-channel 2-D or 3-D image expected")
    return src
