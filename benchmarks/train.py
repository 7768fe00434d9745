"""How much does our training machinery cost, and how far is the step from the machine's limit? `emfm pretrain`
throughput vs a bare PyTorch loop, and both in FLOP/s against the machine's peak.

For 2-D ViTs (ViT-Ti/16 and ViT-S/16 MAE), the restore_unet recipe's 2-D ResNet-18 U-Net (restoration) and a
3-D CNN (ResNet10-3D MIM) on CPU, two arms train the same model at the same batch size, and the script prints
ours / bare in images/s (target: >= 0.95).

ours: what `emfm pretrain` runs. The real Hydra config is composed, `emfm.run.prepare`
builds the PatchDataModule (zstd-compressed synthetic OME-Zarr on disk, read by DataLoader
workers, blank filter, normalisation), the PretrainModule and the Lightning Trainer with the
default callbacks and loggers (CSV + TensorBoard, checkpointing, LR monitor, progress bar,
log_every_n_steps=10, gradient clipping), and `trainer.fit` runs. ``--ours-channels-last`` runs ours once per
``trainer.channels_last`` value given (default: auto, on a CPU the default layout). A callback stamps
`time.perf_counter()` at the end of every batch, after every other callback, so the time between
stamps holds everything: waiting for data, augmentation, the step, logging, the progress bar.
It also stamps the start of every batch, so the table splits off the time spent between steps.

bare: the same module built from the same config (same seed, same augmentation settings), in the default memory
layout (trainer.channels_last=false) whatever ours runs in, `module.train()`, AdamW with the config's lr / betas /
weight decay, one fixed in-memory batch (real patches of the same stream, same shape), and per step `compute_loss`
(augmentation included, as in ours) + zero_grad + backward + `clip_grad_norm_(1.0)` (the trainer's
gradient_clip_val) + `step`.

Both arms skip the same warm-up steps and time the same number of steps, each in a fresh spawned
process (so one arm's heap does not carry into the next) with the same torch thread count. Arms
alternate (bare, ours with each worker count and channels-last setting and each variant below, each after a
bare run, ..., bare) so that machine noise falls on both. The table gives each arm's mean and min-max, the ratio of the
means, the paired ratio (each ours run over the mean of the two bare runs around it, which cancels
slow drifts of the machine's load), the CPU seconds per step of the training process and the CPU
seconds the loader workers spent per batch.

Periodic costs are kept out of the timed window, since they are not per-step costs: validation
(`trainer.val_check_interval`) and the reconstruction images (`callbacks.reconstructions.every_n_steps`)
are pushed past the last step, and the window ends one step before `max_steps` (Lightning's
end-of-training work). Epoch ends are not kept out: the training DataLoader restarts its workers
every `data.patches_per_epoch` patches (8192 by default, far beyond the window);
`--patches-per-epoch` shrinks the epoch so that restart cost falls inside the window.

FLOP/s: the FLOPs of one step are counted once per config in this process, outside every timed window, by
``harness.flops`` (torch's FlopCounterMode: matrix products, convolutions and attention, forward and backward of
``compute_loss``, augmentation included; elementwise work, normalisation, softmax, pooling, interpolation and the
optimizer step count 0, so the figures are a floor of the work done). An arm's FLOP/s is that count times its steps
per second. The machine's peaks are measured at the start, in this process, with the torch threads the arms get:
the best of 5 float32 4096x4096 @ 4096x4096 products, and of 5 forwards of a 3x3 convolution 64 -> 64 channels on
8x256x256 (counted the same way) in either memory layout, the faster one being the conv peak. The second table
gives each arm's GFLOP/s and its fraction of both peaks.

Opt-in variants of the bare arm, each run between two bare runs and paired with them as ours is: ``--channels-last``
(CNN configs: every 4-D / 5-D parameter and the batch in channels-last memory; trainer.channels_last=true, in
ours, converts the convolution weights only) and ``--bf16`` (the loss under
``torch.autocast("cpu", dtype=torch.bfloat16)``, which emfm's training does not do on a CPU; without avx512_bf16 /
AMX in ``lscpu`` the CPU converts in software).

The benchmark runs with the environment it is given. On a shared machine set
OMP_WAIT_POLICY=PASSIVE: with the default (spinning) policy a 2-thread step slows down several
fold whenever another process takes a core, which swamps what is measured here.

    python -m benchmarks.train --workers 1 2 --repeats 2     # idle machine, as in docs/benchmarks.md
    python -m benchmarks.train --configs vit2d --workers 1 2 --patches-per-epoch 160   # epoch restarts
    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.train --workers 1 2 --repeats 2     # shared machine
    python -m benchmarks.train --channels-last --bf16 --repeats 2      # the variants against the default
    python -m benchmarks.train --configs unet2d --steps 3 --channels-last --bf16   # a quick check (~4 min)
    python -m benchmarks.train --configs unet2d cnn3d --ours-channels-last true false --channels-last   # ours both ways
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from benchmarks.harness import (
    WARMUP,
    Arm,
    Run,
    command_line,
    conv_peak,
    flops,
    in_fresh_process,
    machine,
    matmul_peak,
    paired,
)
from benchmarks.workloads import Setup, bare, bare_parts, bench_all, ours, overrides

SETUPS = {
    "vit2d_ti": Setup(("model=vit2d", "objective=mae", "model.name=vit_tiny_patch16_224",
                       "data.patch_shape=[128,128]"), batch=32, steps=40,
                      label="ViT-Ti/16 MAE, 128x128"),
    "vit2d": Setup(("model=vit2d", "objective=mae", "model.name=vit_small_patch16_224",
                    "data.patch_shape=[128,128]"), batch=32, steps=40,
                   label="ViT-S/16 MAE, 128x128"),
    "unet2d": Setup(("experiment=restore_unet/pretrain",), batch=8, steps=20,
                    label="ResNet-18 U-Net restore, 128x128"),
    "cnn3d": Setup(("model=cnn3d", "objective=mim", "model.name=resnet10_3d",
                    "data.patch_shape=[16,64,64]"), batch=4, steps=20,
                   label="ResNet10-3D MIM, 16x64x64"),
}
CNNS = ("unet2d", "cnn3d")   # the configs --channels-last applies to
VARIANTS: dict[str, Callable[[list[str], int], Run]] = {
    "channels-last": partial(bare, channels_last=True), "bf16": partial(bare, bf16=True)}


@dataclass
class Measured:
    """One config's FLOPs per step and its arms: bare, ours per worker count and trainer.channels_last, the chosen
    variants of bare."""

    flops: int
    bare: Arm = field(default_factory=Arm)
    ours: dict[tuple[int, str], Arm] = field(default_factory=dict)
    variants: dict[str, Arm] = field(default_factory=dict)


def step_flops(overrides: list[str]) -> int:
    """FLOPs of one training step (forward and backward of ``compute_loss``) on the bare arm's batch."""
    _, module, images = bare_parts(overrides)
    return flops(lambda: module.compute_loss(images)["loss"].backward())


