"""Is a user better off with emfm than with what they would reach for instead? emfm against its peers.

Every arm runs in a new process (``harness.in_fresh_process``, forked from a server that imported
torch, timm, Lightning, Hydra and emfm once; the arms are in ``peers_arms.py``), emfm and peer
alternating (in prediction, emfm first in every other repeat), on the same machine, model, batch and
input. Each ratio is emfm / peer in throughput (images/s, voxels/s; above 1 emfm is faster) of one
repeat (an emfm run over the peer run beside it), given as min / median / max over the repeats. Peak
RSS is each arm's process's own; forked so, it leaves out the library pages touched only by the
imports (~0.5 GiB less than the same work started as a new interpreter), alike on both sides.
``--paired`` builds both training sides in one process per repeat and times them in alternating
blocks: one side's images/s moves by ±10 % from one fresh process to the next on the 2-core machine,
more than the differences measured. Each arm reports what it computed, read from the objects it
built; the table lists what differs, the lines below it what is alike.

- Pretraining step vs lightly (MAE on timm's ViT-Ti/16 and ViT-S/16, SimCLR on timm's ResNet-18;
  128x128 patches, batch 32). emfm: ``workloads.bare``: the module of ``emfm pretrain``,
  ``compute_loss`` (with emfm's on-device augmentation), backward, gradient clipping, AdamW, on a
  batch of real patches. lightly: the same timm model in lightly's blocks
  (``MaskedVisionTransformerTIMM`` + ``MaskedVisionTransformerDecoderTIMM``, ``SimCLRProjectionHead``
  + ``NTXentLoss``), sized from emfm's config, in the same loop (``workloads.plain_loop``) on the
  same batch. lightly augments in DataLoader workers, outside the step, so emfm's augmentation is
  also timed alone and a second ratio leaves it out.
- Sliding window vs MONAI's ``sliding_window_inference(mode="gaussian")`` (sigma 1/8 of the tile,
  as emfm's): ``emfm.inference.sliding_window(blend="gaussian")`` on a normalised 2-D stack (a
  ViT-Ti/16 UNETR checkpoint, tiles 1x128x128, as ``emfm predict`` runs a 2-D model) and a 3-D
  volume (a 3-D ViT-Ti UNETR, 16x64x64 tiles) in memory; then ``emfm predict`` (blockwise, OME-Zarr
  in and out) against MONAI on the whole array read into memory and written back, at 1x and 8x the
  volume, both timed from the model load to the written output. Same overlap (0.25), tiles,
  batch (8) and weights; emfm's forward passes at ``--precision`` (its default, auto: bf16 on a CPU with AMX),
  MONAI's in float32 as its users run it, or under bfloat16 autocast with ``--peer-precision bf16`` (the in-memory
  sliding windows run float32 on both sides whatever the flags). The ``emfm predict`` and ``emfm cluster`` arms keep
  freed memory for the next forward pass as the command does (``emfm.allocator``), the peers' processes allocate as
  glibc does by default; run the script with ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` set and both
  sides allocate alike (emfm then leaves the setting to the environment).
- Clustering vs the notebook way: ``emfm cluster`` (features into a store, sample, PCA, k-means,
  map blockwise) against the obvious script (volume and features in memory with ``dense_features``,
  scikit-learn ``KMeans`` on every vector, map upsampled by repetition), same encoder, k and volume,
  at growing sizes; the adjusted Rand index (ARI) says how alike the two maps are, next to the ARI
  of the script with itself under another k-means seed. Both run under an address-space limit
  (``--memory-gib``) so that the script fails there instead of taking the machine down;
  ``--large`` adds 64x2048x2048 and 128x4096x4096 (128x and 1024x the
  8x512x512 volume; 73 min idle, measured), where the script does not fit.

    python -m benchmarks.peers                     # full run: 7 min on 2 idle CPU cores (421 s, 395 s; 2026-12-02)
    python -m benchmarks.peers --quick             # smoke run, tiny sizes, one repeat (1 min)
    python -m benchmarks.peers --only cluster --cluster-sizes 8x512x512 64x2048x2048 --memory-gib 20

Run it on an idle machine: under load, the arms' timings differ by more than what is measured.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks import harness
from benchmarks import peers_arms as arms
from benchmarks.harness import Result, command_line
from benchmarks.workloads import (
    Setup,
    emfm_cluster,
    forward_precision,
    grown,
    make_checkpoint,
    overrides,
    timed_predict,
)
from emfm.data.synthetic import make_synthetic_em, save_synthetic
from emfm.data.volume import Volume
from emfm.inference import blend_weights, tile_corners

SECTIONS = ("train", "predict", "cluster")
TRAIN = {
    "mae_vit_tiny": Setup(("model=vit2d", "objective=mae", "model.name=vit_tiny_patch16_224"), batch=32, steps=10,
                          label="MAE step, ViT-Ti/16"),
    "mae_vit_small": Setup(("model=vit2d", "objective=mae", "model.name=vit_small_patch16_224"), batch=32, steps=6,
                           label="MAE step, ViT-S/16"),
    "simclr_resnet18": Setup(("model=cnn2d", "objective=simclr", "model.name=resnet18"), batch=32, steps=4,
                             label="SimCLR step, ResNet-18"),
}
OVERLAP, BATCH = 0.25, 8        # sliding window, both sides
PAIRED_ROUNDS = 2               # --paired: timed blocks per side in each process
# Every arm in a new process forked from one that holds the imports: ~8 s saved per arm, 46 arms a run.
in_fresh_process = functools.partial(harness.in_fresh_process, method="forkserver")


@dataclass
class Comparison:
    """Repeated emfm / peer runs of one setting, and what the table says about them."""

    name: str
    unit: str
    peer: str
    emfm: list[Result] = field(default_factory=list)
    others: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failed: str | None = None             # why the peer has no result

    def ratios(self, rate: Callable[[Result], float] = lambda r: r.rate) -> list[float]:
        return [rate(e) / rate(p) for e, p in zip(self.emfm, self.others)]

    def facts(self, alike: bool) -> list[str]:
        """The facts both sides report, with different values (or the same, ``alike``)."""
        if not self.emfm or not self.others:
            return []
        mine, theirs = self.emfm[0].facts, self.others[0].facts
        if alike:
            return [f"{key} {mine[key]}" for key in mine if theirs.get(key) == mine[key]]
        return [f"{key}: emfm {mine[key]}, {self.peer} {theirs[key]}"
                for key in mine if key in theirs and mine[key] != theirs[key]]


def spread(values: Sequence[float], digits: int = 2) -> str:
    """min / median / max (the value alone when there is one)."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return " / ".join(f"{v:.{digits}f}" for v in (min(values), statistics.median(values), max(values)))


