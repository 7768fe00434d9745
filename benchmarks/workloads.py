"""What the benchmarks time: emfm's own work, as its commands do it, shared by every benchmark that times it.

A pretraining step as `emfm pretrain` runs it (``ours``) and the same module in a plain loop (``bare``),
`emfm predict` from the model load to the finished store, `emfm cluster` from its start to its map, and the
inputs they run on (a tiny fine-tuned checkpoint, synthetic volumes grown by mirroring).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from benchmarks.harness import WARMUP, Clock, Result, Run, config, peak_rss_mib
from emfm import run
from emfm.allocator import keep_freed_memory, user_chose_allocator
from emfm.data.ingest import write_ome_zarr
from emfm.data.patches import RandomPatches
from emfm.data.sources import Source
from emfm.data.synthetic import SyntheticEM, make_synthetic_em, save_synthetic
from emfm.data.volume import Volume
from emfm.models.segmenter import Segmenter
from emfm.pretrain.base import PretrainModule

ROOT = Path(__file__).resolve().parents[1]      # the repository: where `benchmarks` imports from
CLIP = 1.0  # configs/trainer/default.yaml gradient_clip_val
K = 8       # clusters of the timed `emfm cluster`


# --- training step ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """One model and command: its config overrides, batch size and timed steps."""

    overrides: tuple[str, ...]
    batch: int
    steps: int
    label: str
    command: str = "pretrain"


class StepTimer(pl.Callback):
    """A :class:`Clock` on the training batches."""

    def __init__(self) -> None:
        self.clock = Clock()

    def on_train_batch_start(self, *args: Any) -> None:
        self.clock.start()

    def on_train_batch_end(self, *args: Any) -> None:
        self.clock.end()


def overrides(setup: Setup, volume: Path, run_dir: Path, batch: int, steps: int, workers: int,
              patches_per_epoch: int | None) -> list[str]:
    """The setup's overrides plus data, batch and a window free of validation and images."""
    max_steps = WARMUP + steps + 1  # + 1: the last step (its image, end of training) is not timed
    epoch = [] if patches_per_epoch is None else [f"data.patches_per_epoch={patches_per_epoch}"]
    return [*setup.overrides, f"data.volumes=[{volume}]", f"data.batch_size={batch}",
            f"data.num_workers={workers}", f"paths.output_dir={run_dir}", "trainer.accelerator=cpu",
            f"trainer.max_steps={max_steps}", f"trainer.val_check_interval={max_steps + 1}",
            f"callbacks.reconstructions.every_n_steps={max_steps + 1}", *epoch]


def ours(overrides: list[str], steps: int, command: str = "pretrain") -> Run:
    """`emfm pretrain` (or `emfm finetune`) as users run it, timed per batch."""
    cfg = config(overrides, command)
    datamodule, module, trainer, _ = run.prepare(cfg, cfg.objective if command == "pretrain" else cfg.module)
    timer = StepTimer()
    trainer.callbacks.append(timer)  # type: ignore[attr-defined]  # last: each end stamp follows every other callback
    trainer.fit(module, datamodule=datamodule)
    return timer.clock.run(cfg.data.batch_size, steps)


def bare(overrides: list[str], steps: int, channels_last: bool = False, bf16: bool = False) -> Run:
    """The same module, batch shape and optimiser in a plain loop, in the default memory layout (the reference, even
    where emfm's training puts a CNN in channels-last); opt-in: module and batch in channels-last memory
    (``channels_last``), the loss under CPU bfloat16 autocast (``bf16``, which emfm's training does not do on a CPU)."""
    cfg, module, images = bare_parts([*overrides, "trainer.channels_last=false"])
    if channels_last:
        layout = torch.channels_last if images.ndim == 4 else torch.channels_last_3d
        module, images = module.to(memory_format=layout), images.contiguous(memory_format=layout)
    return bare_loop(cfg, module, images, steps, bf16)


