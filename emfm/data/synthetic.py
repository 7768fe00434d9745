"""Procedural 3-D EM-like volumes with ground truth, for tests, the demo and benchmarks.

The tissue model is simple but looks like serial-section TEM / FIB-SEM of neuropil: cells are a
Voronoi tessellation of Poisson-disk seeds, bent by a smooth random warp so that profiles are
rounded rather than polygonal, with dark membranes on their boundaries. Some cells hold elongated
mitochondria with cristae-like stripes, some hold a cluster of small vesicles, and the image is
blurred and made noisy like a micrograph. Geometry lives in physical "tissue" coordinates (z
scaled by the anisotropy), so thicker z voxels make structures change faster along z.
Everything is vectorised; Python loops only run over z-slabs, cells and vesicles.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage
from scipy.spatial import cKDTree

from emfm.data.ingest import is_image_store, write_ome_zarr
from emfm.errors import EmfmError
from emfm.paths import refuse_foreign

# Intensities before texture, blur, noise and contrast stretch (EM convention: membranes dark).
_CYTOPLASM = 0.68
_MEMBRANE = 0.12
_MITO_MATRIX = 0.38
_MITO_DARK = 0.16  # outer membrane and cristae
_VESICLE_SHELL = 0.15
_XY_NM = 8.0  # nominal lateral voxel size
_MIN_CELL_VOXELS = 20  # smaller slivers (at volume corners) become membrane
SOFTWARE = "emfm synth"  # the Software tag of the TIFFs written here: what marks them as emfm's

_Box = tuple[slice, slice, slice]


@dataclass
class SyntheticEM:
    """A synthetic EM volume and its ground truth, all arrays (Z, Y, X)."""

    raw: np.ndarray  # uint8 EM-like intensities
    membranes: np.ndarray  # uint8 in {0, 1}
    mitochondria: np.ndarray  # uint8 in {0, 1}
    instances: np.ndarray  # uint32, one id per cell (1..n), 0 exactly on membranes
    voxel_size: tuple[float, float, float]  # (z, y, x) nanometres


def make_synthetic_em(
    shape: tuple[int, int, int] = (32, 128, 128),
    *,
    cell_size: float = 40.0,
    anisotropy: float = 1.0,
    membrane_width: float = 2.0,
    mito_fraction: float = 0.3,
    vesicles_per_cell: float = 4.0,
    noise: float = 0.08,
    blur: float = 0.8,
    seed: int = 0,
) -> SyntheticEM:
    """Generate a deterministic EM-like volume with membrane, mitochondria and cell labels.

    Args:
        shape: (Z, Y, X) voxels; always 3-D (take a slice for 2-D).
        cell_size: typical cell diameter in xy pixels.
        anisotropy: z voxel thickness relative to xy (> 1: structures change faster along z).
        membrane_width: membrane thickness in xy pixels.
        mito_fraction: fraction of cells that get one or two mitochondria.
        vesicles_per_cell: mean number of vesicles per cell; a quarter of the cells get a cluster.
        noise: Gaussian noise std, relative to the 0..1 intensity scale before contrast stretch.
        blur: Gaussian blur sigma in xy pixels (physical, so z gets blur / anisotropy).
        seed: seed of the only random generator used.

    Returns:
        The raw volume with its ground truth.

    Raises:
        EmfmError: if the shape is not 3 positive ints or a parameter is out of range.
    """
    _validate(shape, cell_size, anisotropy, membrane_width, mito_fraction, vesicles_per_cell, noise, blur)
    z, y, x = (int(s) for s in shape)
    shape = (z, y, x)
    rng = np.random.default_rng(seed)
    scale = np.array([anisotropy, 1.0, 1.0])
    seeds = _poisson_disk(np.array(shape) * scale, cell_size, rng)
    warp = np.stack([_smooth_noise(shape, cell_size / scale, rng) for _ in range(3)], axis=-1)
    warp *= 0.15 * cell_size

    # Membranes where the two nearest seeds are almost equally far, plus every voxel facing
    # another cell, so that membranes always separate cells.
    gap, nearest = _voronoi(seeds, warp, scale)
    membranes = (gap < membrane_width) | _label_edges(nearest)
    instances, _ = ndimage.label(~membranes)  # 6-connected, so each id is one component
    keep = np.bincount(instances.ravel()) >= _MIN_CELL_VOXELS
    keep[0] = False
    membranes |= ~keep[instances]
    instances = (np.cumsum(keep) * keep).astype(np.uint32)[instances]

    tone = (_CYTOPLASM + rng.normal(0.0, 0.05, int(instances.max()) + 1)).astype(np.float32)
    image = tone[instances] + 0.05 * _smooth_noise(shape, 8.0 / scale, rng)
    image += 0.03 * _smooth_noise(shape, 2.0 / scale, rng)
    # Voxels marked only because they face another cell hold a thinner slice of membrane
    # (partial volume, mostly in thick z sections), so they are proportionally less dark.
    darkness = np.clip(membrane_width / np.maximum(gap[membranes], 1e-3), 0.0, 1.0)
    image[membranes] += (_MEMBRANE - image[membranes]) * darkness

    # Organelles are drawn in tissue coordinates and masked by their cell's interior (cell voxels
    # not touching a membrane), so they never touch a membrane or reach into another cell.
    interior = ~ndimage.binary_dilation(membranes)
    room = (cKDTree(seeds).query(seeds, k=2)[0][:, 1] - membrane_width) / 2  # inscribed ball
    mitochondria = np.zeros(shape, dtype=bool)
    for index, box in enumerate(ndimage.find_objects(nearest + 1, max_label=len(seeds))):
        if box is None:  # a margin seed whose cell misses the volume
            continue
        count = rng.poisson(4 * vesicles_per_cell) if rng.random() < 1 / 4 else 0
        for small, ring in _vesicles(seeds[index], room[index], count, scale, warp, rng):
            ring &= (nearest[small] == index) & interior[small]
            image[small][ring] = _VESICLE_SHELL
        if rng.random() < mito_fraction:
            body, along = _mitochondria(_tissue(box, warp, scale) - seeds[index], room[index], rng)
            body &= (nearest[box] == index) & interior[box]
            image[box][body] = _mito_texture(body, along, rng)[body]
            mitochondria[box] |= body

    image = ndimage.gaussian_filter(image, (blur / anisotropy, blur, blur))
    image += noise * rng.standard_normal(shape, dtype=np.float32)
    return SyntheticEM(
        raw=_to_uint8(image),
        membranes=membranes.astype(np.uint8),
        mitochondria=mitochondria.astype(np.uint8),
        instances=instances,
        voxel_size=(_XY_NM * anisotropy, _XY_NM, _XY_NM),
    )


def _validate(shape: object, *numbers: float) -> None:
    """Fail early with one readable line instead of a numpy error deep inside."""
    if not (
        isinstance(shape, (tuple, list))
        and len(shape) == 3
        and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in shape)
    ):
        raise EmfmError(f"synthetic EM shape must be 3 positive ints (Z, Y, X), got {shape!r}")
    cell_size, anisotropy, membrane_width, mito_fraction, vesicles, noise, blur = numbers
    if min(cell_size, anisotropy, membrane_width) <= 0 or min(vesicles, noise, blur) < 0:
        raise EmfmError("synthetic EM sizes must be > 0 and vesicles, noise, blur >= 0")
    if not 0 <= mito_fraction <= 1:
        raise EmfmError(f"synthetic EM mito_fraction must be in [0, 1], got {mito_fraction}")


def _poisson_disk(extent: np.ndarray, cell_size: float, rng: np.random.Generator) -> np.ndarray:
    """Cell seeds at least 0.6 cell sizes apart, so cells are similar in size without slivers.

    Seeds also fill a one-cell margin around the volume, so border cells look like inner ones.
    """
    size = extent + 2 * cell_size
    target = max(4, round(float(np.prod(size)) / (np.pi / 6 * cell_size**3)))
    seeds = np.empty((target, 3))
    count = 0
    for candidate in rng.random((20 * target, 3)) * size - cell_size:
        if np.all(np.sum((seeds[:count] - candidate) ** 2, axis=1) >= (0.6 * cell_size) ** 2):
            seeds[count] = candidate
            count += 1
            if count == target:
                break
    return seeds[:count]


def _smooth_noise(shape: tuple[int, ...], step: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit-std smooth random field: white noise every `step` voxels, linearly interpolated."""
    field = rng.standard_normal([int(np.ceil(s / t)) + 2 for s, t in zip(shape, step)])
    field = field.astype(np.float32)
    for axis, size in enumerate(shape):
        position = np.arange(size) / step[axis]
        low = position.astype(int)
        weight = (position - low).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
        field = np.take(field, low, axis) * (1 - weight) + np.take(field, low + 1, axis) * weight
    return field / max(float(field.std()), 1e-6)