def rates(results: Sequence[Result]) -> str:
    values = [r.rate for r in results]
    if max(values, default=0) >= 1000:
        return spread([v / 1000 for v in values], 1) + " k"
    return spread(values)


def table(comparisons: Sequence[Comparison]) -> str:
    """The markdown table of every comparison, then what each pair computes alike."""
    lines = ["| comparison | unit | emfm (min / median / max) | peer | ratio emfm / peer | peak RSS MiB "
             "emfm / peer | where the two differ |", "|---|---|---|---|---|---|---|"]
    for c in comparisons:
        peer = f"{c.peer}: failed ({c.failed})" if c.failed else f"{c.peer}: {rates(c.others)}"
        rss = " / ".join(f"{max(r.rss_mib for r in arm):.0f}" if arm else "-" for arm in (c.emfm, c.others))
        notes = "; ".join(c.notes + c.facts(alike=False)).replace("|", "/")
        lines.append(f"| {c.name} | {c.unit} | {rates(c.emfm)} | {peer} | **{spread(c.ratios(), 3)}** | {rss} "
                     f"| {notes} |")
    lines.append("")
    lines += [f"- {c.name}, alike: {'; '.join(c.facts(alike=True))}" for c in comparisons if c.facts(alike=True)]
    return "\n".join(lines)


