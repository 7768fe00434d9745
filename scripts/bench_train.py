"""How much does our training machinery cost? `emfm pretrain` throughput vs a bare PyTorch loop.

For a 2-D ViT (MAE) and a 3-D CNN (MIM) on CPU, two arms train the same model at the same batch
size, and the script prints ours / bare in images/s (target: >= 0.95).

ours: what `emfm pretrain` runs. The real Hydra config is composed, `emfm.run.prepare`
builds the PatchDataModule (zstd-compressed synthetic OME-Zarr on disk, read by DataLoader
workers, blank filter, normalisation), the PretrainModule and the Lightning Trainer with the
default callbacks and loggers (CSV + TensorBoard, checkpointing, LR monitor, progress bar,
log_every_n_steps=10, gradient clipping), and `trainer.fit` runs. A callback stamps
`time.perf_counter()` at the end of every batch, after every other callback, so the time between
stamps holds everything: waiting for data, augmentation, the step, logging, the progress bar.
It also stamps the start of every batch, so the table splits off the time spent between steps.

bare: the same module built from the same config (same seed, same augmentation settings),
`module.train()`, AdamW with the config's lr / betas / weight decay, one fixed in-memory batch
(real patches of the same stream, same shape), and per step `compute_loss` (augmentation
included, as in ours) + zero_grad + backward + `clip_grad_norm_(1.0)` (the trainer's
gradient_clip_val) + `step`.

Both arms skip the same warm-up steps and time the same number of steps, each in a fresh spawned
process (so one arm's heap does not carry into the next) with the same torch thread count. Arms
alternate (bare, ours with each worker count, bare, ..., bare) so that machine noise falls on
both. The table gives each arm's mean and min-max, the ratio of the means, the paired ratio (each
ours run over the mean of the two bare runs around it, which cancels slow drifts of the machine's
load), the CPU seconds per step of the training process and the CPU seconds the loader workers
spent per batch.

Periodic costs are kept out of the timed window, since they are not per-step costs: validation
(`trainer.val_check_interval`) and the reconstruction images (`callbacks.reconstructions.every_n_steps`)
are pushed past the last step, and the window ends one step before `max_steps` (Lightning's
end-of-training work). Epoch ends are not kept out: the training DataLoader restarts its workers
every `data.patches_per_epoch` patches (8192 by default, far beyond the window);
`--patches-per-epoch` shrinks the epoch so that restart cost falls inside the window.

The script runs with the environment it is given. On a shared machine set
OMP_WAIT_POLICY=PASSIVE: with the default (spinning) policy a 2-thread step slows down several
fold whenever another process takes a core, which swamps what is measured here.

    python scripts/bench_train.py --workers 1 2 --repeats 2     # idle machine, as in docs/benchmarks.md
    python scripts/bench_train.py --configs vit2d --workers 1 2 --patches-per-epoch 160   # epoch restarts
    OMP_WAIT_POLICY=PASSIVE python scripts/bench_train.py --workers 1 2 --repeats 2     # shared machine
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from emfm.data.patches import RandomPatches
from emfm.data.synthetic import make_synthetic_em, save_synthetic
from emfm.pretrain.base import PretrainModule
from emfm.run import build, prepare

WARMUP = 3  # steps not timed: worker start-up, first allocations, the step-1 reconstruction image
CLIP = 1.0  # configs/trainer/default.yaml gradient_clip_val
T = TypeVar("T")


@dataclass(frozen=True)
class Setup:
    """One model/objective: its config overrides, batch size and timed steps."""

    overrides: tuple[str, ...]
    batch: int
    steps: int
    label: str


SETUPS = {
    "vit2d": Setup(("model=vit2d", "objective=mae", "model.name=vit_small_patch16_224",
                    "data.patch_shape=[128,128]"), batch=32, steps=40,
                   label="ViT-S/16 MAE, 128x128"),
    "cnn3d": Setup(("model=cnn3d", "objective=mim", "model.name=resnet10_3d",
                    "data.patch_shape=[16,64,64]"), batch=4, steps=20,
                   label="ResNet10-3D MIM, 16x64x64"),
}


@dataclass(frozen=True)
class Run:
    """One timed run, per timed step where not said otherwise.

    ``between``: wall seconds outside the step (ours: waiting for the next batch, Lightning's
    bookkeeping and logger writes between batches). ``cpu``: CPU seconds of the training process
    (all its threads). ``loader_cpu``: CPU seconds of the DataLoader workers per batch over the
    whole run, start-up included. ``first``: wall seconds of the first step (not timed otherwise).
    """

    rate: float
    between: float
    cpu: float
    loader_cpu: float
    rss_mib: float
    threads: int
    first: float


@dataclass
class Arm:
    """The runs of one arm; for ours also each run's rate over the mean of the bare runs around it."""

    runs: list[Run] = field(default_factory=list)
    paired: list[float] = field(default_factory=list)

    def mean(self, key: str = "rate") -> float:
        return statistics.mean(getattr(r, key) for r in self.runs)

    def summary(self) -> str:
        rates = [r.rate for r in self.runs]
        return f"{self.mean():6.2f} ({min(rates):.2f}-{max(rates):.2f})"


