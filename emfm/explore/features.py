"""``emfm features``: what an encoder sees at every place of a volume, as a zarr feature store.

Features come from one of the encoder's feature maps (ViT patch tokens, a CNN stage), resampled
to a chosen stride inside each tile and blended across overlapping tiles on one grid over the
region, exactly like ``emfm predict`` -- so the store is computed block by block, out of core,
resumably, locally or on Dask, and equals the whole-region result. A principal-component
projection fitted on a sample can be stored beside the full features (``pca=K``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
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
from emfm.checkpoints import checkpoint_digest, load_encoder
from emfm.data.ngff import image_attrs, read_attrs
from emfm.data.volume import SPATIAL, Volume
from emfm.errors import EmfmError
from emfm.inference import covering_tiles, sliding_window
from emfm.models.encoders import Encoder

log = logging.getLogger(__name__)

FEATURES, PCA = "0", "pca"


@dataclass(frozen=True)
class FeatureRequest(BlockRequest):
    """What ``emfm features`` (and ``emfm cluster``, for its feature store) is asked to compute: the keys of
    every blockwise command (``block_shape`` in feature cells) and these."""

    layer: int = -1               # which of the encoder's feature maps
    stride: Any = None            # voxels per feature cell (int or per axis); None = the map's own
    pca: int | None = None        # also store the features projected on this many principal components
    sample: int = 20000           # feature vectors sampled to fit the projection
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class FeatureJob(BlockJob):
    """Everything a block task of ``emfm features`` needs; its blocks are in feature cells."""

    stride: tuple[int, ...]               # voxels per feature cell, per axis
    layer: int                            # index into the encoder's forward_features maps

    @property
    def grid(self) -> BlockGrid:
        """The store's blocks of feature cells."""
        return BlockGrid(tuple(math.ceil(s / k) for s, k in zip(self.shape, self.stride)), self.block)

    @property
    def padded(self) -> tuple[int, ...]:
        """The region grown to whole cells and at least one tile; the growth is mirrored input."""
        return tuple(max(t, n * k) for t, n, k in zip(self.tile, self.grid.shape, self.stride))


def job_encoder(job: FeatureJob, encoder: Encoder | None = None) -> Encoder:
    """The job's encoder, loaded once per process and job (:func:`~emfm.blockwise.job.cached`).

    ``encoder``: the checkpoint's, already loaded in this process, to use instead of loading it again.
    """
    return cached(job, lambda path: load_encoder(path, as_timm=False), encoder)