def bare_loop(cfg: DictConfig, module: PretrainModule, images: torch.Tensor, steps: int, bf16: bool = False) -> Run:
    """``plain_loop`` over the module's ``compute_loss`` on ``images`` with the config's optimiser."""

    def loss() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return module.compute_loss(images)["loss"]

    return plain_loop(loss, module, optimizer(module, cfg), steps, cfg.data.batch_size)


def bare_parts(overrides: list[str]) -> tuple[DictConfig, PretrainModule, torch.Tensor]:
    """The config, the module in training mode and one batch of real patches of the configured stream."""
    cfg = config(overrides)
    datamodule, module, _, _ = run.prepare(cfg, cfg.objective)
    return cfg, cast(PretrainModule, module.train()), real_batch(cfg, datamodule)


def real_batch(cfg: DictConfig, datamodule: Any = None) -> torch.Tensor:
    """The first batch of the configured patch stream (the same in every process)."""
    datamodule = datamodule or run.build(cfg.data)
    return RandomPatches(datamodule.patches(), cfg.data.batch_size, batches=1).batch(0)


def optimizer(model: torch.nn.Module, cfg: DictConfig) -> torch.optim.AdamW:
    """AdamW over every parameter with the objective config's lr / betas / weight decay."""
    hp = cfg.objective
    return torch.optim.AdamW(model.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)


def plain_loop(loss: Callable[[], torch.Tensor], model: torch.nn.Module, optim: torch.optim.Optimizer,
               steps: int, batch: int) -> Run:
    """WARMUP + ``steps`` steps of loss, zero_grad, backward, gradient clipping and ``optim.step``, timed."""
    clock = Clock()
    for _ in range(WARMUP + steps):
        clock.start()
        value = loss()
        optim.zero_grad()
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optim.step()
        clock.end()
    return clock.run(batch, steps)


def trained_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def bench_all(bench: Callable[[str, Path, argparse.Namespace], Any], args: argparse.Namespace) -> dict[str, Any]:
    """``bench(name, volume, args)`` of every config in ``args.configs`` on one synthetic 64x256x256 OME-Zarr."""
    with tempfile.TemporaryDirectory() as tmp:
        volume = save_synthetic(make_synthetic_em((64, 256, 256)), Path(tmp) / "bench.zarr")
        return {name: bench(name, volume, args) for name in args.configs}


# --- prediction and clustering ----------------------------------------------------------------------------------

MODEL = ["model=vit2d", "model.name=vit_tiny_patch16_224", "model.patch_size=16", "data.patch_shape=[128,128]"]


def seeded_segmenter(overrides: list[str]) -> Segmenter:
    """The fine-tuning config's network (with ``overrides``) and its activation, seeded random weights, in eval mode:
    the same in every process."""
    cfg = config(overrides, "finetune")
    torch.manual_seed(0)
    parts = [OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "head", "target")]
    return Segmenter(*parts).eval()  # type: ignore[arg-type]


def make_checkpoint(work: Path, volume: Path) -> Path:
    """A fine-tuning checkpoint of a ViT-Ti/16 UNETR (its weights do not matter for speed)."""
    cfg = config([*MODEL, f"data.raw={volume}", f"data.labels={volume}/labels/membranes", "data.labeled_slices=[0]",
                  "trainer.max_steps=1", "logger=none", "data.num_workers=0", "data.batch_size=2",
                  "callbacks.progress_bar=null", "+trainer.limit_val_batches=0",
                  "callbacks.model_checkpoint.monitor=null", f"paths.output_dir={work / 'finetune'}"], "finetune")
    run.finetune(cfg)
    return work / "finetune" / "checkpoints" / "last.ckpt"