class Clock:
    """Wall time at the start and end of every step, CPU time at the end."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.cpu: list[float] = []

    def start(self) -> None:
        self.starts.append(time.perf_counter())

    def end(self) -> None:
        self.ends.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def run(self, batch: int, timed_steps: int) -> Run:
        """The first ``timed_steps`` after the warm-up: from the end of step WARMUP to the end of the last."""
        first, last = WARMUP - 1, WARMUP - 1 + timed_steps
        gaps = [s - e for s, e in zip(self.starts[first + 1 : last + 1], self.ends[first:last])]
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return Run(
            rate=timed_steps * batch / (self.ends[last] - self.ends[first]),
            between=statistics.mean(gaps),
            cpu=(self.cpu[last] - self.cpu[first]) / timed_steps,
            loader_cpu=(children.ru_utime + children.ru_stime) / len(self.ends),
            rss_mib=peak_rss_mib(),
            threads=torch.get_num_threads(),
            first=self.ends[0] - self.starts[0],
        )


class StepTimer(pl.Callback):
    """A :class:`Clock` on the training batches."""

    def __init__(self) -> None:
        self.clock = Clock()

    def on_train_batch_start(self, *args: Any) -> None:
        self.clock.start()

    def on_train_batch_end(self, *args: Any) -> None:
        self.clock.end()


def config(overrides: list[str], command: str = "pretrain") -> DictConfig:
    with initialize_config_module("emfm.configs", version_base="1.3"):
        return compose(command, overrides=overrides)


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
    datamodule, module, trainer, _ = prepare(cfg, cfg.objective if command == "pretrain" else cfg.module)
    timer = StepTimer()
    trainer.callbacks.append(timer)  # last, so each end stamp follows every other callback's work
    trainer.fit(module, datamodule=datamodule)
    return timer.clock.run(cfg.data.batch_size, steps)


def bare(overrides: list[str], steps: int) -> Run:
    """The same module, batch shape and optimiser in a plain loop."""
    return bare_loop(*bare_parts(overrides), steps)


def bare_loop(cfg: DictConfig, module: PretrainModule, images: torch.Tensor, steps: int) -> Run:
    """``plain_loop`` over the module's ``compute_loss`` on ``images`` with the config's optimiser."""
    return plain_loop(lambda: module.compute_loss(images)["loss"], module, optimizer(module, cfg), steps,
                      cfg.data.batch_size)


def bare_parts(overrides: list[str]) -> tuple[DictConfig, PretrainModule, torch.Tensor]:
    """The config, the module in training mode and one batch of real patches of the configured stream."""
    cfg = config(overrides)
    datamodule, module, _, _ = prepare(cfg, cfg.objective)
    return cfg, cast(PretrainModule, module.train()), real_batch(cfg, datamodule)


def real_batch(cfg: DictConfig, datamodule: Any = None) -> torch.Tensor:
    """The first batch of the configured patch stream (the same in every process)."""
    datamodule = datamodule or build(cfg.data)
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


def peak_rss_mib() -> float:
    """This process's peak resident memory, MiB: Linux's VmHWM where there is one. Not ``ru_maxrss``: a process
    started by fork + exec (spawn, subprocess) carries there the resident memory of the process that started it."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


PRELOAD = ["torch", "timm", "lightning.pytorch", "hydra", "emfm.run"]   # what every arm imports: the slow part


def in_fresh_process(arm: Callable[..., T], *args: Any, memory_gib: float | None = None,
                     method: str = "spawn") -> T:
    """``arm(*args)`` in a new process whose DataLoader workers start as they would in ours.

    ``method="spawn"``: a new interpreter, as a user's command starts (~8 s of imports here).
    ``"forkserver"``: forked from a server that imported ``PRELOAD`` once, so a script pays those
    imports once, not once per arm; the server runs nothing else, so no arm's heap and no torch
    thread pool exist before the fork. Its peak RSS leaves out the library pages touched only while
    importing (~0.5 GiB with torch's CUDA build here): compare such figures only with each other.
    Either way the process would start its own workers by its own method (re-importing torch and
    emfm in every epoch's workers) instead of forking as `emfm pretrain` does on Linux: it is set back.
    ``memory_gib``: the process's address-space limit (RLIMIT_AS); past it allocations fail there.
    """
    context = multiprocessing.get_context(method)
    if method == "forkserver":   # heeded when the server starts (the first call). The arm's own module is
        context.set_forkserver_preload(PRELOAD)   # imported by each process: the 3.11 server ignores sys.path
    with ProcessPoolExecutor(1, mp_context=context, initializer=start_process,
                             initargs=(multiprocessing.get_start_method(), memory_gib)) as pool:
        return pool.submit(arm, *args).result()


