"""``emfm predict``: a fine-tuned model over a volume of any size, block by block, into OME-Zarr.

The sliding-window tiles form one grid over the whole region of interest. Each output block
blends exactly the tiles of that grid that touch it (reading the input they cover), so the
blocks join without seams: the result is the whole-region sliding window, computed out of core.
Tiles straddling a block border are computed once per block they touch; that is the price of
independent blocks, which is what makes the job resumable and distributable.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec

from emfm.data.volume import Volume
from emfm.errors import EmfmError
from emfm.evaluation.evaluate import load_segmenter
from emfm.inference import covering_tiles, sliding_window
from emfm.paths import refuse_overlap
from emfm.predict.blocks import (
    Block,
    BlockGrid,
    Progress,
    executor_client,
    parse_roi,
    run_blocks,
)

log = logging.getLogger(__name__)

DTYPES = ("float16", "uint8")
PROGRESS, WORK = "_progress", "_work"    # removed when the prediction is complete


@dataclass(frozen=True)
class Job:
    """Everything a block task needs; small and picklable, so Dask workers receive it with each task."""

    checkpoint: str
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
    threads: int | None = None            # torch threads per task process (Dask workers); None: torch's default

    @property
    def grid(self) -> BlockGrid:
        return BlockGrid(tuple(b - a for a, b in self.roi), self.block)

    @property
    def per_slice(self) -> bool:
        """A 2-D model over a 3-D volume: tiles and objects live in single z-slices."""
        return len(self.tile) == 3 and self.tile[0] == 1


_CACHE: dict[tuple[str, int | None], Any] = {}


def model_function(job: Job, module: Any = None) -> Any:
    """The probability function of the job's checkpoint, loaded once per process (one model per Dask worker).

    ``module``: the checkpoint already loaded in this process, to use instead of loading it again.
    """
    key = (job.checkpoint, job.threads)
    if module is not None or key not in _CACHE:
        if job.threads:
            torch.set_num_threads(job.threads)
        module = module if module is not None else load_segmenter(job.checkpoint)

        def segment(x: torch.Tensor) -> torch.Tensor:
            out = module.activate(module.model(x))
            if job.tta:                             # mean over the in-plane flips
                for dims in ((-1,), (-2,), (-2, -1)):
                    out = out + module.activate(module.model(x.flip(dims))).flip(dims)
                out = out / 4
            return out

        _CACHE.clear()
        # Tiles of a 2-D model over a 3-D volume are (B, C, 1, Y, X).
        _CACHE[key] = (lambda x: segment(x[:, :, 0]).unsqueeze(2)) if job.per_slice else segment
    return _CACHE[key]


@functools.lru_cache(maxsize=1)
def input_volume(path: str, level: int) -> Volume:
    """The input, opened once per process (its metadata and stored normalisation are read once)."""
    return Volume(path, level)


def predict_block(job: Job, index: Block) -> Block:
    """Predict, encode and write one output block, then mark it done."""
    region = job.grid.region(index)
    span, corners = covering_tiles(region, job.grid.shape, job.tile, job.overlap)
    volume = input_volume(job.input, job.level)
    raw = volume.read(tuple(slice(a + s.start, a + s.stop) for (a, _), s in zip(job.roi, span)))
    image = torch.from_numpy(volume.normalize(raw))[None]
    probs = sliding_window(model_function(job), image, job.tile, job.overlap, job.batch_size, corners, job.blend)
    inner = tuple(slice(r.start - s.start, r.stop - s.start) for r, s in zip(region, span))
    data = encode(probs[(slice(None), *inner)].numpy(), job.dtype)
    write(job, "0", (slice(None), *region), data)
    Progress(open_output(job), "predict", job.grid).mark(index)
    return index


def encode(probs: np.ndarray, dtype: str) -> np.ndarray:
    """float16 as is, or uint8 with 255 = probability 1."""
    if dtype == "uint8":
        return np.rint(np.clip(probs, 0, 1) * 255).astype(np.uint8)
    return probs.astype(np.float16)


def decode(data: np.ndarray) -> np.ndarray:
    return data.astype(np.float32) / 255 if data.dtype == np.uint8 else data.astype(np.float32)


def open_output(job: Job, path: str = PROGRESS) -> zarr.Group:
    return zarr.open_group(f"{job.output}/{path}", mode="a")


def write(job: Job, path: str, key: tuple[slice, ...], data: np.ndarray) -> None:
    """Write into an array of the output; a full or read-only disk is named, finished blocks stay valid."""
    try:
        zarr.open_array(f"{job.output}/{path}", mode="r+")[key] = data
    except OSError as e:
        raise EmfmError(f"output={job.output}: cannot write {path} {key} ({e.strerror or e}); finished blocks "
                        f"are kept, rerun the same command to continue") from None


def checkpoint_digest(path: str) -> str:
    """sha256 of a checkpoint file, or of every file of an export directory."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
    for file in files:
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def make_job(cfg: Any) -> tuple[Job, Any, Volume]:
    """Check the inputs against each other and build the job (the model is loaded here once to read its shape)."""
    module = load_segmenter(cfg.checkpoint)
    volume = Volume(cfg.input, cfg.get("level", 0))
    patch = tuple(module.model.encoder.input_shape)
    if len(patch) == 3 and volume.ndim == 2:
        raise EmfmError(f"input={cfg.input}: a 2-D image, but the checkpoint's model is 3-D (patch {list(patch)}); "
                        f"use a 2-D model or a 3-D volume")
    tile = (1, *patch) if volume.ndim == 3 and len(patch) == 2 else patch
    region = parse_roi(cfg.get("roi"), volume.shape)
    shape = tuple(r.stop - r.start for r in region)
    block = tuple(cfg.block_shape) if cfg.get("block_shape") else tuple(min(s, 4 * t) for s, t in zip(shape, tile))
    if len(block) != len(shape) or min(block) < 1:
        raise EmfmError(f"block_shape={list(block)}: expected {len(shape)} positive sizes for a {volume.ndim}-D volume")
    if cfg.dtype not in DTYPES:
        raise EmfmError(f"dtype={cfg.dtype}: expected one of {', '.join(DTYPES)}")
    job = Job(checkpoint=str(Path(cfg.checkpoint).resolve()), input=str(Path(cfg.input).resolve()),
              output=str(Path(cfg.output).resolve()), level=int(cfg.get("level", 0)),
              roi=tuple((r.start, r.stop) for r in region), tile=tuple(int(t) for t in tile),
              block=tuple(int(b) for b in block), overlap=float(cfg.overlap), blend=str(cfg.blend), tta=bool(cfg.tta),
              batch_size=int(cfg.batch_size), dtype=str(cfg.dtype),
              threads=cfg.dask.threads_per_worker if cfg.executor == "dask" else cfg.get("threads"))
    return job, module, volume


