"""How much does our training machinery cost? `emfm pretrain` throughput vs a bare PyTorch loop.

For a 2-D ViT (MAE) and a 3-D CNN (MIM) on CPU, two arms train the same model at the same batch
size, and the script prints ours / bare in images/s (target: >= 0.95).

ours: what `emfm pretrain` runs. The real Hydra config is composed, `emfm.run.prepare_pretraining`
builds the PatchDataModule (zstd-compressed synthetic OME-Zarr on disk, read by DataLoader
workers, blank filter, normalisation), the PretrainModule and the Lightning Trainer with the
default callbacks and loggers (CSV + TensorBoard, checkpointing, LR monitor, progress bar,
log_every_n_steps=10, gradient clipping), and `trainer.fit` runs. A callback stamps
`time.perf_counter()` at the end of every batch, after every other callback, so the time between
stamps holds everything: waiting for data, augmentation, the step, logging, the progress bar.

bare: the same module built from the same config, `module.train()`, AdamW with the config's
lr / betas / weight decay, one fixed in-memory batch of the same shape, and per step
`compute_loss` (augmentation included, as in ours) + zero_grad + backward +
`clip_grad_norm_(1.0)` (the trainer's gradient_clip_val) + `step`.

Both arms skip the same warm-up steps and time the same number of steps, each in a fresh process
(spawned, so one arm's heap or threads do not carry into the next) with the same torch thread
count. Arms alternate (bare, ours with each worker count, bare, ..., bare) to spread machine
noise over both; the table gives the mean and the min-max of each arm.

Periodic costs are kept out of the timed window, since they are not per-step costs: validation
(`trainer.val_check_interval`) and the reconstruction images (`callbacks.reconstructions.every_n_steps`)
are pushed past the last step, and the window ends one step before `max_steps` (Lightning's
end-of-training work). Epoch ends are not: the training DataLoader restarts its workers every
`data.patches_per_epoch` patches (8192 by default); `--patches-per-epoch` shrinks the epoch so
that restart cost shows up in the window.

    python scripts/bench_train.py --workers 1 2            # both configs, 1 and 2 loader workers
    python scripts/bench_train.py --configs vit2d --steps 20 --batch 16
    python scripts/bench_train.py --configs cnn3d --patches-per-epoch 80
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from emfm.data.patches import RandomPatches
from emfm.data.synthetic import make_synthetic_em, save_synthetic
from emfm.run import prepare_pretraining

WARMUP = 3  # steps not timed: worker start-up, first allocations, the step-1 reconstruction image
CLIP = 1.0  # configs/trainer/default.yaml gradient_clip_val


@dataclass(frozen=True)
class Setup:
    """One model/objective: its config overrides, batch size and timed steps."""

    overrides: tuple[str, ...]
    batch: int
    steps: int
    label: str


SETUPS = {
    "vit2d": Setup(("model=vit2d", "objective=mae", "model.name=vit_small_patch16_224",
                    "data.patch_shape=[128,128]"), batch=32, steps=20,
                   label="ViT-S/16 MAE, 128x128"),
    "cnn3d": Setup(("model=cnn3d", "objective=mim", "model.name=resnet10_3d",
                    "data.patch_shape=[16,64,64]"), batch=4, steps=12,
                   label="ResNet10-3D MIM, 16x64x64"),
}


@dataclass(frozen=True)
class Run:
    """One timed run: images/s, seconds per step spent outside the step (ours: waiting for the
    next batch and Lightning's bookkeeping between batches), peak RSS and torch threads."""

    rate: float
    between: float
    rss_mib: float
    threads: int


@dataclass
class Arm:
    """The runs of one arm."""

    runs: list[Run] = field(default_factory=list)

    def mean(self) -> float:
        return statistics.mean(r.rate for r in self.runs)

    def summary(self) -> str:
        rates = [r.rate for r in self.runs]
        return f"{self.mean():6.2f} ({min(rates):.2f}-{max(rates):.2f})"


class StepTimer(pl.Callback):
    """``perf_counter`` at the start and end of every training batch."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, *args: Any) -> None:
        self.ends.append(time.perf_counter())


def timed(ends: list[float], starts: list[float], batch: int) -> Run:
    """The run from the end of the last warm-up step (``ends[WARMUP - 1]``) to the last stamp."""
    steps = len(ends) - WARMUP
    between = sum(s - e for s, e in zip(starts[WARMUP:], ends[WARMUP - 1 :])) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return Run(steps * batch / (ends[-1] - ends[WARMUP - 1]), between, peak, torch.get_num_threads())


def config(overrides: list[str]) -> DictConfig:
    with initialize_config_module("emfm.configs", version_base="1.3"):
        return compose("pretrain", overrides=overrides)


def overrides(setup: Setup, volume: Path, run_dir: Path, batch: int, steps: int, workers: int,
              patches_per_epoch: int | None) -> list[str]:
    """The setup's overrides plus data, batch and a window free of validation and images."""
    max_steps = WARMUP + steps + 1
    epoch = [] if patches_per_epoch is None else [f"data.patches_per_epoch={patches_per_epoch}"]
    return [*setup.overrides, f"data.volumes=[{volume}]", f"data.batch_size={batch}",
            f"data.num_workers={workers}", f"paths.output_dir={run_dir}", "trainer.accelerator=cpu",
            f"trainer.max_steps={max_steps}", f"trainer.val_check_interval={max_steps + 1}",
            f"callbacks.reconstructions.every_n_steps={max_steps + 1}", *epoch]


def ours(overrides: list[str]) -> Run:
    """`emfm pretrain` as users run it, timed per batch."""
    cfg = config(overrides)
    datamodule, module, trainer, _ = prepare_pretraining(cfg)
    timer = StepTimer()
    trainer.callbacks.append(timer)  # last, so each end stamp follows every other callback's work
    trainer.fit(module, datamodule=datamodule)
    # The last step (max_steps) is left out: the reconstruction image and end of training follow it.
    return timed(timer.ends[:-1], timer.starts[:-1], cfg.data.batch_size)


def bare(overrides: list[str]) -> Run:
    """The same module, batch shape and optimiser in a plain loop."""
    cfg = config(overrides)
    datamodule, module, _, _ = prepare_pretraining(cfg)
    module.train()
    hp = cfg.objective
    optimizer = torch.optim.AdamW(module.parameters(), lr=hp.lr, betas=tuple(hp.betas),
                                  weight_decay=hp.weight_decay)
    images = RandomPatches(datamodule.sampler, cfg.data.batch_size, batches=1).batch(0)  # real patches
    starts, ends = [], []
    for _ in range(cfg.trainer.max_steps - 1):  # as many steps as ours times
        starts.append(time.perf_counter())
        loss = module.compute_loss(images)["loss"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), CLIP)
        optimizer.step()
        ends.append(time.perf_counter())
    return timed(ends, starts, cfg.data.batch_size)