def start_process(method: str, memory_gib: float | None = None) -> None:
    multiprocessing.set_start_method(method, force=True)
    if memory_gib is not None:
        limit = int(memory_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def bench(name: str, volume: Path, args: argparse.Namespace) -> tuple[Arm, dict[int, Arm]]:
    """Bare, then ours with each worker count, repeated, ending with bare."""
    setup = SETUPS[name]
    batch, steps = args.batch or setup.batch, args.steps or setup.steps
    bare_arm, ours_arms = Arm(), {w: Arm() for w in args.workers}
    with tempfile.TemporaryDirectory() as tmp:
        runs = itertools.count()

        def run(arm: Callable[[list[str], int], Run], workers: int, tag: str) -> Run:
            run_dir = Path(tmp) / f"run{next(runs)}"
            result = in_fresh_process(
                arm, overrides(setup, volume, run_dir, batch, steps, workers, args.patches_per_epoch), steps
            )
            print(f"  {name} {tag:<9} {result.rate:6.2f} images/s, {1000 * result.between:5.0f} ms/step "
                  f"between steps, {result.threads} threads (load average {os.getloadavg()[0]:.1f})", flush=True)
            return result

        sequence = []  # (workers, run) of ours in the order run, each between two bare runs
        for _ in range(args.repeats):
            for workers in args.workers:
                bare_arm.runs.append(run(bare, workers, "bare"))
                sequence.append((workers, run(ours, workers, f"ours w={workers}")))
                ours_arms[workers].runs.append(sequence[-1][1])
        bare_arm.runs.append(run(bare, args.workers[0], "bare"))
    for (workers, result), before, after in zip(sequence, bare_arm.runs, bare_arm.runs[1:]):
        ours_arms[workers].paired.append(2 * result.rate / (before.rate + after.rate))
    return bare_arm, ours_arms


def report(results: dict[str, tuple[Arm, dict[int, Arm]]], args: argparse.Namespace) -> None:
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} torch threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, warm-up {WARMUP} steps, "
          f"patches_per_epoch {args.patches_per_epoch or 'default (8192)'}; mean (min-max) over runs")
    print(f"{'config':<27}{'batch':>6}{'steps':>6}{'workers':>8}  {'ours images/s':<21}{'bare images/s':<21}"
          f"{'ratio':>6}  {'paired ratio':<20}{'between ms':>10}{'CPU s/step ours/bare':>22}"
          f"{'loader CPU s':>13}{'RSS MiB ours/bare':>19}")
    for name, (bare_arm, ours_arms) in results.items():
        setup = SETUPS[name]
        for workers, arm in ours_arms.items():
            paired = f"{statistics.mean(arm.paired):.3f} ({min(arm.paired):.3f}-{max(arm.paired):.3f})"
            cpu = f"{arm.mean('cpu'):.2f}/{bare_arm.mean('cpu'):.2f}"
            rss = f"{max(r.rss_mib for r in arm.runs):.0f}/{max(r.rss_mib for r in bare_arm.runs):.0f}"
            print(f"{setup.label:<27}{args.batch or setup.batch:>6}{args.steps or setup.steps:>6}{workers:>8}  "
                  f"{arm.summary():<21}{bare_arm.summary():<21}{arm.mean() / bare_arm.mean():>6.3f}  {paired:<20}"
                  f"{1000 * arm.mean('between'):>10.0f}{cpu:>22}{arm.mean('loader_cpu'):>13.2f}{rss:>19}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=sorted(SETUPS), default=sorted(SETUPS, reverse=True))
    parser.add_argument("--workers", nargs="+", type=int, default=[2], help="DataLoader workers of ours")
    parser.add_argument("--steps", type=int, help="timed steps (default: per config)")
    parser.add_argument("--batch", type=int, help="batch size (default: per config)")
    parser.add_argument("--repeats", type=int, default=1, help="ours runs per worker count")
    parser.add_argument("--patches-per-epoch", type=int, help="default: the config's 8192")
    args = parser.parse_args()
    report(bench_all(bench, args), args)


def bench_all(bench: Callable[[str, Path, argparse.Namespace], Any], args: argparse.Namespace) -> dict[str, Any]:
    """``bench(name, volume, args)`` of every config in ``args.configs`` on one synthetic 64x256x256 OME-Zarr."""
    with tempfile.TemporaryDirectory() as tmp:
        volume = save_synthetic(make_synthetic_em((64, 256, 256)), Path(tmp) / "bench.zarr")
        return {name: bench(name, volume, args) for name in args.configs}


if __name__ == "__main__":
    main()