def fingerprint(job: Job, instances: dict[str, Any] | None) -> dict[str, Any]:
    """What makes two predictions the same: resume only into an output with the same fingerprint."""
    settings = {k: v for k, v in asdict(job).items() if k not in ("output", "threads", "batch_size")}
    return json.loads(json.dumps({**settings, "checkpoint_sha256": checkpoint_digest(job.checkpoint),
                                  "instances": instances}))


def prepare_output(job: Job, stamp: dict[str, Any], channels: int, volume: Volume, overwrite: bool) -> bool:
    """Create the output store, or check that the existing one continues this prediction; True if complete."""
    refuse_overlap("output", job.output, {"input": job.input, "checkpoint": job.checkpoint})
    out = Path(job.output)
    if out.exists():
        try:
            previous = dict(zarr.open_group(str(out), mode="r").attrs).get("emfm", {})
        except (OSError, ValueError):      # not a zarr group: zarr's errors derive from these
            previous = {}
        same = previous.get("predict") == stamp
        if same and not overwrite:
            return bool(previous.get("complete"))
        if not overwrite:
            what = ("a different, complete prediction" if previous.get("complete") else
                    "a different, unfinished prediction" if "predict" in previous else "something that is not an emfm prediction")
            raise EmfmError(f"output={out} already holds {what}; choose another output or set overwrite=true")
        shutil.rmtree(out)
    try:
        root = zarr.open_group(str(out), mode="w-")
        spatial = volume.axes
        vs = list(volume.voxel_size or (1.0,) * volume.ndim)
        root.attrs.update(ome_attrs("probabilities", "c" + spatial, [1.0, *vs], [0.0, *(a * v for (a, _), v in zip(job.roi, vs))])
                          | {"emfm": {"kind": "prediction", "predict": stamp, "complete": False}})
        create_array(root, "0", (channels, *job.grid.shape), (channels, *job.block), job.dtype, "c" + spatial)
        root.create_group(PROGRESS)
        if stamp["instances"] is not None:
            labels = root.create_group("labels")
            labels.attrs.update({"ome": {"version": "0.5", "labels": ["instances"]}})
            group = labels.create_group("instances")
            attrs = ome_attrs("instances", spatial, vs, [a * v for (a, _), v in zip(job.roi, vs)])
            attrs["ome"]["image-label"] = {"source": {"image": "../../"}}
            group.attrs.update(attrs)
            create_array(group, "0", job.grid.shape, job.block, "uint64", spatial)
            create_array(root.create_group(WORK), "seeds", job.grid.shape, job.block, "uint64", spatial)
    except OSError as e:
        raise EmfmError(f"output={out}: cannot create the output ({e.strerror or e})") from None
    return False