def in_fresh_process(arm: Callable[[list[str]], Run], args: list[str]) -> Run:
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(arm, args).result()


def bench(name: str, volume: Path, args: argparse.Namespace) -> tuple[Arm, dict[int, Arm]]:
    """Bare, then ours with each worker count, repeated, ending with bare."""
    setup = SETUPS[name]
    batch, steps = args.batch or setup.batch, args.steps or setup.steps
    bare_arm, ours_arms = Arm(), {w: Arm() for w in args.workers}
    with tempfile.TemporaryDirectory() as tmp:
        runs = itertools.count()

        def run(arm: Callable[[list[str]], Run], workers: int, tag: str) -> Run:
            run_dir = Path(tmp) / f"run{next(runs)}"
            result = in_fresh_process(arm, overrides(setup, volume, run_dir, batch, steps, workers,
                                                      args.patches_per_epoch))
            print(f"  {name} {tag:<9} {result.rate:6.2f} images/s, {1000 * result.between:5.0f} ms/step "
                  f"between steps, {result.threads} threads (load average {os.getloadavg()[0]:.1f})", flush=True)
            return result

        for _ in range(args.repeats):
            for workers in args.workers:
                bare_arm.runs.append(run(bare, workers, "bare"))
                ours_arms[workers].runs.append(run(ours, workers, f"ours w={workers}"))
        bare_arm.runs.append(run(bare, args.workers[0], "bare"))
    return bare_arm, ours_arms


def report(results: dict[str, tuple[Arm, dict[int, Arm]]], args: argparse.Namespace) -> None:
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} torch threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, warm-up {WARMUP} steps, "
          f"patches_per_epoch {args.patches_per_epoch or 'default (8192)'}; images/s mean (min-max)")
    print(f"{'config':<27}{'batch':>6}{'steps':>6}{'workers':>8}  {'ours':<21}{'bare':<21}{'ratio':>6}"
          f"{'between ms':>11}{'RSS ours/bare MiB':>19}")
    for name, (bare_arm, ours_arms) in results.items():
        setup = SETUPS[name]
        for workers, arm in ours_arms.items():
            between = 1000 * statistics.mean(r.between for r in arm.runs)
            rss = f"{max(r.rss_mib for r in arm.runs):.0f}/{max(r.rss_mib for r in bare_arm.runs):.0f}"
            print(f"{setup.label:<27}{args.batch or setup.batch:>6}{args.steps or setup.steps:>6}{workers:>8}  "
                  f"{arm.summary():<21}{bare_arm.summary():<21}{arm.mean() / bare_arm.mean():>6.3f}"
                  f"{between:>11.0f}{rss:>19}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=sorted(SETUPS), default=sorted(SETUPS, reverse=True))
    parser.add_argument("--workers", nargs="+", type=int, default=[2], help="DataLoader workers of ours")
    parser.add_argument("--steps", type=int, help="timed steps (default: per config)")
    parser.add_argument("--batch", type=int, help="batch size (default: per config)")
    parser.add_argument("--repeats", type=int, default=1, help="ours runs per worker count")
    parser.add_argument("--patches-per-epoch", type=int, help="default: the config's 8192")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        volume = save_synthetic(make_synthetic_em((64, 256, 256)), Path(tmp) / "bench.zarr")
        results = {name: bench(name, volume, args) for name in args.configs}
    report(results, args)


if __name__ == "__main__":
    main()
