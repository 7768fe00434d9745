"""Cluster IoU of learned features against the raw-intensity baseline, over encoders, layers and k.

Runs ``emfm cluster`` for every (encoder, layer, k); the features of an (encoder, layer) are
computed once and reused for every k. ``--random-twin`` adds the same architecture with random
weights, which tells what the pretraining itself contributes beyond the architecture.

    python -m benchmarks.cluster_sweep --checkpoint mae=pre/checkpoints/last.ckpt --random-twin \\
        --input train.zarr --labels membranes=mem.zarr --labels mitochondria=mito.zarr \\
        --layers 0 3 --k 4 8 12 --out sweep/
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import command_line, config
from emfm import run
from emfm.checkpoints import read_checkpoint


def random_twin(checkpoint: Path, out: Path) -> Path:
    """A checkpoint of the same encoder architecture with freshly initialised weights."""
    from emfm.models.encoders import create_encoder

    config = read_checkpoint(checkpoint)["hyper_parameters"]["encoder"]
    torch.manual_seed(0)
    encoder = create_encoder(**config)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"hyper_parameters": {"encoder": config},
                "state_dict": {f"encoder.{k}": v for k, v in encoder.state_dict().items()}}, out)
    return out


def cluster(overrides: list[str]) -> dict[str, Any]:
    return run.cluster(config(overrides, "cluster"))


def main() -> None:
    parser = command_line("cluster_sweep", __doc__)
    parser.add_argument("--checkpoint", action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--random-twin", action="store_true", help="also the first encoder with random weights")
    parser.add_argument("--input", required=True)
    parser.add_argument("--labels", action="append", required=True, metavar="CLASS=MASK.zarr")
    parser.add_argument("--layers", type=int, nargs="+", default=[-1])
    parser.add_argument("--k", type=int, nargs="+", default=[8])
    parser.add_argument("--stride", type=int, help="feature stride (default: the map's own)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    encoders = dict(item.split("=", 1) for item in args.checkpoint)
    if args.random_twin:
        first = Path(next(iter(encoders.values())))
        encoders["random"] = str(random_twin(first, args.out / "random_twin.ckpt"))
    labels = "{" + ",".join(args.labels).replace("=", ":") + "}"
    rows = []
    for name, checkpoint in encoders.items():
        for layer in args.layers:
            store = None
            for k in args.k:
                tag = f"{name}_layer{layer}_k{k}"
                overrides = [f"checkpoint={checkpoint}", f"input={args.input}", f"k={k}", f"layer={layer}",
                             f"labels={labels}", f"output={args.out / (tag + '.zarr')}",
                             f"report={args.out / (tag + '.json')}", f"hydra.run.dir={args.out / tag}",
                             f"pictures={args.out / tag / 'pictures'}", "progress=false"]
                overrides += [f"stride={args.stride}"] if args.stride else []
                overrides += [f"features={store}"] if store else []
                report = cluster(overrides)
                store = store or report["features"]
                rows.append({"encoder": name, "layer": layer, "k": k, **{
                    arm: {"iou": report[arm]["iou"], "iou_merged": report[arm]["iou_merged"], "ari": report[arm]["ari"]}
                    for arm in ("learned", "intensity_baseline")}, "seconds": report["seconds"]})
    (args.out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    classes = [c.split("=")[0] for c in args.labels]
    print("\n| encoder | layer | k | " + " | ".join(f"{c} IoU (baseline)" for c in classes)
          + " | ARI (baseline) | seconds |")
    print("|---" * (5 + len(classes)) + "|")
    for r in rows:
        ious = " | ".join(f"{r['learned']['iou'][c]:.3f} ({r['intensity_baseline']['iou'][c]:.3f})" for c in classes)
        print(f"| {r['encoder']} | {r['layer']} | {r['k']} | {ious} | {r['learned']['ari']:.3f} "
              f"({r['intensity_baseline']['ari']:.3f}) | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
