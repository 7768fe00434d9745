"""Does every encoder x objective pair learn on real EM? A longer check than CI can afford.

Runs `emfm pretrain` (real configs, real Trainer) for each pair with small models on the given
volumes and prints the mean training loss of the first and last tenth of the run, then the same
for each method's own logged scalars (e.g. the two terms of a hybrid). Not a test:
the figures go to docs/benchmarks.md.

    python -m benchmarks.objectives --volume stack2.zarr --steps 300
    python -m benchmarks.objectives --volume stack2.zarr --steps 300 --pairs vit2d:mae cnn3d:mocov3
"""

from __future__ import annotations

import csv
import tempfile
import time
from pathlib import Path

from benchmarks.harness import command_line, config
from emfm import run

MASKED = {"vit2d": "mae", "vit3d": "mae", "cnn2d": "mim", "cnn3d": "mim"}
SMALL = {  # sizes that run a few hundred steps in minutes on a CPU
    "vit2d": ["model.name=vit_tiny_patch16_224", "+model.depth=4", "model.patch_size=8", "data.patch_shape=[64,64]"],
    "vit3d": ["model.name=vit_tiny_patch16_224", "+model.depth=4", "model.patch_size=[4,8,8]",
              "data.patch_shape=[8,64,64]"],
    "cnn2d": ["model.name=resnet10t", "data.patch_shape=[64,64]"],
    "cnn3d": ["model.name=test_resnet3d", "data.patch_shape=[8,64,64]"],
}
HEADS = {
    "mae": ["objective.methods.mae.decoder_dim=128", "objective.methods.mae.decoder_depth=2",
            "objective.methods.mae.decoder_heads=4", "objective.methods.mae.norm_pix_loss=false"],
    "mim": ["objective.methods.mim.decoder_dim=64"],
    "mocov3": ["objective.methods.mocov3.hidden_dim=512", "objective.methods.mocov3.proj_dim=128"],
    "simclr": ["objective.methods.simclr.hidden_dim=512"],
    "densecl": ["objective.methods.densecl.hidden_dim=512"],
    "hybrid": ["objective.methods.mocov3.hidden_dim=512", "objective.methods.mocov3.proj_dim=128"],
}


def first_last(metrics: Path) -> dict[str, tuple[float, float]]:
    """Mean of the first and last tenth of every logged training scalar (``train/loss`` first)."""
    with metrics.open() as f:
        rows = list(csv.DictReader(f))
    columns = [c for c in rows[0] if c.startswith("train/") and not c.endswith("/negatives")]
    result = {}
    for column in sorted(columns, key=lambda c: c != "train/loss"):
        values = [float(r[column]) for r in rows if r.get(column)]
        tenth = max(1, len(values) // 10)
        result[column.removeprefix("train/")] = sum(values[:tenth]) / tenth, sum(values[-tenth:]) / tenth
    return result


def main() -> None:
    parser = command_line("objectives", __doc__)
    parser.add_argument("--volume", type=Path, nargs="+", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--pairs", nargs="*", help="model:objective pairs (default: all that fit)")
    args = parser.parse_args()
    pairs = [p.split(":") for p in args.pairs] if args.pairs else [
        (m, o) for m in MASKED for o in (MASKED[m], "mocov3", "simclr", "densecl", "hybrid")]
    volumes = ",".join(str(v.resolve()) for v in args.volume)
    print(f"{'model':6} {'objective':9} {'first 10%':>10} {'last 10%':>10} {'change':>8} {'time':>7}", flush=True)
    for model, objective in pairs:
        with tempfile.TemporaryDirectory() as tmp:
            batch = 16 if model.endswith("2d") else 4
            overrides = [
                f"paths.output_dir={tmp}", f"model={model}", f"objective={objective}", *SMALL[model], *HEADS[objective],
                f"data.volumes=[{volumes}]", f"data.batch_size={batch}", "data.num_workers=1", "objective.lr=1e-3",
                "objective.warmup_steps=20", f"trainer.max_steps={args.steps}", "trainer.log_every_n_steps=5",
                f"trainer.val_check_interval={args.steps}", "callbacks.progress_bar=null",
                "callbacks.reconstructions=null",
                "logger=default", "~logger.tensorboard",
            ]
            cfg = config(overrides)
            start = time.perf_counter()
            run.pretrain(cfg)
            seconds = time.perf_counter() - start
            for i, (name, (first, last)) in enumerate(first_last(Path(tmp) / "csv" / "metrics.csv").items()):
                label = f"{model:6} {objective:9}" if i == 0 else f"  {name:14}"  # then each method's own scalars
                print(f"{label} {first:10.4f} {last:10.4f} {100 * (last / first - 1):+7.1f}%"
                      + (f" {seconds:6.0f}s" if i == 0 else ""), flush=True)


if __name__ == "__main__":
    main()
