"""Few-label pixel classification on each feature source, alone and beside the filter bank (issue 27).

``emfm features`` computes every base source once at one feature vector a voxel on the training slice and on the
eval slices: the filter bank (``source=filters``) and, of the checkpoint, the decoder's full-resolution features
(``layer=decoder``) and a hypercolumn (``layer=hypercolumn``: encoder maps upsampled, :data:`BASES`). A source named
``a+b`` stacks two base sources' channels, the ilastik workflow with learned features beside its filters. For each
source, target and seed, emfm's random forest (:class:`~emfm.explore.classifier.PixelClassifier`, as
``emfm classify`` trains it: on 20 000 of the labelled voxels, drawn in the classes' shares) learns from the
training slice -- the whole slice labelled, and sparse labels: a random ``--sparse`` share of its voxels, drawn per
seed -- and is scored on a random sample of the eval slices' voxels (the same sample for every arm): IoU of the
class it gives the higher probability against the mask (voxels > 0). Features are computed slice by slice (the
filter bank's ``per_slice=true``; a 2-D network's always), so the train and eval stores see alike context.

    python -m benchmarks.classify_sweep --checkpoint pt_unet2d/checkpoints/last.ckpt --input stack1.zarr \\
        --labels membranes=stack1_membranes.zarr --labels mitochondria=stack1_mito.zarr \\
        --train-slice 0 --eval-slices 15 20 --seeds 0 1 2 --out sweep27/
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from benchmarks.harness import command_line, config
from emfm import run
from emfm.data.volume import Volume
from emfm.explore.classifier import PixelClassifier

# The hypercolumn of a full-resolution U-Net's maps at strides 2-8 (64 + 128 + 256 channels of unet2d): the context
# the decoder's last stage may not keep; all five maps would be 992 channels a voxel.
BASES = {"filters": ["source=filters", "filters.per_slice=true"], "decoder": ["layer=decoder"],
         "hypercolumn": ["layer=hypercolumn", "stages=[1,2,3]", "stride=1"]}


def feature_store(base: str, checkpoint: str, volume: str, z: tuple[int, int], out: Path) -> zarr.Array:
    """The base source's features (F, z, y, x) of slices ``z`` of the volume, computed into ``out`` (a finished store
    of the same settings is reused, an unfinished one continued: ``emfm features``' own rules)."""
    tag = f"{base}_z{z[0]}-{z[1]}"
    overrides = [*BASES[base], f"input={volume}", f"output={out / (tag + '.zarr')}", f"hydra.run.dir={out / tag}",
                 f"roi='{z[0]}:{z[1]},:,:'", "progress=false"]
    overrides += [] if base == "filters" else [f"checkpoint={checkpoint}"]
    start = time.perf_counter()
    run.features(config(overrides, "features"))
    print(f"  features {tag}: {time.perf_counter() - start:.0f} s", flush=True)
    return zarr.open_array(str(out / (tag + ".zarr") / "0"), mode="r")


def stacked(stores: list[zarr.Array], z: int, voxels: np.ndarray | None = None) -> np.ndarray:
    """The features of slice ``z`` of every store, channels stacked: (F, y, x), or (F, n) at flat ``voxels``."""
    parts = []
    for store in stores:
        plane = np.asarray(store[:, z], dtype=np.float32)
        parts.append(plane if voxels is None else plane.reshape(len(plane), -1)[:, voxels])
    return np.concatenate(parts)


def main() -> None:
    parser = command_line("classify_sweep", __doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--labels", action="append", required=True, metavar="CLASS=MASK.zarr")
    parser.add_argument("--sources", nargs="+",
                        default=["filters", "decoder", "hypercolumn", "filters+decoder", "filters+hypercolumn"])
    parser.add_argument("--train-slice", type=int, default=0)
    parser.add_argument("--eval-slices", type=int, nargs=2, default=[15, 20], metavar=("START", "STOP"))
    parser.add_argument("--sparse", type=float, default=0.01, help="share of the training slice's voxels labelled")
    parser.add_argument("--eval-voxels", type=int, default=300_000, help="eval voxels sampled (for every arm)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    train_z, (z0, z1) = args.train_slice, args.eval_slices
    masks = {name: Volume(path) for name, path in (item.split("=", 1) for item in args.labels)}
    plane = int(np.prod(Volume(args.input).shape[1:]))
    picked = np.sort(np.random.default_rng(0).choice((z1 - z0) * plane, args.eval_voxels, replace=False))
    by_slice = [picked[(picked >= i * plane) & (picked < (i + 1) * plane)] - i * plane for i in range(z1 - z0)]
    bases = sorted({b for source in args.sources for b in source.split("+")})
    train_stores = {b: feature_store(b, args.checkpoint, args.input, (train_z, train_z + 1), args.out) for b in bases}
    eval_stores = {b: feature_store(b, args.checkpoint, args.input, (z0, z1), args.out) for b in bases}

    rows: list[dict[str, Any]] = []
    for source in args.sources:
        parts = source.split("+")
        train = stacked([train_stores[b] for b in parts], 0)
        test = np.concatenate([stacked([eval_stores[b] for b in parts], i, v) for i, v in enumerate(by_slice)], 1)
        for name, mask in masks.items():
            truth = (mask.read((slice(train_z, train_z + 1),))[0] > 0).astype(np.int64)
            expected = np.concatenate([mask.read((slice(z0 + i, z0 + i + 1),))[0].reshape(-1)[v] > 0
                                       for i, v in enumerate(by_slice)])
            for labels_kind in ("slice", "sparse"):
                for seed in args.seeds:
                    labels = truth
                    if labels_kind == "sparse":      # -1: not labelled
                        drawn = np.random.default_rng(1000 + seed).random(truth.shape) < args.sparse
                        labels = np.where(drawn, truth, -1)
                    start = time.perf_counter()
                    classifier = PixelClassifier("forest", seed=seed).fit(train, labels, ignore=-1)
                    found = classifier.predict_proba(test).argmax(0) == classifier.classes.index(1)
                    iou = float((found & expected).sum() / max(1, (found | expected).sum()))
                    rows.append({"source": source, "target": name, "labels": labels_kind, "seed": seed,
                                 "channels": len(train), "iou": iou, "seconds": time.perf_counter() - start})
                    print(f"  {source} {name} {labels_kind} seed {seed}: IoU {iou:.3f} "
                          f"({rows[-1]['seconds']:.0f} s)", flush=True)
    (args.out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")

    print(f"\nRandom forest, trained on slice {train_z} (whole / {args.sparse:.0%} of its voxels), IoU on "
          f"{args.eval_voxels} voxels of slices {z0}-{z1 - 1}; mean (min-max) over seeds {args.seeds}")
    print("| source | channels | " + " | ".join(f"{n} {k}" for n in masks for k in ("slice", "sparse")) + " |")
    print("|---" * (2 + 2 * len(masks)) + "|")
    for source in args.sources:
        cells = []
        for name in masks:
            for labels_kind in ("slice", "sparse"):
                ious = [r["iou"] for r in rows if (r["source"], r["target"], r["labels"]) == (source, name,
                                                                                             labels_kind)]
                cells.append(f"{statistics.mean(ious):.3f} ({min(ious):.3f}-{max(ious):.3f})")
        channels = next(r["channels"] for r in rows if r["source"] == source)
        print(f"| {source} | {channels} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
