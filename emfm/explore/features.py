"""``emfm features``: what a network (or a filter bank) sees at every place of a volume, as a zarr feature store.

Two sources. ``encoder``: a checkpoint's features -- one of the encoder's maps (ViT patch tokens, a CNN
stage), a hypercolumn of several maps, or the full-resolution features of the decoder a whole-network
checkpoint holds -- resampled to a chosen stride inside each tile and blended across overlapping tiles on
one grid over the region, exactly like ``emfm predict``. ``filters``: the ilastik-style filter bank
(:mod:`emfm.explore.filters`) per voxel, each block read with the bank's halo. Either way the store is
computed block by block, out of core, resumably, locally or on Dask, and equals the whole-region result.
A principal-component projection fitted on a sample can be stored beside the full features (``pca=K``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import zarr
from omegaconf import DictConfig
from tqdm.auto import tqdm

from emfm.blockwise.executor import Executor, executor_client, run_blocks
from emfm.blockwise.grid import Block, BlockGrid, parse_roi
from emfm.blockwise.job import BlockJob, BlockRequest, cached, input_volume
from emfm.blockwise.store import (
    Progress,
    add_attrs,
    claim,
    create,
    create_array,
    fingerprint,
    finish,
    placement,
    write,
)
from emfm.blockwise.tiles import SharedTiles, TileOrder
from emfm.checkpoints import checkpoint_digest, load_network
from emfm.data.ngff import image_attrs, read_attrs
from emfm.data.volume import SPATIAL, Volume
from emfm.errors import EmfmError
from emfm.explore.filters import SIGMAS, FilterBank
from emfm.explore.layers import (
    DECODER,
    Network,
    feature_function,
    layer_channels,
    per_axis,
    resolve_layer,
    tiling,
)
from emfm.inference import covering_tiles, in_precision, sliding_window
from emfm.models.encoders import Encoder
from emfm.models.heads import SegmentationHead

log = logging.getLogger(__name__)

FEATURES, PCA = "0", "pca"
SOURCES = ("encoder", "filters")


@dataclass(frozen=True)
class FeatureRequest(BlockRequest[str | None]):
    """What ``emfm features`` (and ``emfm cluster``, for its feature store) is asked to compute: the keys of
    every blockwise command (``block_shape`` in feature cells; ``checkpoint`` None with ``source=filters``) and
    these."""

    source: str = "encoder"             # encoder: the checkpoint's network | filters: the filter bank
    layer: int | str | None = None      # an encoder map, decoder or hypercolumn; None: a pretrained decoder, or -1
    stages: Any = None                  # the encoder maps of a hypercolumn; None: all
    stride: Any = None                  # voxels per feature cell (int or per axis); None = the layer's own
    filters: Any = None                 # source=filters: the bank's settings (sigmas, fine, per_slice)
    pca: int | None = None              # also store the features projected on this many principal components
    sample: int = 20000                 # feature vectors sampled to fit the projection
    seed: int = 0


@dataclass(frozen=True)
class FeatureStoreRequest(FeatureRequest):
    """What a command working on a feature store is asked (``emfm cluster``, ``emfm classify``): the feature
    request's keys (``output`` is the command's own) and the store, computed into ``<output>/features`` unless
    ``features`` names one."""

    features: str | None = None                        # an existing feature store; None: <output>/features

    @property
    def store(self) -> str:
        return str(Path(self.features).resolve()) if self.features else f"{Path(self.output).resolve()}/features"

    def feature_request(self) -> FeatureRequest:
        """What computes the feature store."""
        return FeatureRequest(**{**{f.name: getattr(self, f.name) for f in fields(FeatureRequest)},
                                 "output": self.store})


@dataclass(frozen=True, kw_only=True)
class FeatureJob(BlockJob):
    """Everything a block task of ``emfm features`` needs; its blocks are in feature cells."""

    stride: tuple[int, ...]               # voxels per feature cell, per axis
    layer: int | str                      # an index into the encoder's forward_features maps, decoder or hypercolumn
    stages: tuple[int, ...] = ()          # the maps of a hypercolumn

    @property
    def grid(self) -> BlockGrid:
        """The store's blocks of feature cells."""
        return BlockGrid(tuple(math.ceil(s / k) for s, k in zip(self.shape, self.stride)), self.block)

    @property
    def padded(self) -> tuple[int, ...]:
        """The region grown to whole cells and at least one tile; the growth is mirrored input."""
        return tuple(max(t, n * k) for t, n, k in zip(self.tile, self.grid.shape, self.stride))


