"""Does pretraining pay? Fine-tune from a pretrained encoder and from scratch on the same few slices.

Pretrains a masked-modelling encoder (MAE for vit2d, MIM for cnn2d) on the unlabeled volumes and
the raw volume (its labels unused), then for every labeled-slice set and seed fine-tunes twice with
the same head, steps, augmentation and seed -- once from the pretrained encoder, once from
scratch -- and scores both on the eval slices: IoU / Dice of the target, and the foreground-
restricted Rand F-score (V_rand) and variation of information of the instances derived from the
prediction (ISBI 2012 convention; best over the same thresholds for both arms).

    python scripts/label_efficiency.py --raw stack1.zarr --labels stack1_membranes.zarr \\
        --unlabeled stack2.zarr --target membrane --labeled-slices 0 --labeled-slices 0,1 \\
        --eval-slices 10-19 --pretrain-steps 1000 --finetune-steps 300 --model vit2d --seeds 0 \\
        --out label_efficiency/membranes.json

REPORT.json: {"pretrained": {"iou", "dice", "vrand", "vinfo", "seeds": [...]}, "scratch": {...},
"config": {...}, "seconds": {...}} for the first --labeled-slices, and "curve": the same for every
--labeled-slices given. A PNG next to it shows raw, truth and both arms' predictions on one eval slice.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from hydra import compose, initialize_config_module
from PIL import Image

from emfm import run
from emfm.data.labeled import IGNORE, HeldOutSlices, LabeledVolume, parse_slices
from emfm.errors import EmfmError
from emfm.evaluation.evaluate import THRESHOLDS, evaluate_region, load_segmenter

# Model sizes: "small" for real runs on a CPU (minutes), "tiny" for the test suite (seconds).
MODELS = {
    ("vit2d", "small"): ["model.name=vit_tiny_patch16_224", "model.patch_size=16", "data.patch_shape=[128,128]"],
    ("cnn2d", "small"): ["model.name=resnet18", "data.patch_shape=[128,128]"],
    ("vit2d", "tiny"): ["model.name=test_vit", "model.patch_size=8", "data.patch_shape=[32,32]"],
    ("cnn2d", "tiny"): ["model.name=test_resnet", "data.patch_shape=[64,64]"],
}
PRETRAIN = {  # CPU-sized heads and the plain pixel loss (docs/benchmarks.md: norm-pix needs GPU-length runs)
    "vit2d": ["objective=mae", "objective.methods.mae.decoder_dim=128", "objective.methods.mae.decoder_depth=2",
              "objective.methods.mae.decoder_heads=4", "objective.methods.mae.norm_pix_loss=false"],
    "cnn2d": ["objective=mim", "objective.methods.mim.decoder_dim=64"],
}
COMMON = ["logger=default", "~logger.tensorboard", "callbacks.progress_bar=null", "trainer.enable_model_summary=false"]


def hydra_run(command: str, overrides: list[str]) -> dict[str, float]:
    with initialize_config_module("emfm.configs", version_base="1.3"):
        cfg = compose(command, overrides)
    return getattr(run, command)(cfg)


def summary(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("iou", "dice", "vrand", "vinfo", "vi")
    return {**{k: float(np.mean([s[k] for s in per_seed])) for k in keys if k in per_seed[0]}, "seeds": per_seed}


def panel(array: np.ndarray, lo: float, hi: float) -> Image.Image:
    scaled = np.clip((array - lo) / max(hi - lo, 1e-6), 0, 1)
    return Image.fromarray((255 * scaled).astype(np.uint8))


def save_comparison(path: Path, raw: np.ndarray, truth: np.ndarray, arms: dict[str, np.ndarray]) -> None:
    """raw | truth | one probability map per arm, side by side (unlabeled truth pixels grey)."""
    shown = np.where(truth == IGNORE, 0.5, truth > 0)
    panels = [panel(raw, *np.percentile(raw, [1, 99])), panel(shown.astype(float), 0, 1)]
    panels += [panel(probs[0], 0, 1) for probs in arms.values()]
    width, height = panels[0].size
    sheet = Image.new("L", (width * len(panels), height))
    for i, image in enumerate(panels):
        sheet.paste(image, (i * width, 0))
    sheet.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", required=True, help="raw volume with labels on some slices")
    parser.add_argument("--labels", required=True, help="label volume of the same shape")
    parser.add_argument("--unlabeled", nargs="*", default=[], help="more volumes for pretraining")
    parser.add_argument("--target", default="membrane", choices=["membrane", "foreground", "semantic"])
    parser.add_argument("--labeled-slices", action="append", required=True,
                        help="training slices, e.g. 0,1; give it several times for a curve")
    parser.add_argument("--eval-slices", required=True, help="held-out slices to score, e.g. 10-19")
    parser.add_argument("--pretrain-steps", type=int, default=1000)
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--model", default="vit2d", choices=["vit2d", "cnn2d"])
    parser.add_argument("--model-size", default="small", choices=["small", "tiny"])
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--finetune-override", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override for both arms' fine-tuning, e.g. module.layer_decay=1.0")
    parser.add_argument("--encoder", help="skip pretraining: an emfm checkpoint or exported encoder to compare")
    parser.add_argument("--out", type=Path, required=True, help="REPORT.json")
    args = parser.parse_args()

    try:
        data = LabeledVolume(args.raw, args.labels)
        eval_slices = parse_slices(args.eval_slices, data.depth, "--eval-slices")
        labeled_sets = [parse_slices(spec, data.depth, "--labeled-slices") for spec in args.labeled_slices]
    except EmfmError as e:
        parser.error(str(e))
    for labeled in labeled_sets:
        if overlap := sorted(set(labeled) & set(eval_slices)):
            parser.error(f"--labeled-slices {labeled} overlap --eval-slices at {overlap}; score on held-out slices")
    work = args.out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    model = [f"model={args.model}", *MODELS[args.model, args.model_size]]
    seconds: dict[str, float] = {}

    encoder = args.encoder
    if encoder is None:
        start = time.perf_counter()
        pretrain_dir = work / "pretrain"
        volumes = ",".join(str(Path(v).resolve()) for v in [*args.unlabeled, args.raw])
        hydra_run("pretrain", [
            *model, *PRETRAIN[args.model], f"data.volumes=[{volumes}]", f"paths.output_dir={pretrain_dir}",
            f"trainer.max_steps={args.pretrain_steps}", f"trainer.val_check_interval={args.pretrain_steps}",
            f"data.batch_size={args.batch_size * 2}", f"data.num_workers={args.workers}", "objective.lr=1e-3",
            f"objective.warmup_steps={min(50, args.pretrain_steps)}", "callbacks.reconstructions=null", *COMMON])
        seconds["pretrain"] = time.perf_counter() - start
        encoder = str(pretrain_dir / "checkpoints" / "last.ckpt")
    arms = {"pretrained": str(Path(encoder).resolve()), "scratch": "scratch"}

    curve = []
    for labeled in labeled_sets:
        results: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
        examples: dict[str, np.ndarray] = {}
        for seed in seeds:
            for arm, init in arms.items():
                start = time.perf_counter()
                run_dir = work / f"slices{'-'.join(map(str, labeled))}_seed{seed}_{arm}"
                hydra_run("finetune", [
                    *model, f"target={args.target}", f"init={init}", f"seed={seed}", f"data.raw={args.raw}",
                    f"data.labels={args.labels}", f"data.labeled_slices={labeled}", "data.val_slices=null",
                    f"data.batch_size={args.batch_size}", f"data.num_workers={args.workers}",
                    f"trainer.max_steps={args.finetune_steps}", f"module.warmup_steps={min(30, args.finetune_steps)}",
                    "callbacks.model_checkpoint.monitor=null", "+trainer.limit_val_batches=0",
                    f"paths.output_dir={run_dir}", *COMMON, *args.finetune_override])
                module = load_segmenter(run_dir / "checkpoints" / "last.ckpt")
                regions = HeldOutSlices(data, eval_slices, module.model.encoder.input_shape)
                scored = evaluate_region(module, regions, THRESHOLDS)
                results[arm].append({"seed": seed, **scored["report"]})
                examples[arm] = scored["example"][1]
                raw, truth = scored["example"][0], scored["example"][2]
                key = f"{arm} ({len(labeled)} slices)"
                seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - start
        png = args.out.with_name(f"{args.out.stem}_slices{'-'.join(map(str, labeled))}.png")
        save_comparison(png, raw, truth, examples)
        curve.append({"labeled_slices": labeled, **{arm: summary(rows) for arm, rows in results.items()},
                      "picture": str(png)})

    report = {
        **{arm: curve[0][arm] for arm in arms},
        "curve": curve,
        "config": {"encoder": encoder, "raw": args.raw, "labels": args.labels, "unlabeled": args.unlabeled, "target": args.target,
                   "eval_slices": eval_slices, "pretrain_steps": None if args.encoder else args.pretrain_steps,
                   "finetune_steps": args.finetune_steps, "model": args.model, "model_size": args.model_size,
                   "overrides": model, "finetune_overrides": args.finetune_override, "seeds": seeds, "batch_size": args.batch_size, "thresholds": list(THRESHOLDS)},
        "seconds": seconds,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'labeled slices':>15} {'arm':>10} {'IoU':>7} {'Dice':>7} {'V_rand':>7} {'V_info':>7} {'VI':>7}")
    nan = float("nan")
    for point in curve:
        for arm in arms:
            r = point[arm]
            print(f"{','.join(map(str, point['labeled_slices'])):>15} {arm:>10} {r['iou']:7.3f} {r['dice']:7.3f} "
                  f"{r.get('vrand', nan):7.3f} {r.get('vinfo', nan):7.3f} {r.get('vi', nan):7.3f}")
    print(f"wrote {args.out} and {len(curve)} picture(s) next to it")


if __name__ == "__main__":
    main()