def bench(name: str, volume: Path, args: argparse.Namespace) -> Measured:
    """The step's FLOPs, then bare, ours with each worker count and channels-last setting and each variant,
    repeated, each after a bare run, ending with bare."""
    setup = SETUPS[name]
    batch, steps = args.batch or setup.batch, args.steps or setup.steps
    variants = [v for v in VARIANTS if getattr(args, v.replace("-", "_")) and (v != "channels-last" or name in CNNS)]
    with tempfile.TemporaryDirectory() as tmp:
        runs = itertools.count()

        def window(workers: int, *extra: str) -> list[str]:
            run_dir = Path(tmp) / f"run{next(runs)}"
            return [*overrides(setup, volume, run_dir, batch, steps, workers, args.patches_per_epoch), *extra]

        def run(arm: Callable[[list[str], int], Run], workers: int, tag: str, *extra: str) -> Run:
            result = in_fresh_process(arm, window(workers, *extra), steps)
            print(f"  {name} {tag:<18} {result.rate:6.2f} images/s, {1000 * result.between:5.0f} ms/step "
                  f"between steps, {result.threads} threads (load average {os.getloadavg()[0]:.1f})", flush=True)
            return result

        measured = Measured(step_flops(window(0)))
        print(f"  {name} {measured.flops / 1e9:.1f} GFLOP per step", flush=True)
        subjects: list[tuple[str, Callable[[list[str], int], Run], int, Arm, list[str]]] = [
            (ours_tag(w, c), ours, w, measured.ours.setdefault((w, c), Arm()), [f"trainer.channels_last={c}"])
            for w in args.workers for c in args.ours_channels_last]
        subjects += [(f"bare+{v}", VARIANTS[v], args.workers[0], measured.variants.setdefault(v, Arm()), [])
                     for v in variants]
        sequence = []  # (arm, run) of each subject in the order run, each between two bare runs
        for _ in range(args.repeats):
            for tag, arm, workers, results, extra in subjects:
                measured.bare.runs.append(run(bare, workers, "bare"))
                sequence.append((results, run(arm, workers, tag, *extra)))
                results.runs.append(sequence[-1][1])
        measured.bare.runs.append(run(bare, args.workers[0], "bare"))
    for (results, result), before, after in zip(sequence, measured.bare.runs, measured.bare.runs[1:]):
        results.paired.append(paired(result, before, after))
    return measured


def ours_tag(workers: int, channels_last: str) -> str:
    return f"ours w={workers}" + ("" if channels_last == "auto" else f" cl={channels_last}")