def progress(c: Comparison) -> None:
    peer = f"{c.others[-1].rate:.1f}" if len(c.others) == len(c.emfm) else c.failed
    print(f"  {c.name}: emfm {c.emfm[-1].rate:.1f} {c.unit} ({c.emfm[-1].rss_mib:.0f} MiB), {c.peer} {peer}",
          flush=True)


def in_turn(c: Comparison, repeat: int, mine: Callable[[], Result], theirs: Callable[[], Result]) -> None:
    """One emfm run and one peer run added to ``c``, emfm first in even repeats and second in odd ones: whatever
    a run leaves to the next (its output's writeback, a clock drifting one way) falls on both sides alike."""
    if repeat % 2:
        c.others.append(theirs())
        c.emfm.append(mine())
    else:
        c.emfm.append(mine())
        c.others.append(theirs())
    progress(c)


def differences(a: np.ndarray, b: np.ndarray, unit: float) -> str:
    """How far apart two outputs are: the largest difference and the share of values apart by more than ``unit``."""
    d = np.abs(a.astype(np.float64) - b)
    return f"|emfm - MONAI| max {d.max():.3f}, > {unit:.3g} at {100 * (d > unit).mean():.2f} % of voxels"


# --- the comparisons ------------------------------------------------------------------------------------------


def compare_training(volume: Path, work: Path, args: argparse.Namespace) -> list[Comparison]:
    out = []
    for key, setup in TRAIN.items():
        batch, steps, patch = (4, 2, 64) if args.quick else (setup.batch, setup.steps, 128)
        sized = Setup((*setup.overrides, f"data.patch_shape=[{patch},{patch}]"), batch, steps, setup.label)
        c = Comparison(f"{setup.label}, {patch}x{patch}, batch {batch}", "images/s", "lightly")
        for repeat in range(args.repeats):
            run_args = overrides(sized, volume, work / f"{key}{repeat}", batch, steps, 0, None)
            if args.paired:      # one process for both sides, alternating blocks (RSS: both models together)
                mine, theirs = in_fresh_process(arms.paired_train, run_args, steps, PAIRED_ROUNDS)
                c.emfm += mine
                c.others += theirs
            else:
                c.emfm.append(in_fresh_process(arms.emfm_train, run_args, steps))
                c.others.append(in_fresh_process(arms.lightly_train, run_args, steps))
            progress(c)
        unaugmented = c.ratios(lambda r: 1 / (1 / r.rate - r.extra.get("augment_seconds", 0.0) / r.extra["batch"])
                               if "batch" in r.extra else r.rate)
        c.notes.append(f"ratio with emfm's augmentation left out {spread(unaugmented, 3)}")
        out.append(c)
    return out


def emfm_blockwise(checkpoint: Path, volume: Path, output: Path, precision: str) -> Result:
    """``emfm predict`` in a new process (``workloads.timed_predict``), timed from the model load to the
    finished store; the tiles it runs: each of the whole volume's grid once (emfm.blockwise.tiles)."""
    run = in_fresh_process(timed_predict, checkpoint, volume, output, BATCH, "gaussian", "uint8", precision)
    shape, tile = Volume(volume).shape, (1, 128, 128)                               # make_checkpoint's model
    tiles = len(tile_corners(shape, tile, OVERLAP))
    weights = blend_weights(tile, kind="gaussian")
    return Result(math.prod(shape) / run["seconds"], run["rss_mib"],
                  {"tiles through the model": f"{tiles} ({run['blocks']} blocks)",
                   "Gaussian weight at a tile corner": f"{float(weights.min() / weights.max()):.0e}",
                   "forward passes": forward_precision(precision), "freed memory": run["freed_memory"]})


