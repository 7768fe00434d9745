"""``emfm predict``: a fine-tuned model over a volume of any size, block by block, into OME-Zarr.

The sliding-window tiles form one grid over the whole region of interest. Each output block
blends exactly the tiles of that grid that touch it (reading the input they cover), so the
blocks join without seams: the result is the whole-region sliding window, computed out of core.
Tiles straddling a block border are computed once per block they touch; that is the price of
independent blocks, which is what makes the job resumable and distributable.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from omegaconf import DictConfig

from emfm.data.ngff import Level, ZarrFormat, build_pyramid, check_zarr_format, image_attrs, labels_attrs
from emfm.data.volume import Volume
from emfm.errors import EmfmError
from emfm.finetune.segmentation import SegmentationModule, load_segmenter
from emfm.inference import covering_tiles, sliding_window
from emfm.paths import local_output, resolved
from emfm.predict import stitch
from emfm.predict.blocks import Block, BlockGrid, Executor, executor_client, parse_roi, run_blocks
from emfm.predict.store import (
    DTYPES,
    WORK,
    Progress,
    checkpoint_stamp,
    claim,
    create,
    create_array,
    encode,
    fingerprint,
    finish,
    placement,
    unchanged_checkpoint,
    write,
)

log = logging.getLogger(__name__)

Probabilities = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Job:
    """Everything a block task needs; small and picklable, so Dask workers receive it with each task."""

    checkpoint: str
    checkpoint_stamp: tuple[tuple[int, int], ...]     # its files' (mtime, size) as the run starts
    input: str
    output: str
    level: int
    roi: tuple[tuple[int, int], ...]      # (start, stop) per axis of the input volume
    tile: tuple[int, ...]                 # sliding-window tile over the region's axes (1 in z: a 2-D model)
    block: tuple[int, ...]
    overlap: float
    blend: str
    tta: bool
    batch_size: int
    dtype: str
    zarr_format: ZarrFormat = 3           # 3: zarr v3 / OME-Zarr 0.5; 2: zarr v2 / OME-Zarr 0.4
    pyramid: bool = False                 # also downsampled levels, as ingest writes them
    threads: int | None = None            # torch threads per task process (Dask workers); None: torch's default
    missing_chunks: str = "warn"          # what reading a chunk absent from the input does (emfm.data.volume)

    @property
    def grid(self) -> BlockGrid:
        return BlockGrid(tuple(b - a for a, b in self.roi), self.block)

    @property
    def per_slice(self) -> bool:
        """A 2-D model over a 3-D volume: tiles and objects live in single z-slices."""
        return len(self.tile) == 3 and self.tile[0] == 1


_CACHE: dict[Job, Probabilities] = {}


def model_function(job: Job, module: SegmentationModule | None = None) -> Probabilities:
    """The probability function of the job's checkpoint, loaded once per process (one model per Dask worker).

    Kept per job, whose stamp of the checkpoint files tells runs apart: the workers of a running scheduler
    (``executor.address``) serve one run after another, with other settings or a retrained ``last.ckpt``.
    ``module``: the checkpoint already loaded in this process, to use instead of loading it again.
    """
    if module is not None or job not in _CACHE:
        if job.threads:
            torch.set_num_threads(job.threads)
        model = module if module is not None else load_segmenter(unchanged_checkpoint(job.checkpoint,
                                                                                      job.checkpoint_stamp))

        def segment(x: torch.Tensor) -> torch.Tensor:
            out = model.activate(model.model(x))
            if job.tta:                             # mean over the in-plane flips
                for dims in ((-1,), (-2,), (-2, -1)):
                    out = out + model.activate(model.model(x.flip(dims))).flip(dims)
                out = out / 4
            return out

        _CACHE.clear()
        # Tiles of a 2-D model over a 3-D volume are (B, C, 1, Y, X).
        _CACHE[job] = (lambda x: segment(x[:, :, 0]).unsqueeze(2)) if job.per_slice else segment
    return _CACHE[job]


@functools.lru_cache(maxsize=1)
def input_volume(path: str, level: int, missing_chunks: str) -> Volume:
    """The input, opened once per process (its metadata and stored normalisation are read once)."""
    return Volume(path, level, missing_chunks)


def predict_block(job: Job, index: Block) -> Block:
    """Predict, encode and write one output block, then mark it done."""
    region = job.grid.region(index)
    span, corners = covering_tiles(region, job.grid.shape, job.tile, job.overlap)
    volume = input_volume(job.input, job.level, job.missing_chunks)
    raw = volume.read(tuple(slice(a + s.start, a + s.stop) for (a, _), s in zip(job.roi, span)))
    image = torch.from_numpy(volume.normalize(raw))[None]
    probs = sliding_window(model_function(job), image, job.tile, job.overlap, job.batch_size, corners, job.blend)
    inner = tuple(slice(r.start - s.start, r.stop - s.start) for r, s in zip(region, span))
    write(job.output, "0", (slice(None), *region), encode(probs[(slice(None), *inner)].numpy(), job.dtype))
    Progress(job.output, "predict", job.grid).mark(index)
    return index


def make_job(module: SegmentationModule, volume: Volume, *, checkpoint: str, output: str, roi: Any,
             block_shape: Any, overlap: float, blend: str, tta: bool, batch_size: int, dtype: str,
             zarr_format: int, pyramid: bool, threads: int | None) -> Job:
    """Check the settings against the model and the volume, and build the job."""
    patch = tuple(module.model.encoder.input_shape)
    if len(patch) == 3 and volume.ndim == 2:
        raise EmfmError(f"input={volume.path}: a 2-D image, but the checkpoint's model is 3-D (patch {list(patch)}); "
                        f"use a 2-D model or a 3-D volume")
    tile = (1, *patch) if volume.ndim == 3 and len(patch) == 2 else patch
    region = parse_roi(roi, volume.shape)
    shape = tuple(r.stop - r.start for r in region)
    block = tuple(block_shape) if block_shape else tuple(min(s, 4 * t) for s, t in zip(shape, tile))
    if len(block) != len(shape) or min(block) < 1:
        raise EmfmError(f"block_shape={list(block)}: expected {len(shape)} positive sizes for a {volume.ndim}-D volume")
    if dtype not in DTYPES:
        raise EmfmError(f"dtype={dtype}: expected one of {', '.join(DTYPES)}")
    if batch_size < 1:
        raise EmfmError(f"batch_size={batch_size}: expected at least 1 tile per forward pass")
    return Job(checkpoint=str(Path(checkpoint).resolve()), checkpoint_stamp=checkpoint_stamp(checkpoint),
               input=resolved(volume.path),
               output=str(local_output("output", output)), level=volume.level,
               roi=tuple((r.start, r.stop) for r in region),
               tile=tuple(int(t) for t in tile), block=tuple(int(b) for b in block), overlap=float(overlap),
               blend=str(blend), tta=bool(tta), batch_size=int(batch_size), dtype=str(dtype),
               zarr_format=check_zarr_format(zarr_format), pyramid=bool(pyramid), threads=threads,
               missing_chunks=volume.missing_chunks)


def create_output(job: Job, stamp: dict[str, Any], channels: int, volume: Volume, instances: bool) -> None:
    """The new output store: probabilities ``0`` (c, *region) (and its pyramid) and, for instances, the label
    image ``labels/instances`` and the seeds of the first pass."""
    spatial = volume.axes
    plan, origin = levels(job, volume)
    attrs = image_attrs("probabilities", "c" + spatial, volume.units, plan, origin, job.zarr_format, is_label=False)

    def layout(root: zarr.Group) -> None:
        for i, level in enumerate(plan):
            create_array(root, str(i), (channels, *level.shape), (channels, *job.block), job.dtype, "c" + spatial)
        if instances:
            labels = root.create_group("labels")
            labels.attrs.update(labels_attrs(["instances"], job.zarr_format))
            group = labels.create_group("instances")
            group.attrs.update(image_attrs("instances", spatial, volume.units, plan, origin, job.zarr_format,
                                           is_label=True, label={"source": {"image": "../../"}}))
            for i, level in enumerate(plan):
                create_array(group, str(i), level.shape, job.block, "uint64", spatial)
            create_array(root.create_group(WORK), "seeds", job.grid.shape, job.block, "uint64", spatial)

    create(job.output, attrs | {"emfm": {"kind": "prediction", "predict": stamp, "complete": False}}, "output", layout,
           job.zarr_format)


def levels(job: Job, volume: Volume) -> tuple[list[Level], list[float]]:
    """(levels, origin) of the output: one level, or with ``pyramid`` as many as ingest would write."""
    return placement(volume, job.grid.shape, [a for a, _ in job.roi], None if job.pyramid else 1)


def write_pyramid(job: Job, volume: Volume, instances: bool) -> None:
    """Levels 1.. of the probabilities (mean pooling) and instances (stride pick) from level 0, as ingest does."""
    plan, _ = levels(job, volume)
    images = [("", False, True)] + ([("/labels/instances", True, False)] if instances else [])
    for path, is_label, channels in images:
        arrays = [zarr.open_array(f"{job.output}{path}/{i}", mode="r+") for i in range(len(plan))]
        build_pyramid(arrays, plan, is_label, channels)


def predict(cfg: DictConfig) -> dict[str, Any]:
    """The ``emfm predict`` command: probabilities (and optionally instances) of a volume into OME-Zarr."""
    executor = Executor(cfg.executor, **cfg.dask)
    input_volume.cache_clear()                      # the input may have been rewritten since a previous call
    module = load_segmenter(cfg.checkpoint)
    volume = Volume(cfg.input, cfg.level, cfg.missing_chunks)
    job = make_job(module, volume, checkpoint=cfg.checkpoint, output=cfg.output, roi=cfg.roi,
                   block_shape=cfg.block_shape, overlap=cfg.overlap, blend=cfg.blend, tta=cfg.tta,
                   batch_size=cfg.batch_size, dtype=cfg.dtype, zarr_format=cfg.zarr_format, pyramid=cfg.pyramid,
                   threads=executor.threads(cfg.threads))
    instances = stitch.settings(module.hparams["target"]["kind"], cfg.threshold, cfg.instance_halo) \
        if cfg.instances else None
    return run_prediction(job, module, volume, instances, executor, overwrite=cfg.overwrite, progress=cfg.progress)


def run_prediction(job: Job, module: SegmentationModule, volume: Volume, instances: stitch.Settings | None,
                   executor: Executor, overwrite: bool, progress: bool) -> dict[str, Any]:
    """Create (or continue) the output of ``job``, predict its pending blocks, then stitch the instances."""
    stamp = fingerprint(job, ("threads", "batch_size", "missing_chunks"),
                        instances=None if instances is None else instances.stamp())
    complete = claim(job.output, "predict", stamp, overwrite, inputs={"input": job.input, "checkpoint": job.checkpoint},
                     describe="prediction", replace_same=True)
    if complete is None:
        create_output(job, stamp, module.target.channels, volume, instances is not None)
    summary: dict[str, Any] = {"output": job.output, "blocks": len(job.grid), "seconds": {}}
    if complete:
        log.info("%s is already a complete prediction with these settings; nothing to do", job.output)
        return {**summary, "computed": 0}
    with executor_client(executor) as client:
        if client is None:
            model_function(job, module)             # this process predicts: no second load
        pending = Progress(job.output, "predict", job.grid).pending()
        summary["computed"] = len(pending)
        summary["seconds"]["predict"] = run_blocks(predict_block, pending, job, client=client, desc="predict",
                                                   progress=progress)
        if instances is not None:
            stitching = stitch.InstanceJob(job.output, job.grid, job.per_slice, instances)
            summary["seconds"].update(stitch.instances(stitching, client, progress))
    if job.pyramid:
        write_pyramid(job, volume, instances is not None)
    finish(job.output)
    voxels = np.prod(job.grid.shape) * len(pending) / max(len(job.grid), 1)
    summary["voxels_per_second"] = float(voxels / max(summary["seconds"]["predict"], 1e-9))
    log.info("wrote %s: %d of %d blocks computed, %.0f voxels/s", job.output, len(pending), len(job.grid),
             summary["voxels_per_second"])
    return summary
