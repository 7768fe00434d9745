"""What does `trainer.compile=true` buy on a CPU? Training images/s with and without torch.compile, and its cost.

Three setups, each the real command (`emfm pretrain` / `emfm finetune`: the Hydra config composed,
`emfm.run.prepare`, `trainer.fit`, timed per batch as in benchmarks/train.py) on a synthetic OME-Zarr volume:
the restore_unet recipe's ResNet-18 U-Net pretraining by restoration and its fine-tuning (128x128, batch 8), and
a ViT-Ti/16 MAE (128x128, batch 32). The two arms are the same config with trainer.compile=false (eager) and
true (compiled: the training loss through torch.compile's inductor backend, augmentation and validation eager).

Every run is a fresh spawned process; the arms alternate (eager, compiled, eager, ..., eager) so that machine
noise falls on both, and each compiled run is paired with the mean of the two eager runs around it. Both arms
skip the harness's warm-up steps and time the same steps; validation and pictures are pushed past the window.

Compile time is a compiled run's first step (torch.compile traces the loss and builds the forward and backward
kernels there) minus the eager runs' mean first step. Inductor caches what it builds: the first compiled run of
each setup starts from an empty cache (what a user's first run pays, "cold"), the later ones reuse it ("warm":
what a rerun of the same model pays).

The benchmark runs with the environment it is given (threads, OMP_WAIT_POLICY), as benchmarks/train.py does; run
it on an idle machine. The measurement, then quick checks of the benchmark itself (small models, minutes; --override
applies to every config chosen):

    python -m benchmarks.compile --repeats 2          # docs/benchmarks.md
    python -m benchmarks.compile --configs vit --steps 2 --batch 2 --repeats 1 --override model.name=test_vit \\
        model.patch_size=8 data.patch_shape=[32,32] objective.methods.mae.decoder_depth=1
    python -m benchmarks.compile --configs unet unet_ft --steps 2 --batch 2 --repeats 1 \\
        --override model.name=resnet10t data.patch_shape=[64,64]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
from functools import partial
from pathlib import Path

from benchmarks.harness import WARMUP, Arm, Run, command_line, in_fresh_process, machine, paired
from benchmarks.workloads import Setup, bench_all, ours
from benchmarks.workloads import overrides as pretrain_overrides

SETUPS = {
    "unet": Setup(("experiment=restore_unet/pretrain",), batch=8, steps=20, label="ResNet-18 U-Net restore, 128x128"),
    "unet_ft": Setup(("experiment=restore_unet/finetune", "target=membrane"), batch=8, steps=20,
                     label="ResNet-18 U-Net fine-tune, 128x128", command="finetune"),
    "vit": Setup(("model=vit2d", "objective=mae", "model.name=vit_tiny_patch16_224", "data.patch_shape=[128,128]"),
                 batch=32, steps=20, label="ViT-Ti/16 MAE, 128x128"),
}


def overrides(setup: Setup, volume: Path, run_dir: Path, args: argparse.Namespace, compile: bool) -> list[str]:
    """The training window (no validation or pictures in it) for either command, and the arm's compile key."""
    batch, steps = args.batch or setup.batch, args.steps or setup.steps
    window = pretrain_overrides(setup, volume, run_dir, batch, steps, args.workers, None)
    if setup.command == "finetune":       # labeled patches of the synthetic membranes instead of unlabeled ones
        window = [o for o in window if not o.startswith(("data.volumes=", "callbacks.reconstructions."))]
        window += [f"data.raw={volume}", f"data.labels={volume}/labels/membranes", "data.labeled_slices=[0,1,2,3]",
                   "data.val_slices=null", "+trainer.limit_val_batches=0", "callbacks.model_checkpoint.monitor=null"]
    return [*window, *args.override, f"trainer.compile={str(compile).lower()}"]


def bench(name: str, volume: Path, args: argparse.Namespace) -> tuple[Arm, Arm]:
    """Eager and compiled runs alternating, eager first and last; compiled runs share one inductor cache."""
    setup = SETUPS[name]
    steps = args.steps or setup.steps
    eager, compiled = Arm(), Arm()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")     # empty for this setup's first run
        runs = itertools.count()

        def run(compile: bool) -> Run:
            arm = partial(ours, command=setup.command)
            result = in_fresh_process(arm, overrides(setup, volume, Path(tmp) / f"run{next(runs)}", args, compile),
                                      steps)
            print(f"  {name} {'compiled' if compile else 'eager':<9} {result.rate:6.2f} images/s, first step "
                  f"{result.first:6.1f} s, {result.threads} threads (load average {os.getloadavg()[0]:.1f})",
                  flush=True)
            return result

        for _ in range(args.repeats):
            eager.runs.append(run(False))
            compiled.runs.append(run(True))
        eager.runs.append(run(False))
    for result, before, after in zip(compiled.runs, eager.runs, eager.runs[1:]):
        compiled.paired.append(paired(result, before, after))
    return eager, compiled


def report(results: dict[str, tuple[Arm, Arm]], args: argparse.Namespace) -> None:
    print(f"\n{machine()}, {args.workers} loader workers, "
          f"warm-up {WARMUP} steps; mean (min-max) over runs; compile s = first step - eager's mean first step")
    if args.override:
        print(f"every config with {' '.join(args.override)} (the labels name the configs without them)")
    print(f"{'config':<36}{'batch':>6}{'steps':>6}  {'eager images/s':<21}{'compiled images/s':<21}{'ratio':>6}  "
          f"{'paired ratio':<20}{'compile s cold':>15}{'warm':>7}{'eager 1st s':>12}{'RSS MiB eager/compiled':>24}")
    for name, (eager, compiled) in results.items():
        setup = SETUPS[name]
        first = eager.mean("first")
        warm = [r.first - first for r in compiled.runs[1:]]
        ratios = f"{statistics.mean(compiled.paired):.3f} ({min(compiled.paired):.3f}-{max(compiled.paired):.3f})"
        rss = f"{max(r.rss_mib for r in eager.runs):.0f}/{max(r.rss_mib for r in compiled.runs):.0f}"
        print(f"{setup.label:<36}{args.batch or setup.batch:>6}{args.steps or setup.steps:>6}  {eager.summary():<21}"
              f"{compiled.summary():<21}{compiled.mean() / eager.mean():>6.3f}  {ratios:<20}"
              f"{compiled.runs[0].first - first:>15.1f}{statistics.mean(warm) if warm else float('nan'):>7.1f}"
              f"{first:>12.2f}{rss:>24}")


def main() -> None:
    parser = command_line("compile", __doc__)
    parser.add_argument("--configs", nargs="+", choices=sorted(SETUPS), default=list(SETUPS))
    parser.add_argument("--steps", type=int, help="timed steps (default: per config)")
    parser.add_argument("--batch", type=int, help="batch size (default: per config)")
    parser.add_argument("--repeats", type=int, default=2, help="compiled runs per config (the first with a cold "
                                                               "inductor cache)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers (the recipe's 1)")
    parser.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE",
                        help="more config overrides for every run (e.g. a smaller model for a quick check)")
    args = parser.parse_args()
    report(bench_all(bench, args), args)


if __name__ == "__main__":
    main()