def compare_prediction(volumes: dict[str, Path], checkpoint: Path, work: Path,
                       args: argparse.Namespace) -> list[Comparison]:
    out = []
    for label, model, volume in (("2-D stack", checkpoint, volumes["stack"]), ("3-D volume", None, volumes["3d"])):
        shape = "x".join(map(str, Volume(volume).shape))
        c = Comparison(f"sliding window in memory, {label} {shape}", "voxels/s", "MONAI")
        for repeat in range(args.repeats):
            ours, peer = (functools.partial(in_fresh_process, arms.window_arm, side, model, volume, OVERLAP, BATCH)
                          for side in ("emfm", "monai"))
            in_turn(c, repeat, ours, peer)
        c.notes.append(differences(c.emfm[0].extra["probes"], c.others[0].extra["probes"], 1 / 255)
                       + f" (of {arms.PROBES} sampled)")
        out.append(c)
    for size in ("1x", "8x"):
        volume = volumes[size]
        shape = "x".join(map(str, Volume(volume).shape))
        c = Comparison(f"`emfm predict` (blockwise, zarr) vs MONAI on the whole array, {size} {shape}", "voxels/s",
                       "MONAI")
        for repeat in range(args.repeats if size == "1x" else args.large_repeats):
            mine, theirs = work / f"emfm_{size}{repeat}.zarr", work / f"monai_{size}{repeat}.zarr"
            in_turn(c, repeat, functools.partial(emfm_blockwise, checkpoint, volume, mine, args.precision),
                    functools.partial(in_fresh_process, arms.monai_whole, checkpoint, volume, theirs, OVERLAP, BATCH,
                                      args.peer_precision))
        import zarr

        stored = [np.asarray(zarr.open_array(str(p), mode="r")[...]) for p in (mine / "0", theirs)]
        c.notes.append(differences(stored[0], stored[1], unit=1) + " (uint8 levels)")
        out.append(c)
    return out