@dataclass(frozen=True, kw_only=True)
class FilterJob(BlockJob[None]):
    """Everything a block task of ``emfm features source=filters`` needs: the filter bank, no model. Its cells are
    voxels; ``tile``, ``overlap`` and ``blend`` are of no use to it."""

    bank: FilterBank

    @property
    def stride(self) -> tuple[int, ...]:
        return (1,) * len(self.shape)


def job_network(job: FeatureJob, network: Network | None = None) -> Network:
    """The job's encoder (and decoder, for ``layer=decoder``), loaded once per process and job
    (:func:`~emfm.blockwise.job.cached`).

    ``network``: the checkpoint's, already loaded in this process, to use instead of loading it again.
    """
    return cached(job, lambda path: load_network(path, decoder="any" if job.layer == DECODER else "none"), network)


def read_padded(volume: Volume, roi: tuple[tuple[int, int], ...], span: tuple[slice, ...]) -> np.ndarray:
    """The normalised input over ``span`` (region coordinates), mirrored where it passes the region's end."""
    inside = tuple(slice(s.start, min(s.stop, b - a)) for s, (a, b) in zip(span, roi))
    raw = volume.read(tuple(slice(a + s.start, a + s.stop) for s, (a, _) in zip(inside, roi)))
    image = volume.normalize(raw)
    pad = [(0, s.stop - i.stop) for s, i in zip(span, inside)]
    return np.pad(image, pad, mode="symmetric") if any(p for _, p in pad) else image


