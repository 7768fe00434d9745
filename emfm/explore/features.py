"""``emfm features``: what an encoder sees at every place of a volume, as a zarr feature store.

Features come from one of the encoder's feature maps (ViT patch tokens, a CNN stage), resampled
to a chosen stride inside each tile and blended across overlapping tiles on one grid over the
region, exactly like ``emfm predict`` -- so the store is computed block by block, out of core,
resumably, locally or on Dask, and equals the whole-region result. A principal-component
projection fitted on a sample can be stored beside the full features (``pca=K``).
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import zarr

from emfm.data.volume import Volume
from emfm.errors import EmfmError
from emfm.finetune.segmentation import pretrained_encoder
from emfm.inference import covering_tiles, sliding_window
from emfm.models.encoders import Encoder, create_encoder
from emfm.paths import refuse_overlap
from emfm.predict.blocks import (
    Block,
    BlockGrid,
    Progress,
    executor_client,
    parse_roi,
    run_blocks,
)
from emfm.predict.predict import (
    PROGRESS,
    checkpoint_digest,
    create_array,
    finish,
    ome_attrs,
    write,
)

FEATURES, PCA = "0", "pca"


@dataclass(frozen=True)
class FeatureJob:
    """Everything a block task needs (small and picklable, for Dask workers)."""

    checkpoint: str
    input: str
    output: str
    level: int
    roi: tuple[tuple[int, int], ...]      # (start, stop) per axis of the input volume
    tile: tuple[int, ...]                 # encoder tile over the region's axes (1 in z: a 2-D encoder)
    stride: tuple[int, ...]               # voxels per feature cell, per axis
    layer: int                            # index into the encoder's forward_features maps
    block: tuple[int, ...]                # in feature cells; one chunk of the store
    overlap: float
    blend: str
    batch_size: int
    threads: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The region's shape in voxels."""
        return tuple(b - a for a, b in self.roi)

    @property
    def grid(self) -> BlockGrid:
        return BlockGrid(tuple(math.ceil(s / k) for s, k in zip(self.shape, self.stride)), self.block)

    @property
    def padded(self) -> tuple[int, ...]:
        """The region grown to whole cells and at least one tile; the growth is mirrored input."""
        return tuple(max(t, n * k) for t, n, k in zip(self.tile, self.grid.shape, self.stride))


def load_encoder(checkpoint: str, threads: int | None = None) -> Encoder:
    """The encoder of a pretraining or fine-tuning checkpoint or an export directory, in eval mode."""
    if threads:
        torch.set_num_threads(threads)
    config, weights = pretrained_encoder(checkpoint)
    encoder = create_encoder(**config)
    encoder.load_state_dict(weights)
    return encoder.eval()


@functools.lru_cache(maxsize=1)
def _encoder(checkpoint: str, threads: int | None) -> Encoder:
    return load_encoder(checkpoint, threads)        # once per process (one per Dask worker)


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