def _tissue(box: _Box, warp: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Tissue coordinates (physical, warped) of the voxels in `box`, shape (*box, 3)."""
    grid = np.stack(np.meshgrid(*[np.arange(s.start, s.stop) for s in box], indexing="ij"), axis=-1)
    return grid * scale + warp[box]


def _voronoi(seeds: np.ndarray, warp: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per voxel: second-nearest minus nearest seed distance, and the nearest seed's index.

    Queried in z-slabs, which bounds memory and is faster than one huge query.
    """
    shape = warp.shape[:3]
    tree = cKDTree(seeds)
    gap = np.empty(shape, dtype=np.float32)
    nearest = np.empty(shape, dtype=np.int32)
    for z in range(0, shape[0], 8):
        box = (slice(z, min(z + 8, shape[0])), slice(0, shape[1]), slice(0, shape[2]))
        dist, index = tree.query(_tissue(box, warp, scale).reshape(-1, 3), k=2, workers=-1)
        gap[box] = (dist[:, 1] - dist[:, 0]).reshape(gap[box].shape)
        nearest[box] = index[:, 0].reshape(gap[box].shape)
    return gap, nearest


def _label_edges(labels: np.ndarray) -> np.ndarray:
    """Voxels whose next neighbour along some axis has another label."""
    edges = np.zeros(labels.shape, dtype=bool)
    for axis in range(3):
        head = [slice(None)] * 3
        head[axis] = slice(0, -1)
        edges[tuple(head)] |= np.diff(labels, axis=axis) != 0
    return edges


def _box(centre: np.ndarray, reach: float, scale: np.ndarray, warp: np.ndarray) -> _Box:
    """Voxel box covering the tissue-space ball (centre, reach), inverting the smooth warp."""
    shape = np.array(warp.shape[:3])
    voxel = centre / scale
    for _ in range(2):  # fixed-point iteration, enough as the warp varies slowly
        voxel = (centre - warp[tuple(np.clip(np.round(voxel).astype(int), 0, shape - 1))]) / scale
    lo = np.clip(np.floor(voxel - (reach + 2) / scale).astype(int), 0, shape)
    hi = np.clip(np.ceil(voxel + (reach + 2) / scale).astype(int) + 1, lo, shape)
    return slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2])