def feature_block(job: FeatureJob, index: Block) -> Block:
    """Compute, write and mark one block of the feature store."""
    cells = job.grid.region(index)
    voxels = tuple(slice(c.start * k, c.stop * k) for c, k in zip(cells, job.stride))
    span, corners = covering_tiles(voxels, job.padded, job.tile, job.overlap, job.stride)
    def read(span: tuple[slice, ...]) -> torch.Tensor:
        return torch.from_numpy(read_padded(job.volume(), job.roi, span))[None]

    fn = in_precision(feature_function(*job_network(job), job.layer, job.stages, job.tile, job.stride), job.precision)
    order = TileOrder.of(job.padded, job.tile, job.overlap, job.grid, job.stride)
    tiles = SharedTiles.of_block(job.output, order, index, span, read)
    feats = sliding_window(fn, read(span), job.tile, job.overlap, job.batch_size, corners, job.blend, job.stride,
                           run=tiles.run)
    inner = tuple(slice(c.start - s.start // k, c.stop - s.start // k) for c, s, k in zip(cells, span, job.stride))
    write(job.output, FEATURES, (slice(None), *cells), feats[(slice(None), *inner)].half().numpy())   # torch: threaded
    tiles.done(corners, Progress(job.output, "features", job.grid), job.batch_size)
    return index


def filter_block(job: FilterJob, index: Block) -> Block:
    """Compute, write and mark one block of a filter-bank store: read with the bank's halo, clipped to the region
    (where the whole-region filters reflect too), filtered and cropped."""
    voxels, read = job.grid.region(index), job.grid.region(index, job.bank.halo(len(job.shape)))
    volume = job.volume()
    image = volume.normalize(volume.read(tuple(slice(a + r.start, a + r.stop) for r, (a, _) in zip(read, job.roi))))
    inner = tuple(slice(v.start - r.start, v.stop - r.start) for v, r in zip(voxels, read))
    write(job.output, FEATURES, (slice(None), *voxels), job.bank(image)[(slice(None), *inner)].astype(np.float16))
    Progress(job.output, "features", job.grid).mark(index)
    return index


def dense_features(encoder: Encoder, image: np.ndarray, layer: int | str | None = None, stride: Any = None,
                   overlap: float = 0.25, batch_size: int = 8, decoder: SegmentationHead | None = None,
                   stages: Any = None, precision: str = "auto") -> np.ndarray:
    """Features (F, *cells) of a normalised image or stack held in memory (notebooks, small crops).

    A 2-D encoder over a stack (Z, Y, X) works slice by slice; ``layer``: as ``emfm features`` (:func:`resolve_layer`;
    ``decoder``: the checkpoint's, from :func:`~emfm.checkpoints.load_network`); ``stride`` defaults to the layer's own;
    ``precision``: of the forward passes, as ``emfm features`` (:func:`~emfm.inference.inference_precision`).
    """
    layer, stages = resolve_layer(layer, stages, encoder, decoder)
    tile, step = tiling(encoder, image.ndim, layer, stride)
    cells = tuple(math.ceil(s / k) for s, k in zip(image.shape, step))
    padded = tuple(max(t, n * k) for t, n, k in zip(tile, cells, step))
    image = np.pad(image, [(0, p - s) for p, s in zip(padded, image.shape)], mode="symmetric")
    fn = in_precision(feature_function(encoder, decoder, layer, stages, tile, step), precision)
    feats = sliding_window(fn, torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None], tile,
                           overlap, batch_size, blend="linear", stride=step)
    return feats[(slice(None), *(slice(0, n) for n in cells))].numpy()


def source_network(request: FeatureRequest) -> Network | None:
    """The checkpoint's encoder and decoder whose features are asked for, loaded (None with ``source=filters``);
    settings that do not go with the source are named."""
    if request.source not in SOURCES:
        raise EmfmError(f"source={request.source}: expected one of {', '.join(SOURCES)}")
    if request.source == "filters":
        given = {"checkpoint": request.checkpoint, "layer": request.layer, "stages": request.stages}
        for key, value in given.items():
            if value is not None:
                raise EmfmError(f"{key}={value}: source=filters computes the filter bank, which takes no {key}; "
                                f"leave it out (or set source=encoder)")
        return None
    if not request.checkpoint:
        raise EmfmError("checkpoint: required with source=encoder (an emfm checkpoint or export directory); or "
                        "source=filters for the filter bank, which needs none")
    return layer_network(request.checkpoint, request.layer, key="checkpoint")


def layer_network(checkpoint: str, layer: int | str | None = None, key: str | None = None) -> Network:
    """The checkpoint's encoder, with the decoder ``layer`` takes (:func:`resolve_layer`): any for ``decoder``; for
    the default only one pretrained with the encoder (objective=restore), not a fine-tuned one; else none."""
    decoder: Literal["any", "pretrained", "none"] = \
        "pretrained" if layer is None else "any" if layer == DECODER else "none"
    return load_network(checkpoint, key=key, decoder=decoder)


def make_job(request: FeatureRequest, network: Network, volume: Volume, threads: int | None) -> FeatureJob:
    """Check the settings against the network and the volume, and build the job."""
    encoder, decoder = network
    patch = tuple(encoder.input_shape)
    if len(patch) == 3 and volume.ndim == 2:
        raise EmfmError(f"input={volume.path}: a 2-D image, but the encoder is 3-D (patch {list(patch)})")
    layer, stages = resolve_layer(request.layer, request.stages, encoder, decoder)
    tile, stride = tiling(encoder, volume.ndim, layer, request.stride)
    region = parse_roi(request.roi, volume.shape)
    shape = tuple(r.stop - r.start for r in region)
    cells = tuple(math.ceil(s / k) for s, k in zip(shape, stride))
    default = tuple(min(c, 4 * t // k) for c, t, k in zip(cells, tile, stride))
    block = per_axis(request.block_shape, len(cells), "block_shape") if request.block_shape else default
    return FeatureJob.of(request, volume, region, threads, tile=tile, block=block, stride=stride, layer=layer,
                         stages=stages)


def make_filter_job(request: FeatureRequest, volume: Volume, threads: int | None) -> FilterJob:
    """The filter bank of ``filters`` (per slice where z voxels are over twice as long as y ones, unless
    ``filters.per_slice`` says) and its job; blocks of 512² voxels filtered per slice, 64³ in 3-D."""
    settings = dict(request.filters or {})
    if request.stride not in (None, 1):
        raise EmfmError(f"stride={request.stride}: the filter bank gives features per voxel; leave stride out with "
                        f"source=filters")
    size = volume.voxel_size
    anisotropic = volume.ndim == 3 and size is not None and size[0] > 2 * size[1]
    per_slice = settings.pop("per_slice", None)
    try:
        sigmas = tuple(float(s) for s in settings.pop("sigmas", SIGMAS))
    except (TypeError, ValueError):
        raise EmfmError(f"filters.sigmas={request.filters['sigmas']}: expected a list of positive numbers") from None
    bank = FilterBank(sigmas, per_slice=anisotropic if per_slice is None else bool(per_slice),
                      fine=bool(settings.pop("fine", False)))
    if settings:
        raise EmfmError(f"filters.{next(iter(settings))}: not a filter bank setting; expected sigmas, fine, per_slice")
    region = parse_roi(request.roi, volume.shape)
    filtered = bank.axes(volume.ndim)
    side = 512 if len(filtered) == 2 else 64
    default = tuple(min(r.stop - r.start, side if axis in filtered else 1) for axis, r in enumerate(region))
    block = per_axis(request.block_shape, len(region), "block_shape") if request.block_shape else default
    return FilterJob.of(request, volume, region, threads, tile=(1,) * len(region), block=block, bank=bank)


def create_store(job: FeatureJob | FilterJob, stamp: dict[str, Any], channels: int, volume: Volume) -> None:
    """The new feature store: ``0`` (F, *cells) float16, placed on the volume (its units; each cell's centre
    on the centre of its voxels) by its OME scale and translation."""
    plan, origin = placement(volume, job.grid.shape, [a for a, _ in job.roi], stride=job.stride)
    attrs = image_attrs("features", "c" + volume.axes, volume.units, plan, origin, job.zarr_format, is_label=False)

    def layout(root: zarr.Group) -> None:
        create_array(root, FEATURES, (channels, *job.grid.shape), (channels, *job.block), "float16", "c" + volume.axes)

    create(job.output, attrs | {"emfm": {"kind": "features", "features": stamp, "complete": False}}, "feature store",
           layout, job.zarr_format)


def check_store(path: str, volume: Volume, roi: tuple[slice, ...] | None = None,
                checkpoint: str | None = None) -> dict[str, Any]:
    """The metadata of a complete feature store computed on ``volume`` (and ``roi``) with ``checkpoint`` (its
    files' digest, so a copy is the same checkpoint), or a clear error."""
    meta = read_attrs(path)
    if meta.get("kind") != "features" or not meta.get("complete"):
        raise EmfmError(f"features={path}: not a complete emfm feature store (make one with `emfm features`)")
    settings = meta["features"]
    if checkpoint is not None and settings.get("checkpoint_sha256") != checkpoint_digest(checkpoint):
        made = f"checkpoint {settings['checkpoint']}" if settings.get("checkpoint") else "the filter bank"
        raise EmfmError(f"features={path}: computed with {made}, not with "
                        f"checkpoint={checkpoint} (their files differ); give that checkpoint, or leave out features= "
                        f"to compute this one's")
    if settings["input_shape"] != list(volume.shape) or (
            roi is not None and settings["roi"] != [[r.start, r.stop] for r in roi]):
        raise EmfmError(f"features={path}: computed on a volume of shape {settings['input_shape']} (roi "
                        f"{settings['roi']}), but input={volume.path} has shape {list(volume.shape)}"
                        + (f" (roi {[[r.start, r.stop] for r in roi]})" if roi is not None else "")
                        + "; recompute the features for this volume")
    return meta


def extract_features(request: FeatureRequest, executor: Executor, network: Network | None = None) -> dict[str, Any]:
    """Compute (or finish) a feature store; returns a summary with its path.

    A store of the same settings is always kept (resumed or reused); ``overwrite`` replaces a different one.
    ``network``: the checkpoint's, already loaded by the caller (:func:`source_network`).
    """
    input_volume.cache_clear()
    network = network or source_network(request)
    volume = Volume(request.input, request.level, request.missing_chunks)
    threads = executor.threads(request.threads)
    job: FeatureJob | FilterJob
    task: Callable[..., Block]
    fast = ("threads", "batch_size", "block", "missing_chunks")
    if network is None:
        job = make_filter_job(request, volume, threads)
        task, channels = filter_block, len(job.bank.names(volume.ndim))
        stamp = fingerprint(job, (*fast, "tile", "overlap", "blend"), input_shape=list(volume.shape),
                            stride=list(job.stride))
    else:
        job = make_job(request, network, volume, threads)
        task, channels = feature_block, layer_channels(*network, job.layer, job.stages)
        stamp = fingerprint(job, fast, input_shape=list(volume.shape))
    complete = claim(job.output, "features", stamp, request.overwrite,
                     inputs={"input": job.input, "checkpoint": job.checkpoint}, describe="feature store")
    if complete is None:
        create_store(job, stamp, channels, volume)
    summary: dict[str, Any] = {"output": job.output, "grid": list(job.grid.shape), "channels": channels,
                               "stride": list(job.stride), "blocks": len(job.grid), "computed": 0}
    if not complete:
        with executor_client(executor) as client:
            if client is None and isinstance(job, FeatureJob) and network is not None:
                job_network(job, network)           # this process computes: no second load
            pending = Progress(job.output, "features", job.grid).pending()
            summary["computed"] = len(pending)
            summary["seconds"] = run_blocks(task, pending, job, client=client, desc="features",
                                            progress=request.progress)
        finish(job.output)
    if request.pca and stored_pca(job.output) != request.pca:
        vectors, _ = sample_store(job.output, FEATURES, request.sample, request.seed)
        Projection.fit(vectors, request.pca).write(job.output, progress=request.progress)
    return summary


def stored_pca(store: str) -> int | None:
    """Components of the projection stored with the features, if any."""
    return (read_attrs(store).get("pca") or {}).get("components")


def sample_store(path: str, array: str, n: int, seed: int, max_blocks: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``n`` feature vectors (n, F) float32 and their cell coordinates (n, ndim), from up to
    ``max_blocks`` random chunks of ``path/array`` (reading whole chunks, never scattered cells)."""
    data = zarr.open_array(f"{path}/{array}", mode="r")
    grid = BlockGrid(tuple(data.shape[1:]), tuple(data.chunks[1:]))
    rng = np.random.default_rng(seed)
    blocks = list(grid)
    chosen = sorted(rng.permutation(len(blocks))[:max_blocks])
    per_block = -(-n // len(chosen))
    vectors, coords = [], []
    for i in chosen:
        region = grid.region(blocks[i])
        block = np.asarray(data[(slice(None), *region)], dtype=np.float32)        # (F, *cells)
        flat = block.reshape(block.shape[0], -1)                                      # (F, cells)
        pick = rng.choice(flat.shape[1], size=min(per_block, flat.shape[1]), replace=False)
        vectors.append(flat[:, pick].T)
        local = np.stack(np.unravel_index(pick, block.shape[1:]), 1)
        coords.append(local + [r.start for r in region])
    sampled, where = np.concatenate(vectors), np.concatenate(coords)
    keep = rng.permutation(len(sampled))[:n]
    return sampled[keep], where[keep]


@dataclass
class Projection:
    """Principal components of features fitted on a sample: ``(x - mean) @ components.T``."""

    mean: np.ndarray          # (F,)
    components: np.ndarray    # (K, F)
    explained: float          # fraction of the sample's variance kept

    @classmethod
    def fit(cls, vectors: np.ndarray, k: int) -> Projection:
        from sklearn.decomposition import PCA as SkPCA

        if not 1 <= k <= min(vectors.shape):
            raise EmfmError(f"pca={k}: expected 1..{min(vectors.shape)} components for {vectors.shape[0]} sampled "
                            f"vectors of {vectors.shape[1]} features")
        pca = SkPCA(n_components=k, random_state=0).fit(vectors)
        return cls(pca.mean_.astype(np.float32), pca.components_.astype(np.float32),
                   float(pca.explained_variance_ratio_.sum()))

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        return (vectors - self.mean) @ self.components.T

    def write(self, store: str, progress: bool = True) -> None:
        """Add the projected features to ``store`` as array ``pca`` (K, *grid), chunked like the features."""
        source = zarr.open_array(f"{store}/{FEATURES}", mode="r")
        root = zarr.open_group(store, mode="r+")
        if PCA in root:
            del root[PCA]
        k, axes = len(self.components), "c" + SPATIAL[1 - source.ndim:]   # channels, then the volume's axes
        target = create_array(root, PCA, (k, *source.shape[1:]), (k, *source.chunks[1:]), "float16", axes)
        grid = BlockGrid(tuple(source.shape[1:]), tuple(source.chunks[1:]))
        for index in tqdm(list(grid), desc="pca", unit="block", disable=not progress):
            region = (slice(None), *grid.region(index))
            block = np.asarray(source[region], dtype=np.float32)
            flat = block.reshape(block.shape[0], -1).T                                 # (cells, F)
            target[region] = self(flat).T.reshape(k, *block.shape[1:]).astype(np.float16)
        add_attrs(root, pca={"components": k, "explained_variance": self.explained})


def features(cfg: DictConfig) -> dict[str, Any]:
    """The ``emfm features`` command."""
    summary = extract_features(FeatureRequest.from_config(cfg), Executor(cfg.executor, **cfg.dask))
    log.info("wrote %s: %d channels on a %s grid (stride %s), %d of %d blocks computed", summary["output"],
             summary["channels"], summary["grid"], summary["stride"], summary["computed"], summary["blocks"])
    return summary