def agreement(emfm_store: Path, plain: Path, stride: Sequence[int], voxels: int = 20_000_000) -> str:
    """Adjusted Rand index of the two maps over the voxels (a regular subsample past ``voxels``) and at the
    feature cells' centres, where the two ways of upsampling agree."""
    import zarr
    from sklearn.metrics import adjusted_rand_score

    mine, theirs = zarr.open_array(f"{emfm_store}/0", mode="r"), np.load(plain, mmap_mode="r")
    step = max(1, math.ceil((math.prod(mine.shape) / voxels) ** 0.5))
    every = (slice(None), slice(None, None, step), slice(None, None, step))
    centres = tuple(slice(k // 2, None, k) for k in stride)
    ari = [adjusted_rand_score(np.asarray(mine[key]).ravel(), np.asarray(theirs[key]).ravel())
           for key in (every, centres)]
    return f"ARI of the two maps {ari[0]:.3f} (at feature-cell centres {ari[1]:.3f})"


def compare_clustering(volumes: dict[str, Path], checkpoint: Path, work: Path,
                       args: argparse.Namespace) -> list[Comparison]:
    out = []
    for size, volume in volumes.items():
        shape = "x".join(map(str, Volume(volume).shape))
        c = Comparison(f"`emfm cluster` vs notebook, {size} {shape}", "voxels/s", "notebook")
        for repeat in range(args.repeats if size == "1x" else args.large_repeats):
            mine, theirs = work / f"clusters_{size}{repeat}.zarr", work / f"clusters_{size}{repeat}.npy"
            c.emfm.append(in_fresh_process(emfm_cluster, checkpoint, volume, mine, args.precision,
                                           memory_gib=args.memory_gib))
            try:
                c.others.append(in_fresh_process(arms.plain_cluster, checkpoint, volume, theirs, args.precision,
                                                 memory_gib=args.memory_gib))
            except (MemoryError, BrokenProcessPool, RuntimeError) as err:   # torch: RuntimeError, can't allocate
                c.failed = f"{type(err).__name__} under the {args.memory_gib:g} GiB limit: {str(err)[:80]}"
            progress(c)
        if not c.failed:
            c.notes += [agreement(mine, theirs, c.others[-1].extra["stride"]),
                        f"notebook vs itself with another k-means seed: ARI {c.others[-1].extra['self_ari']:.3f}"]
        out.append(c)
    return out


# --- data and main ----------------------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        z, y, x = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ZxYxX, e.g. 8x512x512") from None
    return z, y, x


def main() -> None:
    parser = command_line("peers", __doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke run")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--repeats", type=int, help="emfm/peer pairs per setting (default 3, 1 with --quick; "
                                                    "settings at 8x the volume and more: --large-repeats)")
    parser.add_argument("--large-repeats", type=int, default=1, help="pairs per setting at 8x the volume and more")
    parser.add_argument("--paired", action="store_true", help="training: both sides in one process per repeat, "
                        f"{PAIRED_ROUNDS} alternating blocks each (the spread between processes falls on both alike)")
    parser.add_argument("--cluster-sizes", nargs="+", type=parse_shape, help="ZxYxX volumes for the clustering "
                                                                             "(default: 1x and 8x)")
    parser.add_argument("--large", action="store_true", help="clustering also at 64x2048x2048 and 128x4096x4096 "
                                                             "(73 min; the notebook way fails at the second)")
    parser.add_argument("--precision", choices=["auto", "32", "bf16"], default="auto",
                        help="emfm's forward passes in prediction and clustering (the notebook's too), as its "
                             "`precision` key: auto is bf16 on a CPU with AMX")
    parser.add_argument("--peer-precision", choices=["32", "bf16"], default="32",
                        help="MONAI's forward passes: float32 as its users run it, or under bfloat16 autocast")
    parser.add_argument("--memory-gib", type=float, default=20.0,
                        help="address-space limit of each clustering process (this machine has 24 GiB)")
    args = parser.parse_args()
    args.repeats = args.repeats or (1 if args.quick else 3)
    base_shape = (4, 256, 256) if args.quick else (8, 512, 512)
    eight = (2 * base_shape[0], 2 * base_shape[1], 2 * base_shape[2])
    sizes = args.cluster_sizes or [base_shape, eight, *([(64, 2048, 2048), (128, 4096, 4096)] if args.large else [])]
    start, seconds = time.perf_counter(), {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        synthetic = make_synthetic_em(base_shape, seed=0)
        base = save_synthetic(synthetic, work / "base.zarr")

        volume = functools.partial(grown, synthetic, work=work)

        checkpoint = make_checkpoint(work, base)           # ViT-Ti/16 UNETR, 128x128, after 1 step
        comparisons: list[Comparison] = []
        for section in args.only:
            begin = time.perf_counter()
            if section == "train":
                comparisons += compare_training(base, work, args)
            elif section == "predict":
                volumes = {"stack": volume((base_shape[0] // 2, *base_shape[1:])),
                           "3d": volume((16, 96, 96) if args.quick else (32, 192, 192)), "1x": base,
                           "8x": volume(eight)}
                comparisons += compare_prediction(volumes, checkpoint, work, args)
            else:
                named = {f"{math.prod(s) // math.prod(base_shape)}x": volume(s) for s in sizes}
                comparisons += compare_clustering(named, checkpoint, work, args)
            seconds[section] = time.perf_counter() - begin
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} torch threads, {args.repeats} repeats; "
          f"{time.perf_counter() - start:.0f} s in all (" + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
          + "); ratio = emfm / peer in throughput (> 1: emfm faster)\n")
    print(table(comparisons))


if __name__ == "__main__":
    main()