def ome_attrs(name: str, axes: str, scale: list[float], translation: list[float]) -> dict[str, Any]:
    kinds = [{"name": a, "type": "channel"} if a == "c" else {"name": a, "type": "space", "unit": "nanometer"}
             for a in axes]
    transforms = [{"type": "scale", "scale": scale}, {"type": "translation", "translation": translation}]
    return {"ome": {"version": "0.5", "multiscales": [
        {"name": name, "axes": kinds, "datasets": [{"path": "0", "coordinateTransformations": transforms}]}]}}


def create_array(group: zarr.Group, name: str, shape: tuple, chunks: tuple, dtype: str, axes: str) -> None:
    group.create_array(name, shape=shape, chunks=tuple(min(c, s) for c, s in zip(chunks, shape)), dtype=dtype,
                       fill_value=0, compressors=ZstdCodec(level=3), dimension_names=tuple(axes))


def finish(job: Job) -> None:
    """Mark the output complete and drop the bookkeeping (done last, so an incomplete store never looks complete)."""
    root = zarr.open_group(job.output, mode="r+")
    emfm = dict(root.attrs["emfm"])
    root.attrs["emfm"] = {**emfm, "complete": True}
    for name in (PROGRESS, WORK):
        shutil.rmtree(Path(job.output) / name, ignore_errors=True)


def predict(cfg: Any) -> dict[str, Any]:
    """The ``emfm predict`` command: probabilities (and optionally instances) of a volume into OME-Zarr."""
    from emfm.predict import stitch

    input_volume.cache_clear()                      # the input may have been rewritten since a previous call
    job, module, volume = make_job(cfg)
    instances = stitch.settings(cfg, dict(module.hparams.target)) if cfg.instances else None
    complete = prepare_output(job, fingerprint(job, instances), module.target.channels, volume, cfg.overwrite)
    summary: dict[str, Any] = {"output": job.output, "blocks": len(job.grid), "seconds": {}}
    if complete:
        log.info("%s is already a complete prediction with these settings; nothing to do", job.output)
        return {**summary, "computed": 0}
    with executor_client(cfg) as client:
        if client is None:
            model_function(job, module)             # this process predicts: no second load
        pending = Progress(open_output(job), "predict", job.grid).pending(job.grid)
        summary["computed"] = len(pending)
        summary["seconds"]["predict"] = run_blocks(predict_block, pending, job, executor=cfg.executor, client=client,
                                                   desc="predict", progress=cfg.progress)
        if instances is not None:
            summary["seconds"].update(stitch.instances(job, instances, cfg.executor, client, cfg.progress))
    finish(job)
    voxels = np.prod(job.grid.shape) * len(pending) / max(len(job.grid), 1)
    summary["voxels_per_second"] = float(voxels / max(summary["seconds"]["predict"], 1e-9))
    print(f"wrote {job.output}: {len(pending)} of {len(job.grid)} blocks computed, "
          f"{summary['voxels_per_second']:.0f} voxels/s")
    return summary