def report(results: dict[str, Measured], peaks: dict[str, float], args: argparse.Namespace) -> None:
    print(f"\n{machine()}, warm-up {WARMUP} steps, "
          f"patches_per_epoch {args.patches_per_epoch or 'default (8192)'}; mean (min-max) over runs")
    print(f"{'config':<34}{'batch':>6}{'steps':>6}{'workers':>8}{'ours channels_last':>19}  "
          f"{'ours images/s':<21}{'bare images/s':<21}"
          f"{'ratio':>6}  {'paired ratio':<20}{'between ms':>10}{'CPU s/step ours/bare':>22}"
          f"{'loader CPU s':>13}{'RSS MiB ours/bare':>19}")
    for name, measured in results.items():
        setup, bare_arm = SETUPS[name], measured.bare
        for (workers, channels_last), arm in measured.ours.items():
            cpu = f"{arm.mean('cpu'):.2f}/{bare_arm.mean('cpu'):.2f}"
            rss = f"{max(r.rss_mib for r in arm.runs):.0f}/{max(r.rss_mib for r in bare_arm.runs):.0f}"
            print(f"{setup.label:<34}{args.batch or setup.batch:>6}{args.steps or setup.steps:>6}{workers:>8}"
                  f"{channels_last:>19}  "
                  f"{arm.summary():<21}{bare_arm.summary():<21}{arm.mean() / bare_arm.mean():>6.3f}  "
                  f"{paired_summary(arm):<20}{1000 * arm.mean('between'):>10.0f}{cpu:>22}"
                  f"{arm.mean('loader_cpu'):>13.2f}{rss:>19}")
    matmul, conv = peaks["matmul"], max(peaks["conv"], peaks["conv channels-last"])
    threads = sorted({r.threads for m in results.values() for r in m.bare.runs})
    print(f"\nFLOP/s: FLOPs per step (forward + backward of compute_loss; matrix products, convolutions, attention) "
          f"times steps/s. Peaks with {torch.get_num_threads()} torch threads (arms: {threads}): {show(peaks)}; "
          f"conv peak: the faster layout")
    print(f"{'config':<34}{'arm':<20}{'GFLOP/step':>11}  {'images/s':<21}{'GFLOP/s':>8}{'of matmul peak':>16}"
          f"{'of conv peak':>14}  {'paired ratio over bare':<22}")
    for name, measured in results.items():
        arms = {"bare": measured.bare, **{ours_tag(*key): a for key, a in measured.ours.items()},
                **{f"bare+{v}": a for v, a in measured.variants.items()}}
        for tag, arm in arms.items():
            achieved = measured.flops / (args.batch or SETUPS[name].batch) * arm.mean()
            print(f"{SETUPS[name].label:<34}{tag:<20}{measured.flops / 1e9:>11.1f}  {arm.summary():<21}"
                  f"{achieved / 1e9:>8.1f}{achieved / matmul:>16.3f}{achieved / conv:>14.3f}  "
                  f"{paired_summary(arm) if arm.paired else '':<22}")


def machine_peaks() -> dict[str, float]:
    """This machine's FLOP/s with this process's torch threads (those the arms get): a float32 4096^3 matrix
    product and a 3x3 convolution 64 -> 64 channels on 8x256x256, in either memory layout; and a bfloat16 product,
    the peak of the ``--bf16`` arm's matrix products."""
    return {"matmul": matmul_peak(), "conv": conv_peak(), "conv channels-last": conv_peak(channels_last=True),
            "matmul bf16": matmul_peak(dtype=torch.bfloat16)}


def show(peaks: dict[str, float]) -> str:
    return ", ".join(f"{name} {value / 1e9:.1f} GFLOP/s" for name, value in peaks.items())


def paired_summary(arm: Arm) -> str:
    return f"{statistics.mean(arm.paired):.3f} ({min(arm.paired):.3f}-{max(arm.paired):.3f})"


def main() -> None:
    parser = command_line("train", __doc__)
    parser.add_argument("--configs", nargs="+", choices=sorted(SETUPS), default=list(SETUPS))
    parser.add_argument("--workers", nargs="+", type=int, default=[2], help="DataLoader workers of ours")
    parser.add_argument("--steps", type=int, help="timed steps (default: per config)")
    parser.add_argument("--batch", type=int, help="batch size (default: per config)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of ours per worker count and of each variant")
    parser.add_argument("--patches-per-epoch", type=int, help="default: the config's 8192")
    parser.add_argument("--ours-channels-last", nargs="+", choices=["auto", "true", "false"], default=["auto"],
                        help="trainer.channels_last of ours, an arm per value (auto: CNNs channels-last on CUDA only)")
    parser.add_argument("--channels-last", action="store_true",
                        help=f"also bare with module and batch in channels-last memory ({', '.join(CNNS)})")
    parser.add_argument("--bf16", action="store_true", help="also bare under CPU bfloat16 autocast")
    args = parser.parse_args()
    peaks = machine_peaks()
    print(f"peaks: {show(peaks)}; {torch.get_num_threads()} torch threads", flush=True)
    report(bench_all(bench, args), peaks, args)


if __name__ == "__main__":
    main()
