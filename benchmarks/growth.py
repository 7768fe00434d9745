"""How does emfm's cost grow with the work? Time and peak RSS against patch, model and volume size.

Every measurement runs in a fresh process, and each table gives, between consecutive sizes, the
ratio of the work next to the ratio of the time (and of the peak RSS) and the exponent
log(time ratio) / log(work ratio): 1 is linear, below 1 sublinear (fixed costs, or memory that does
not follow the work), above 1 superlinear. An exponent within 0.1 of 1 reads "linear". A last line
gives the same from the smallest size to the largest. Times are the fastest repeat, the median in
brackets; peak RSS the largest, of the measuring process (about 0.9 GiB of it is torch and Lightning
imported: an exponent near 0 says memory stays flat).

- Pretraining step (``workloads.bare``: the module of ``emfm pretrain``, ``compute_loss`` with its
  augmentation, backward, gradient clipping, AdamW, on one batch of real patches, timed after 3
  warm-up steps), seconds per step against the pixels of a batch: a ViT-Ti/16 MAE and a ResNet-18 MIM
  on 2-D patches of 64, 128 and 256 (batch 16 and 8), a 3-D ViT-Ti MAE (4x16x16 tokens) and a
  ResNet10-3D MIM on 16x64x64 and 32x128x128 patches (batch 2 and 1); and against the trained
  parameters (encoder and decoder): ViT-Ti/16 against ViT-S/16 MAE at 128x128.
- ``emfm predict`` (``workloads.emfm_predict``: blockwise, OME-Zarr in and out, uint8, the defaults of
  the command; a 1-step ViT-Ti/16 UNETR checkpoint, 128x128 tiles), seconds from the model load to
  the finished store, against the voxels of the volume: 1x (4x512x512), 8x and 64x (16x2048x2048).
- ``emfm cluster`` (``workloads.emfm_cluster``: features into a store, sample, PCA, k-means,
  map on the voxel grid; the same checkpoint, k=8), seconds from the command's start to its map, on
  the same volumes.

The volumes are synthetic EM; 8x and 64x mirror the 1x one out and are written slab by slab to zarr
(``workloads.grown``), never whole in memory. The 64x volume runs once, every other size
``--repeats`` times. ``--threads`` sets OMP_NUM_THREADS for every process (default: the environment).
The full run's time is an estimate from the step and prediction times in docs/benchmarks.md and the quick
run's process starts (8-10 s each, mostly imports; 32 processes); it has not been measured yet.

    python -m benchmarks.growth                   # full run: about 20 min on 2 idle CPU cores (estimated)
    python -m benchmarks.growth --quick           # smoke run: tiny sizes, one repeat (~4 min: 17 process starts)
    python -m benchmarks.growth --only predict cluster --repeats 3

Run it on an idle machine; on a shared one set OMP_WAIT_POLICY=PASSIVE (see benchmarks/train.py), and
expect the ratios to carry the load's noise.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.harness import Result, command_line, in_fresh_process, machine
from benchmarks.workloads import (
    Setup,
    bare_loop,
    bare_parts,
    emfm_cluster,
    emfm_predict,
    grown,
    make_checkpoint,
    overrides,
    trained_parameters,
)
from emfm.data.synthetic import make_synthetic_em, save_synthetic
from emfm.data.volume import Volume

SECTIONS = ("train", "predict", "cluster")
LINEAR = 0.1            # an exponent within this of 1 reads "linear"
BATCH = 8               # tiles per forward pass of `emfm predict` (its default)
MAE_2D, MAE_3D = ("model=vit2d", "objective=mae"), ("model=vit3d", "objective=mae", "model.patch_size=[4,16,16]")
TINY, SMALL = "model.name=vit_tiny_patch16_224", "model.name=vit_small_patch16_224"
MIM_2D = ("model=cnn2d", "objective=mim", "model.name=resnet18")
MIM_3D = ("model=cnn3d", "objective=mim", "model.name=resnet10_3d")
PATCHES = {False: ((64, 128, 256), ((16, 64, 64), (32, 128, 128))),   # (2-D sides, 3-D shapes); True: --quick
           True: ((64, 128, 256), ((8, 32, 32), (16, 64, 64)))}         # (MIM: 2-D patches of 64 at least)


@dataclass
class Point:
    """One size of a series: its work, what its rate counts (images per step, voxels), and per repeat the
    seconds and peak RSS."""

    size: str
    work: float
    count: float
    seconds: list[float] = field(default_factory=list)
    rss_mib: list[float] = field(default_factory=list)


@dataclass
class Series:
    """One table: how one cost grows along one kind of work."""

    title: str
    columns: tuple[str, str, str, str]  # size, work, time, rate
    points: list[Point] = field(default_factory=list)


def exponent(work_ratio: float, value_ratio: float) -> tuple[float, str]:
    """log(value ratio) / log(work ratio), and what it says."""
    e = math.log(value_ratio) / math.log(work_ratio)
    return e, "linear" if abs(e - 1) <= LINEAR else "sublinear" if e < 1 else "superlinear"


def number(value: float) -> str:
    return f"{value:,.0f}".replace(",", " ") if value >= 100 else f"{value:.3g}"


def growth(a: Point, b: Point) -> list[str]:
    """Work ratio, then time and RSS ratios each with its exponent, from ``a`` to ``b``."""
    work = b.work / a.work
    cells = [f"{work:.2f}"]
    for ratio in (min(b.seconds) / min(a.seconds), max(b.rss_mib) / max(a.rss_mib)):
        e, word = exponent(work, ratio)
        cells.append(f"{ratio:.2f} ({e:.2f}, {word})")
    return cells


def table(series: Series) -> str:
    """The series as a markdown table, then its growth from the smallest size to the largest."""
    size, work, unit, rate = series.columns
    lines = [f"**{series.title}**", "",
             f"| {size} | {work} | {unit} fastest (median) | {rate} | peak RSS MiB | work x | time x (exponent) "
             "| peak RSS x (exponent) |", "|---|---|---|---|---|---|---|---|"]
    for i, p in enumerate(series.points):
        ratios = growth(series.points[i - 1], p) if i else ["", "", ""]
        lines.append(f"| {p.size} | {number(p.work)} | {min(p.seconds):.3g} ({statistics.median(p.seconds):.3g}) "
                     f"| {number(p.count / min(p.seconds))} | {max(p.rss_mib):.0f} | " + " | ".join(ratios) + " |")
    if len(series.points) > 2:
        work, seconds, rss = growth(series.points[0], series.points[-1])
        lines += ["", f"{series.points[0].size} to {series.points[-1].size}: work x{work}, time x{seconds}, "
                      f"peak RSS x{rss}"]
    return "\n".join(lines)


def progress(label: str, seconds: float, unit: str, rss_mib: float) -> None:
    print(f"  {label}: {seconds:.3g} {unit}, {rss_mib:.0f} MiB (load average {os.getloadavg()[0]:.1f})", flush=True)


# --- pretraining step ---------------------------------------------------------------------------------------------


def train_step(args: list[str], steps: int) -> Result:
    """``workloads.bare``, also reporting the work of a step: the batch's pixels and the trained parameters."""
    cfg, module, images = bare_parts(args)
    run = bare_loop(cfg, module, images, steps)
    return Result(run.rate, run.rss_mib, extra={"pixels": images.numel(), "parameters": trained_parameters(module)})


