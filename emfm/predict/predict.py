"""``emfm predict``: a fine-tuned model over a volume of any size, block by block, into OME-Zarr.

The sliding-window tiles form one grid over the whole region of interest. Each output block
blends exactly the tiles of that grid that touch it (reading the input they cover), so the
blocks join without seams: the result is the whole-region sliding window, computed out of core.
Tiles run in full batches of one fixed order; a batch is computed once, by the first block that needs
it, and read by the other blocks its tiles touch from the store's work group (:mod:`emfm.blockwise.tiles`):
the blocks stay independent, which is what makes the job resumable and distributable, and a local run
makes the forward passes of one whole-region sliding window (on Dask, neighbours running at the same
time may both compute a shared batch).
The blocks, their executors (here or on Dask) and the resumable output store are
:mod:`emfm.blockwise`'s.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr
from omegaconf import DictConfig

from emfm.blockwise.executor import Executor, executor_client, run_blocks
from emfm.blockwise.grid import Block, parse_roi
from emfm.blockwise.job import BlockJob, BlockRequest, cached, input_volume
from emfm.blockwise.store import (
    DTYPES,
    WORK,
    Progress,
    claim,
    create,
    create_array,
    encode,
    fingerprint,
    finish,
    placement,
    write,
)
from emfm.blockwise.tiles import SharedTiles, TileOrder
from emfm.checkpoints import load_segmenter
from emfm.data.ngff import Level, build_pyramid, image_attrs, labels_attrs
from emfm.data.volume import Volume
from emfm.errors import EmfmError
from emfm.inference import covering_tiles, in_precision, sliding_window
from emfm.models.segmenter import Segmenter
from emfm.predict import stitch

log = logging.getLogger(__name__)

Probabilities = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PredictRequest(BlockRequest):
    """What ``emfm predict`` is asked: the keys of every blockwise command and these."""

    tta: bool = False             # also predict the in-plane flips and average
    dtype: str = "uint8"          # uint8 (255 = probability 1) | float32 | float16
    pyramid: bool = False         # also downsampled levels, as ingest writes them
    instances: bool = False       # also labels/instances
    threshold: float = 0.5        # instances: probability threshold of the object interior
    instance_halo: int = 32       # instances: voxels of context read around each block when growing seeds


@dataclass(frozen=True, kw_only=True)
class Job(BlockJob):
    """Everything a block task of ``emfm predict`` needs."""

    tta: bool                             # also the in-plane flips, averaged
    dtype: str                            # how probabilities are stored (one of DTYPES)
    pyramid: bool                         # also downsampled levels, as ingest writes them

    @property
    def per_slice(self) -> bool:
        """A 2-D model over a 3-D volume: tiles and objects live in single z-slices."""
        return len(self.tile) == 3 and self.tile[0] == 1


def model_function(job: Job, module: Segmenter | None = None) -> Probabilities:
    """The probability function of the job's checkpoint, loaded once per process and job
    (:func:`~emfm.blockwise.job.cached`).

    ``module``: the checkpoint already loaded in this process, to use instead of loading it again.
    """
    return cached(job, lambda path: probabilities(job, load_segmenter(path)),
                  None if module is None else probabilities(job, module))


def probabilities(job: Job, model: Segmenter) -> Probabilities:
    """Tiles -> probabilities of ``model``, averaged over the in-plane flips with ``tta``."""

    net = in_precision(model.model, job.precision)

    def segment(x: torch.Tensor) -> torch.Tensor:
        out = model.activate(net(x).float())
        if job.tta:                             # mean over the in-plane flips
            for dims in ((-1,), (-2,), (-2, -1)):
                out = out + model.activate(net(x.flip(dims)).float()).flip(dims)
            out = out / 4
        return out

    # Tiles of a 2-D model over a 3-D volume are (B, C, 1, Y, X).
    return (lambda x: segment(x[:, :, 0]).unsqueeze(2)) if job.per_slice else segment


def predict_block(job: Job, index: Block) -> Block:
    """Predict, encode and write one output block, then mark it done."""
    region = job.grid.region(index)
    span, corners = covering_tiles(region, job.grid.shape, job.tile, job.overlap)
    read = functools.partial(read_input, job)
    tiles = SharedTiles.of_block(job.output, TileOrder.of(job.shape, job.tile, job.overlap, job.grid), index, span,
                                 read)
    probs = sliding_window(model_function(job), read(span), job.tile, job.overlap, job.batch_size, corners,
                           job.blend, run=tiles.run)
    inner = tuple(slice(r.start - s.start, r.stop - s.start) for r, s in zip(region, span))
    write(job.output, "0", (slice(None), *region), encode(probs[(slice(None), *inner)].numpy(), job.dtype))
    tiles.done(corners, Progress(job.output, "predict", job.grid), job.batch_size)
    return index


def read_input(job: Job, span: tuple[slice, ...]) -> torch.Tensor:
    """The model's input over ``span`` of the region: (1, *span), normalised."""
    volume = job.volume()
    return torch.from_numpy(volume.normalize(volume.read(tuple(slice(a + s.start, a + s.stop)
                                                               for (a, _), s in zip(job.roi, span)))))[None]


def make_job(request: PredictRequest, module: Segmenter, volume: Volume, threads: int | None) -> Job:
    """Check the settings against the model and the volume, and build the job."""
    patch = tuple(module.model.encoder.input_shape)
    if len(patch) == 3 and volume.ndim == 2:
        raise EmfmError(f"input={volume.path}: a 2-D image, but the checkpoint's model is 3-D (patch {list(patch)}); "
                        f"use a 2-D model or a 3-D volume")
    tile = (1, *patch) if volume.ndim == 3 and len(patch) == 2 else patch
    region = parse_roi(request.roi, volume.shape)
    shape = tuple(r.stop - r.start for r in region)
    block = tuple(request.block_shape) if request.block_shape else tuple(min(s, 4 * t) for s, t in zip(shape, tile))
    if len(block) != len(shape) or min(block) < 1:
        raise EmfmError(f"block_shape={list(block)}: expected {len(shape)} positive sizes for a {volume.ndim}-D volume")
    if request.dtype not in DTYPES:
        raise EmfmError(f"dtype={request.dtype}: expected one of {', '.join(DTYPES)}")
    return Job.of(request, volume, region, threads, tile=tuple(int(t) for t in tile),
                  block=tuple(int(b) for b in block), tta=bool(request.tta), dtype=str(request.dtype),
                  pyramid=bool(request.pyramid))


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
    request, executor = PredictRequest.from_config(cfg), Executor(cfg.executor, **cfg.dask)
    input_volume.cache_clear()                      # the input may have been rewritten since a previous call
    module = load_segmenter(request.checkpoint)
    volume = Volume(request.input, request.level, request.missing_chunks)
    job = make_job(request, module, volume, executor.threads(request.threads))
    instances = stitch.settings(module.hparams["target"]["kind"], request.threshold, request.instance_halo) \
        if request.instances else None
    return run_prediction(job, module, volume, instances, executor, overwrite=request.overwrite,
                          progress=request.progress)


def run_prediction(job: Job, module: Segmenter, volume: Volume, instances: stitch.Settings | None,
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