def timed_predict(checkpoint: Path, volume: Path, output: Path, batch: int, blend: str = "linear",
                  dtype: str = "float16", precision: str = "auto") -> dict[str, Any]:
    """`emfm predict` in this process, timed from the model load to the finished store: seconds in all and in
    the block phase, the process's peak RSS and how it allocated (the command's :mod:`emfm.allocator` setting, made
    here as the command makes it). The command's module is imported before the clock starts, as the peers' libraries
    are (until 2026-12-07 its import, 0.15-0.2 s, was timed on emfm's side alone)."""
    import emfm.predict.predict  # noqa: F401  (imported on first use by the command)

    kept = keep_freed_memory()                                              # as the command does
    cfg = config([f"checkpoint={checkpoint}", f"input={volume}", f"output={output}", "overwrite=true",
                  "progress=false", f"batch_size={batch}", f"dtype={dtype}", f"blend={blend}",
                  f"precision={precision}", f"paths.output_dir={output}.run"], "predict")
    start = time.perf_counter()
    out = run.predict(cfg)
    return {"seconds": time.perf_counter() - start, "blocks": out["blocks"],
            "block_seconds": out["seconds"]["predict"], "rss_mib": peak_rss_mib(), "freed_memory": allocator(kept)}


def emfm_predict(checkpoint: Path, volume: Path, output: Path, batch: int, blend: str = "linear",
                 dtype: str = "float16") -> dict[str, float]:
    """``timed_predict`` in a fresh interpreter, as a user starts `emfm predict`."""
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.workloads import "
            f"timed_predict; print(json.dumps(timed_predict(*{[str(checkpoint), str(volume), str(output)]!r}, "
            f"{batch}, {blend!r}, {dtype!r})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def emfm_cluster(checkpoint: Path, volume: Path, output: Path, precision: str = "auto") -> Result:
    """``emfm cluster`` as users run it (no pictures), timed from the command's start to its map; its modules are
    imported before, as the notebook's are."""
    import sklearn.cluster  # noqa: F401  (imported on first use by the command)

    import emfm.explore.cluster  # noqa: F401

    kept = keep_freed_memory()                                              # as the command does
    cfg = config([f"checkpoint={checkpoint}", f"input={volume}", f"output={output}", f"k={K}", "pictures=null",
                  "progress=false", f"precision={precision}", f"paths.output_dir={output}.run"], "cluster")
    start = time.perf_counter()
    run.cluster(cfg)
    return Result(math.prod(Volume(volume).shape) / (time.perf_counter() - start), peak_rss_mib(),
                  {"vectors k-means is fitted on": f"a sample of {cfg.sample}", "projection": f"PCA to {cfg.pca}",
                   "k-means": f"scikit-learn, k={K}, 3 inits", "features": "float16 store on disk",
                   "map on the voxel grid": "cluster scores interpolated linearly",
                   "forward passes": forward_precision(precision), "freed memory": allocator(kept)})


def allocator(kept: bool = False) -> str:
    """How an arm's process allocated memory (``kept``: by emfm.allocator), for the benchmarks' tables."""
    if kept:
        return "kept for reuse (emfm.allocator)"
    return "as the environment says (LD_PRELOAD / MALLOC_*)" if user_chose_allocator() \
        else "the C library's defaults"


def forward_precision(setting: str) -> str:
    """How the forward passes ran, for the benchmarks' tables."""
    from emfm.inference import inference_precision

    return "bf16 autocast" if inference_precision(setting) == "bf16" else "float32"


# --- volumes ----------------------------------------------------------------------------------------------------


def mirrored(base: np.ndarray, shape: tuple[int, ...], voxel_size: Sequence[float]) -> Source:
    """A lazy volume of ``shape`` tiling ``base`` with mirrored copies (no seams): large sizes cheaply."""

    def read(key: tuple[slice, ...]) -> np.ndarray:
        index = []
        for k, n, b in zip(key, shape, base.shape):
            i = np.arange(*k.indices(n)) % (2 * b)
            index.append(np.where(i < b, i, 2 * b - 1 - i))
        return base[np.ix_(*index)]

    return Source("mirrored synthetic EM", shape, base.dtype, read, voxel_size)


def grown(synthetic: SyntheticEM, shape: tuple[int, ...], work: Path) -> Path:
    """``synthetic`` mirrored out to ``shape`` in a zarr under ``work``, written slab by slab (never whole in
    memory); made once per shape."""
    path = work / f"vol_{'x'.join(map(str, shape))}.zarr"
    if not path.exists():
        write_ome_zarr(mirrored(synthetic.raw, shape, synthetic.voxel_size), path)
    return path