def train_plan(quick: bool) -> list[tuple[str, str, list[tuple[str, Setup]]]]:
    """(title, the work: "pixels" or "parameters", (row, setup) per size) of every series. The timed steps
    shrink as the step grows (a few seconds of steps per run); --quick: tiny patches, batch 2, one step."""
    sides, cubes = PATCHES[quick]

    def series(base: tuple[str, ...], shapes: Sequence[tuple[int, ...]], batch: int,
               steps: tuple[int, ...]) -> list[tuple[str, Setup]]:
        rows = []
        for shape, n in zip(shapes, steps):
            size = "x".join(map(str, shape))
            rows.append((size, Setup((*base, f"data.patch_shape=[{','.join(map(str, shape))}]"),
                                     2 if quick else batch, 1 if quick else n, f"{' '.join(base)} {size}")))
        return rows

    squares = [(s, s) for s in sides]
    tiny = series((*MAE_2D, TINY), squares, 16, (20, 10, 5))
    small = series((*MAE_2D, SMALL), squares[1:2], 16, (5,))
    return [("Pretraining step vs patch side: ViT-Ti/16 MAE, 2-D", "pixels", tiny),
            ("Pretraining step vs patch side: ResNet-18 MIM, 2-D", "pixels", series(MIM_2D, squares, 8, (12, 6, 3))),
            ("Pretraining step vs patch size: ViT-Ti MAE, 3-D (4x16x16 tokens)", "pixels",
             series((*MAE_3D, TINY), cubes, 2, (10, 3))),
            ("Pretraining step vs patch size: ResNet10-3D MIM", "pixels", series(MIM_3D, cubes, 1, (6, 2))),
            (f"Pretraining step vs model size: MAE at {tiny[1][0]}", "parameters",
             [("ViT-Ti/16", tiny[1][1]), ("ViT-S/16", small[0][1])])]