def _unit(rng: np.random.Generator) -> np.ndarray:
    vector = rng.standard_normal(3)
    return vector / np.linalg.norm(vector)


def _vesicles(
    centre: np.ndarray, room: float, count: int, scale: np.ndarray, warp: np.ndarray, rng: np.random.Generator
) -> Iterator[tuple[_Box, np.ndarray]]:
    """An off-centre cluster of vesicles, like a presynaptic bouton: box and dark-ring mask of each."""
    cluster = centre + _unit(rng) * rng.uniform(0.2, 0.6) * room
    middles = cluster + rng.normal(0.0, 2.0 * count ** (1 / 3), (count, 3))
    for middle, radius in zip(middles, rng.uniform(2.5, 3.5, count)):
        box = _box(middle, radius, scale, warp)
        signed = np.linalg.norm(_tissue(box, warp, scale) - middle, axis=-1) - radius
        yield box, (signed < 0) & (signed > -1.5)


def _mitochondria(points: np.ndarray, room: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One or two parallel capsules near the cell centre, the origin of tissue-space `points`.

    Sized by the cell's inscribed-ball radius `room`, so most fit; the caller clips the rest.
    Returns the body mask and each voxel's position along the long axis (for the cristae).
    """
    axis = _unit(rng)
    side = np.cross(axis, _unit(rng))
    side /= np.linalg.norm(side)
    pair = rng.random() < 0.3
    thickness = rng.uniform(0.4, 0.65) * room * (0.6 if pair else 1.0)
    offsets = [-thickness - 1, thickness + 1] if pair else [rng.uniform(-0.2, 0.2) * room]
    along = points @ axis
    body = np.zeros(points.shape[:-1], dtype=bool)
    for offset in offsets:
        half_length = rng.uniform(0.5, 1.5) * room
        spine = np.clip(along, -half_length, half_length)[..., None] * axis + offset * side
        body |= np.linalg.norm(points - spine, axis=-1) < thickness
    return body, along


def _mito_texture(body: np.ndarray, along: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Matrix intensity with a dark outer membrane and cristae stripes across the long axis."""
    rim = body & ~ndimage.binary_erosion(body, border_value=1)
    inner = ndimage.binary_erosion(body, iterations=2, border_value=1)
    stripes = np.cos(2 * np.pi * along / rng.uniform(5.0, 7.0) + rng.uniform(0, 2 * np.pi)) > 0.4
    return np.where(rim | (inner & stripes), _MITO_DARK, _MITO_MATRIX).astype(np.float32)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """Stretch robust percentiles to 0..255, as a microscope's auto-contrast would."""
    low, high = np.percentile(image, [0.5, 99.5])
    return np.clip((image - low) * (255 / max(high - low, 1e-6)), 0, 255).astype(np.uint8)


def check_output(out: str | Path, overwrite: bool = False) -> Path:
    """The output path of :func:`save_synthetic`, checked before anything is generated: it writes by suffix, and
    replaces only an earlier output of its own, with ``overwrite``."""
    out = Path(out)
    if out.suffix.lower() not in (".zarr", ".tif", ".tiff"):
        raise EmfmError(f"--out {out}: expected a .zarr path (OME-Zarr with the labels) or a .tif one (raw only)")
    what, ours = ("image or label store", is_image_store) if out.suffix.lower() == ".zarr" else \
        ("synthetic TIFF", is_synthetic_tiff)
    if refuse_foreign("output", out, what, ours) and not overwrite:
        raise EmfmError(f"{out} exists; pass --overwrite")
    return out


def is_synthetic_tiff(path: Path) -> bool:
    """Whether ``path`` is a TIFF this module wrote: its Software tag says so (older ones carry none; they are
    left alone like any other TIFF)."""
    try:
        with tifffile.TiffFile(path) as tif:
            return tif.pages.first.software == SOFTWARE
    except (OSError, ValueError):      # a folder, not a TIFF (tifffile's errors are ValueErrors)
        return False


def save_synthetic(volume: SyntheticEM, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write a synthetic volume: ``.zarr`` as OME-Zarr with its ground truth under ``labels/``,
    ``.tif`` as a multi-page ImageJ TIFF of the raw data only (the kind of file users ingest)."""
    out = check_output(out, overwrite)
    if out.suffix.lower() in (".tif", ".tiff"):
        z, y, x = volume.voxel_size
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(f".{out.name}.partial")
        tifffile.imwrite(partial, volume.raw, imagej=True, resolution=(1 / x, 1 / y),
                         metadata={"spacing": z, "unit": "nm", "axes": "ZYX"}, software=SOFTWARE)
        return partial.replace(out)
    labels = {"membranes": volume.membranes, "mitochondria": volume.mitochondria,
              "instances": volume.instances}
    return write_ome_zarr(volume.raw, out, voxel_size=volume.voxel_size, labels=labels, overwrite=overwrite)