def feature_function(encoder: Encoder, layer: int, tile: tuple[int, ...], stride: tuple[int, ...]) -> Any:
    """Tiles (B, C, *tile) -> features (B, F, *tile / stride) from the encoder's map ``layer``."""
    per_slice = len(tile) == 3 and encoder.spatial_dims == 2
    out = tuple(t // k for t, k in zip(tile, stride))[1 if per_slice else 0:]
    mode = "bilinear" if len(out) == 2 else "trilinear"

    def features(x: torch.Tensor) -> torch.Tensor:
        maps = encoder.forward_features(x[:, :, 0] if per_slice else x)
        f = maps[layer]
        if tuple(f.shape[2:]) != out:
            f = F.interpolate(f, size=out, mode=mode, align_corners=False)
        return f.unsqueeze(2) if per_slice else f

    return features


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
    image = torch.from_numpy(read_padded(job.volume(), job.roi, span))[None]
    encoder = job_encoder(job)
    fn = feature_function(encoder, job.layer, job.tile, job.stride)
    feats = sliding_window(fn, image, job.tile, job.overlap, job.batch_size, corners, job.blend, job.stride)
    inner = tuple(slice(c.start - s.start // k, c.stop - s.start // k) for c, s, k in zip(cells, span, job.stride))
    write(job.output, FEATURES, (slice(None), *cells), feats[(slice(None), *inner)].numpy().astype(np.float16))
    Progress(job.output, "features", job.grid).mark(index)
    return index


def dense_features(encoder: Encoder, image: np.ndarray, layer: int = -1, stride: Any = None,
                   overlap: float = 0.25, batch_size: int = 8) -> np.ndarray:
    """Features (F, *cells) of a normalised image or stack held in memory (notebooks, small crops).

    A 2-D encoder over a stack (Z, Y, X) works slice by slice; ``stride`` defaults to the map's own.
    """
    tile, step = tiling(encoder, image.ndim, layer, stride)
    cells = tuple(math.ceil(s / k) for s, k in zip(image.shape, step))
    padded = tuple(max(t, n * k) for t, n, k in zip(tile, cells, step))
    image = np.pad(image, [(0, p - s) for p, s in zip(padded, image.shape)], mode="symmetric")
    fn = feature_function(encoder, layer, tile, step)
    feats = sliding_window(fn, torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None], tile,
                           overlap, batch_size, blend="linear", stride=step)
    return feats[(slice(None), *(slice(0, n) for n in cells))].numpy()


def tiling(encoder: Encoder, ndim: int, layer: int = -1, stride: Any = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(tile, stride) over the axes of an ``ndim``-D input: a 2-D encoder over a stack gets 1 in z.

    ``stride`` (voxels per feature cell in the encoder's axes; default the map's own) must divide the tile.
    """
    maps = len(encoder.feature_strides)
    if not -maps <= layer < maps:
        raise EmfmError(f"layer={layer}: the encoder has {maps} feature maps (0..{maps - 1}, or -1 for the last)")
    own = tuple(encoder.feature_strides[layer])
    plane = own if stride is None else _per_axis(stride, len(own), "stride")
    per_slice = ndim == 3 and encoder.spatial_dims == 2
    tile = (1, *encoder.input_shape) if per_slice else tuple(encoder.input_shape)
    step = (1, *plane) if per_slice else plane
    if any(t % k for t, k in zip(tile, step)):
        raise EmfmError(f"stride={list(step)}: must divide the encoder tile {list(tile)}")
    return tuple(int(t) for t in tile), tuple(int(k) for k in step)


def _per_axis(value: Any, n: int, key: str) -> tuple[int, ...]:
    values = [value] * n if isinstance(value, int) else list(value)
    if len(values) != n or min(values) < 1:
        raise EmfmError(f"{key}={value}: expected a positive size or {n} of them")
    return tuple(int(v) for v in values)


def make_job(request: FeatureRequest, encoder: Encoder, volume: Volume, threads: int | None) -> FeatureJob:
    """Check the settings against the encoder and the volume, and build the job."""
    patch = tuple(encoder.input_shape)
    if len(patch) == 3 and volume.ndim == 2:
        raise EmfmError(f"input={volume.path}: a 2-D image, but the encoder is 3-D (patch {list(patch)})")
    tile, stride = tiling(encoder, volume.ndim, request.layer, request.stride)
    region = parse_roi(request.roi, volume.shape)
    shape = tuple(r.stop - r.start for r in region)
    cells = tuple(math.ceil(s / k) for s, k in zip(shape, stride))
    default = tuple(min(c, 4 * t // k) for c, t, k in zip(cells, tile, stride))
    block = _per_axis(request.block_shape, len(cells), "block_shape") if request.block_shape else default
    return FeatureJob.of(request, volume, region, threads, tile=tile, block=block, stride=stride,
                         layer=request.layer % len(encoder.feature_strides))


def create_store(job: FeatureJob, stamp: dict[str, Any], channels: int, volume: Volume) -> None:
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
        raise EmfmError(f"features={path}: computed with checkpoint {settings.get('checkpoint')}, not with "
                        f"checkpoint={checkpoint} (their files differ); give that checkpoint, or leave out features= "
                        f"to compute this one's")
    if settings["input_shape"] != list(volume.shape) or (
            roi is not None and settings["roi"] != [[r.start, r.stop] for r in roi]):
        raise EmfmError(f"features={path}: computed on a volume of shape {settings['input_shape']} (roi "
                        f"{settings['roi']}), but input={volume.path} has shape {list(volume.shape)}"
                        + (f" (roi {[[r.start, r.stop] for r in roi]})" if roi is not None else "")
                        + "; recompute the features for this volume")
    return meta


def extract_features(request: FeatureRequest, executor: Executor, encoder: Encoder | None = None) -> dict[str, Any]:
    """Compute (or finish) a feature store; returns a summary with its path.

    A store of the same settings is always kept (resumed or reused); ``overwrite`` replaces a different one.
    ``encoder``: the checkpoint's, already loaded by the caller.
    """
    input_volume.cache_clear()
    encoder = encoder or load_encoder(request.checkpoint, as_timm=False, key="checkpoint")
    volume = Volume(request.input, request.level, request.missing_chunks)
    job = make_job(request, encoder, volume, executor.threads(request.threads))
    channels = encoder.feature_channels[job.layer]
    stamp = fingerprint(job, ("threads", "batch_size", "block", "missing_chunks"), input_shape=list(volume.shape))
    complete = claim(job.output, "features", stamp, request.overwrite,
                     inputs={"input": job.input, "checkpoint": job.checkpoint}, describe="feature store")
    if complete is None:
        create_store(job, stamp, channels, volume)
    summary: dict[str, Any] = {"output": job.output, "grid": list(job.grid.shape), "channels": channels,
                               "stride": list(job.stride), "blocks": len(job.grid), "computed": 0}
    if not complete:
        with executor_client(executor) as client:
            if client is None:
                job_encoder(job, encoder)           # this process computes: no second load
            pending = Progress(job.output, "features", job.grid).pending()
            summary["computed"] = len(pending)
            summary["seconds"] = run_blocks(feature_block, pending, job, client=client, desc="features",
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