def measure_training(volume: Path, work: Path, quick: bool, repeats: int) -> list[Series]:
    """Every series of ``train_plan``, each run in a fresh process; a setup in two series is measured once."""
    done: dict[Setup, list[Result]] = {}

    def runs(setup: Setup, label: str) -> list[Result]:
        if setup not in done:
            done[setup] = []
            for repeat in range(repeats):
                run_dir = work / f"train{len(done)}_{repeat}"
                args = overrides(setup, volume, run_dir, setup.batch, setup.steps, 0, None)
                done[setup].append(in_fresh_process(train_step, args, setup.steps))
                progress(label, setup.batch / done[setup][-1].rate, "s/step", done[setup][-1].rss_mib)
        return done[setup]

    out = []
    for title, key, rows in train_plan(quick):
        series = Series(f"{title}, batch {rows[0][1].batch}", (
            "patch" if key == "pixels" else "model", f"{key} per step" if key == "pixels" else "trained parameters",
            "s/step", "images/s"))
        for size, setup in rows:
            results = runs(setup, f"{title}, {size}")
            series.points.append(Point(size, results[0].extra[key], setup.batch,
                                       [setup.batch / r.rate for r in results], [r.rss_mib for r in results]))
        out.append(series)
    return out


# --- prediction and clustering --------------------------------------------------------------------------------------


def volumes(work: Path, base_shape: tuple[int, int, int]) -> dict[str, Path]:
    """Synthetic EM of ``base_shape`` (1x, with the labels the checkpoint is fine-tuned on), and 8x and 64x
    (twice and four times every side) mirrored out from it, written slab by slab."""
    synthetic = make_synthetic_em(base_shape, seed=0)
    larger = {f"{f**3}x": grown(synthetic, tuple(f * s for s in base_shape), work) for f in (2, 4)}
    return {"1x": save_synthetic(synthetic, work / "base.zarr"), **larger}


def predict(checkpoint: Path, volume: Path, output: Path) -> tuple[float, float]:
    """Seconds and peak RSS of ``emfm predict`` with the command's defaults, in a fresh process."""
    run = emfm_predict(checkpoint, volume, output, BATCH, dtype="uint8")
    return run["seconds"], run["rss_mib"]


def cluster(checkpoint: Path, volume: Path, output: Path) -> tuple[float, float]:
    """Seconds and peak RSS of ``emfm cluster`` (k=8, no pictures), in a fresh process."""
    result = in_fresh_process(emfm_cluster, checkpoint, volume, output)
    return math.prod(Volume(volume).shape) / result.rate, result.rss_mib


def measure_volumes(section: str, paths: dict[str, Path], checkpoint: Path, work: Path, repeats: int) -> Series:
    """One command against the volume's size; the largest volume runs once."""
    command = {"predict": predict, "cluster": cluster}[section]
    series = Series(f"`emfm {section}` vs volume size", ("volume", "voxels", "s", "voxels/s"))
    for size, path in paths.items():
        shape = Volume(path).shape
        point = Point(f"{size} {'x'.join(map(str, shape))}", math.prod(shape), math.prod(shape))
        for repeat in range(1 if size == list(paths)[-1] else repeats):
            seconds, rss = command(checkpoint, path, work / f"{section}_{size}_{repeat}.zarr")
            point.seconds.append(seconds)
            point.rss_mib.append(rss)
            progress(f"{series.title}, {point.size}", seconds, "s", rss)
        series.points.append(point)
    return series


def main() -> None:
    parser = command_line("growth", __doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke run")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--repeats", type=int, help="runs per size (default 2, 1 with --quick; the 64x volume: 1)")
    parser.add_argument("--threads", type=int, help="torch threads of every process (OMP_NUM_THREADS)")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 2)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)      # read by every process started from here on
        torch.set_num_threads(args.threads)
    start, seconds, tables = time.perf_counter(), {}, []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "train" in args.only:
            volume = save_synthetic(make_synthetic_em((16, 256, 256) if args.quick else (64, 256, 256), seed=0),
                                    work / "train.zarr")
            tables += measure_training(volume, work, args.quick, repeats)
            seconds["train"] = time.perf_counter() - start
        commands = [s for s in SECTIONS[1:] if s in args.only]
        if commands:
            paths = volumes(work, (2, 128, 128) if args.quick else (4, 512, 512))
            checkpoint = make_checkpoint(work, paths["1x"])   # ViT-Ti/16 UNETR, 128x128, after 1 step
            for section in commands:
                begin = time.perf_counter()
                tables.append(measure_volumes(section, paths, checkpoint, work, repeats))
                seconds[section] = time.perf_counter() - begin
    print(f"\n{machine()}, {repeats} repeats; "
          f"{time.perf_counter() - start:.0f} s in all (" + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
          + "); x: ratio to the size above; exponent: log(time ratio) / log(work ratio)\n")
    print("\n\n".join(table(s) for s in tables))


if __name__ == "__main__":
    main()
