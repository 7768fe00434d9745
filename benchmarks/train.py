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

The benchmark runs with the environment it is given. On a shared machine set
OMP_WAIT_POLICY=PASSIVE: with the default (spinning) policy a 2-thread step slows down several
fold whenever another process takes a core, which swamps what is measured here.

    python -m benchmarks.train --workers 1 2 --repeats 2     # idle machine, as in docs/benchmarks.md
    python -m benchmarks.train --configs vit2d --workers 1 2 --patches-per-epoch 160   # epoch restarts
    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.train --workers 1 2 --repeats 2     # shared machine
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

from benchmarks.harness import WARMUP, Arm, Run, command_line, in_fresh_process, machine, paired
from benchmarks.workloads import Setup, bare, bench_all, ours, overrides

SETUPS = {
    "vit2d": Setup(("model=vit2d", "objective=mae", "model.name=vit_small_patch16_224",
                    "data.patch_shape=[128,128]"), batch=32, steps=40,
                   label="ViT-S/16 MAE, 128x128"),
    "cnn3d": Setup(("model=cnn3d", "objective=mim", "model.name=resnet10_3d",
                    "data.patch_shape=[16,64,64]"), batch=4, steps=20,
                   label="ResNet10-3D MIM, 16x64x64"),
}


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
        ours_arms[workers].paired.append(paired(result, before, after))
    return bare_arm, ours_arms


def report(results: dict[str, tuple[Arm, dict[int, Arm]]], args: argparse.Namespace) -> None:
    print(f"\n{machine()}, warm-up {WARMUP} steps, "
          f"patches_per_epoch {args.patches_per_epoch or 'default (8192)'}; mean (min-max) over runs")
    print(f"{'config':<27}{'batch':>6}{'steps':>6}{'workers':>8}  {'ours images/s':<21}{'bare images/s':<21}"
          f"{'ratio':>6}  {'paired ratio':<20}{'between ms':>10}{'CPU s/step ours/bare':>22}"
          f"{'loader CPU s':>13}{'RSS MiB ours/bare':>19}")
    for name, (bare_arm, ours_arms) in results.items():
        setup = SETUPS[name]
        for workers, arm in ours_arms.items():
            ratios = f"{statistics.mean(arm.paired):.3f} ({min(arm.paired):.3f}-{max(arm.paired):.3f})"
            cpu = f"{arm.mean('cpu'):.2f}/{bare_arm.mean('cpu'):.2f}"
            rss = f"{max(r.rss_mib for r in arm.runs):.0f}/{max(r.rss_mib for r in bare_arm.runs):.0f}"
            print(f"{setup.label:<27}{args.batch or setup.batch:>6}{args.steps or setup.steps:>6}{workers:>8}  "
                  f"{arm.summary():<21}{bare_arm.summary():<21}{arm.mean() / bare_arm.mean():>6.3f}  {ratios:<20}"
                  f"{1000 * arm.mean('between'):>10.0f}{cpu:>22}{arm.mean('loader_cpu'):>13.2f}{rss:>19}")


def main() -> None:
    parser = command_line("train", __doc__)
    parser.add_argument("--configs", nargs="+", choices=sorted(SETUPS), default=sorted(SETUPS, reverse=True))
    parser.add_argument("--workers", nargs="+", type=int, default=[2], help="DataLoader workers of ours")
    parser.add_argument("--steps", type=int, help="timed steps (default: per config)")
    parser.add_argument("--batch", type=int, help="batch size (default: per config)")
    parser.add_argument("--repeats", type=int, default=1, help="ours runs per worker count")
    parser.add_argument("--patches-per-epoch", type=int, help="default: the config's 8192")
    args = parser.parse_args()
    report(bench_all(bench, args), args)


if __name__ == "__main__":
    main()