@functools.lru_cache(maxsize=1)
def input_volume(path: str, level: int) -> Volume:
    return Volume(path, level)


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
    image = torch.from_numpy(read_padded(input_volume(job.input, job.level), job.roi, span))[None]
    encoder = _encoder(job.checkpoint, job.threads)
    fn = feature_function(encoder, job.layer, job.tile, job.stride)
    feats = sliding_window(fn, image, job.tile, job.overlap, job.batch_size, corners, job.blend, job.stride)
    inner = tuple(slice(c.start - s.start // k, c.stop - s.start // k) for c, s, k in zip(cells, span, job.stride))
    write(job, FEATURES, (slice(None), *cells), feats[(slice(None), *inner)].numpy().astype(np.float16))
    Progress(zarr.open_group(f"{job.output}/{PROGRESS}", mode="a"), "features", job.grid).mark(index)
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


def make_job(cfg: Any, output: str) -> tuple[FeatureJob, Encoder, Volume]:
    """Check the settings against the encoder and the volume, and build the job."""
    encoder = load_encoder(cfg.checkpoint)
    volume = Volume(cfg.input, cfg.get("level", 0))
    patch = tuple(encoder.input_shape)
    if len(patch) == 3 and volume.ndim == 2:
        raise EmfmError(f"input={cfg.input}: a 2-D image, but the encoder is 3-D (patch {list(patch)})")
    tile, stride = tiling(encoder, volume.ndim, cfg.layer, cfg.get("stride"))
    region = parse_roi(cfg.get("roi"), volume.shape)
    shape = tuple(r.stop - r.start for r in region)
    cells = tuple(math.ceil(s / k) for s, k in zip(shape, stride))
    default = tuple(min(c, 4 * t // k) for c, t, k in zip(cells, tile, stride))
    block = _per_axis(cfg.block_shape, len(cells), "block_shape") if cfg.get("block_shape") else default
    job = FeatureJob(checkpoint=str(Path(cfg.checkpoint).resolve()), input=str(Path(cfg.input).resolve()),
                     output=output, level=int(cfg.get("level", 0)),
                     roi=tuple((r.start, r.stop) for r in region), tile=tile, stride=stride,
                     layer=int(cfg.layer) % len(encoder.feature_strides), block=block, overlap=float(cfg.overlap), blend=str(cfg.blend),
                     batch_size=int(cfg.batch_size),
                     threads=cfg.dask.threads_per_worker if cfg.executor == "dask" else cfg.get("threads"))
    return job, encoder, volume


def stamp(job: FeatureJob, volume: Volume) -> dict[str, Any]:
    """What makes two feature stores the same (resume or reuse only such a store)."""
    settings = {k: v for k, v in asdict(job).items() if k not in ("output", "threads", "batch_size", "block")}
    return json.loads(json.dumps({**settings, "input_shape": list(volume.shape),
                                  "checkpoint_sha256": checkpoint_digest(job.checkpoint)}))


def open_store(path: str) -> dict[str, Any]:
    """The ``emfm`` attributes of a feature store (``{}`` if ``path`` is none)."""
    try:
        return dict(zarr.open_group(path, mode="r").attrs).get("emfm", {})
    except (OSError, ValueError):
        return {}


def prepare_store(job: FeatureJob, meta: dict[str, Any], channels: int, volume: Volume, overwrite: bool) -> bool:
    """Create the store, or check that the existing one continues (or is) this job; True if it is complete.

    A store of the same settings is always kept (resumed or reused); ``overwrite`` replaces a different one.
    """
    refuse_overlap("output", job.output, {"input": job.input, "checkpoint": job.checkpoint})
    out = Path(job.output)
    if out.exists():
        previous = open_store(job.output)
        if previous.get("features") == meta:
            return bool(previous.get("complete"))
        if not overwrite:
            what = ("features of other settings" if "features" in previous else "something that is not an emfm feature store")
            raise EmfmError(f"output={out} already holds {what}; choose another output or set overwrite=true")
        shutil.rmtree(out)
    vs = list(volume.voxel_size or (1.0,) * volume.ndim)
    # A cell's centre sits (stride - 1) / 2 voxels after its first voxel.
    origin = [(a + (k - 1) / 2) * v for (a, _), k, v in zip(job.roi, job.stride, vs)]
    try:
        root = zarr.open_group(str(out), mode="w-")
        root.attrs.update(ome_attrs("features", "c" + volume.axes, [1.0, *(k * v for k, v in zip(job.stride, vs))],
                                    [0.0, *origin])
                          | {"emfm": {"kind": "features", "features": meta, "complete": False}})
        create_array(root, FEATURES, (channels, *job.grid.shape), (channels, *job.block), "float16", "c" + volume.axes)
        root.create_group(PROGRESS)
    except OSError as e:
        raise EmfmError(f"output={out}: cannot create the feature store ({e.strerror or e})") from None
    return False


def check_store(path: str, volume: Volume, roi: tuple[slice, ...] | None = None) -> dict[str, Any]:
    """The metadata of a complete feature store computed on ``volume`` (and ``roi``), or a clear error."""
    meta = open_store(path)
    if meta.get("kind") != "features" or not meta.get("complete"):
        raise EmfmError(f"features={path}: not a complete emfm feature store (make one with `emfm features`)")
    settings = meta["features"]
    if settings["input_shape"] != list(volume.shape) or (
            roi is not None and settings["roi"] != [[r.start, r.stop] for r in roi]):
        raise EmfmError(f"features={path}: computed on a volume of shape {settings['input_shape']} (roi "
                        f"{settings['roi']}), but input={volume.path} has shape {list(volume.shape)}"
                        + (f" (roi {[[r.start, r.stop] for r in roi]})" if roi is not None else "")
                        + "; recompute the features for this volume")
    return meta


def extract_features(cfg: Any, output: str | None = None) -> dict[str, Any]:
    """Compute (or finish) a feature store; returns a summary with its path."""
    input_volume.cache_clear()
    _encoder.cache_clear()
    output = str(Path(output or cfg.output).resolve())
    job, encoder, volume = make_job(cfg, output)
    channels = encoder.feature_channels[job.layer]
    complete = prepare_store(job, stamp(job, volume), channels, volume, cfg.overwrite)
    summary: dict[str, Any] = {"output": output, "grid": list(job.grid.shape), "channels": channels,
                               "stride": list(job.stride), "blocks": len(job.grid), "computed": 0}
    if not complete:
        with executor_client(cfg) as client:
            pending = Progress(zarr.open_group(f"{output}/{PROGRESS}", mode="a"), "features", job.grid).pending(job.grid)
            summary["computed"] = len(pending)
            summary["seconds"] = run_blocks(feature_block, pending, job, executor=cfg.executor, client=client,
                                            desc="features", progress=cfg.progress)
        finish(job)
    if cfg.get("pca") and stored_pca(output) != int(cfg.pca):
        from emfm.explore.cluster import Projection, sample_store

        vectors, _ = sample_store(output, FEATURES, int(cfg.sample), int(cfg.seed))
        Projection.fit(vectors, int(cfg.pca)).write(output, progress=cfg.progress)
    return summary


def stored_pca(store: str) -> int | None:
    """Components of the projection stored with the features, if any."""
    return (open_store(store).get("pca") or {}).get("components")


def features(cfg: Any) -> dict[str, Any]:
    """The ``emfm features`` command."""
    summary = extract_features(cfg)
    print(f"wrote {summary['output']}: {summary['channels']} channels on a {summary['grid']} grid "
          f"(stride {summary['stride']}), {summary['computed']} of {summary['blocks']} blocks computed")
    return summary
