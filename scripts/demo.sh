#!/usr/bin/env bash
# The README's demo, the whole story in about six minutes on 2 CPU cores:
# synthetic EM -> TIFF -> OME-Zarr -> whole-U-Net restoration pretraining (the restore_unet recipe, shrunk)
# -> fine-tuning on ONE labeled slice from the pretrained weights and from scratch -> scores on held-out
# slices -> prediction over the volume -> clusters of the pretrained features.
# Reuses demo/synth.tif, demo/synth.zarr and demo/truth.zarr; every run goes to a new demo/<time>/.
# Sized for few cores (docs/benchmarks.md, "--jobs N"): the 64-px patches load in the training processes (loader
# processes buy nothing on 2 cores), and the two fine-tunings, then the prediction and the clustering, run side
# by side on one thread each.
set -euo pipefail
mkdir -p demo
[ -e demo/synth.tif ] || emfm synth --out demo/synth.tif --shape 48 256 256 --anisotropy 5
[ -e demo/synth.zarr ] || emfm ingest demo/synth.tif --out demo/synth.zarr
[ -e demo/truth.zarr ] || emfm synth --out demo/truth.zarr --shape 48 256 256 --anisotropy 5  # same seed: its labels
out="demo/$(date +%Y%m%d-%H%M%S)"

# Pretrain once, then fine-tune both arms on slice 0; score on slices 40-47 (REPORT.json, side-by-side PNG),
# the instance threshold chosen on slices 30-31.
emfm compare --recipe restore_unet --raw demo/synth.zarr \
    --labels demo/truth.zarr/labels/membranes --target membrane --labeled-slices 0 --eval-slices 40-47 \
    --val-slices 30-31 \
    --seeds 0 --lrs 3e-3 --arms scratch,pretrained --jobs 2 --out "$out/REPORT.json" \
    --pretrain-override data.patch_shape=[64,64] --pretrain-override data.num_workers=0 \
    --pretrain-override trainer.max_steps=300 \
    --pretrain-override trainer.val_check_interval=100 --pretrain-override callbacks.reconstructions.every_n_steps=100 \
    --finetune-override data.patch_shape=[64,64] --finetune-override trainer.max_steps=150 \
    --finetune-override trainer.val_check_interval=150 "$@"

read -r finetuned pretrained < <(python -c 'import json, sys; r = json.load(open(sys.argv[1]))
print(r["pretrained"]["seeds"][0]["checkpoint"], r["config"]["encoder"])' "$out/REPORT.json")
echo "predicting the volume and clustering the pretrained features side by side (logs: $out/{predict,cluster}.out)"
OMP_NUM_THREADS=1 emfm predict checkpoint="$finetuned" input=demo/synth.zarr output="$out/prediction.zarr" \
    hydra.run.dir="$out/predict" > "$out/predict.out" 2>&1 &
predicting=$!
OMP_NUM_THREADS=1 emfm cluster checkpoint="$pretrained" input=demo/synth.zarr k=4 \
    output="$out/clusters.zarr" labels=demo/truth.zarr/labels/membranes report="$out/clusters.json" \
    hydra.run.dir="$out/cluster" > "$out/cluster.out" 2>&1 &
clustering=$!
for job in "predict $predicting" "cluster $clustering"; do
    set -- $job
    wait "$2" || { tail -n 5 "$out/$1.out"; echo "emfm $1 failed: $out/$1.out"; exit 1; }
    grep "wrote\|learned:\|intensity_baseline:" "$out/$1.out" | sed 's/^\[.*\] - //' | awk '!seen[$0]++' || true
done

python - "$out" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
report = json.loads((out / "REPORT.json").read_text())
pre, scratch = report["pretrained"], report["scratch"]
print("\n=== emfm demo: 1 labeled slice, scored on slices 40-47 ===")
print(f"{'arm':<12}{'IoU':>8}{'V_rand':>8}")
for name, row in (("scratch", scratch), ("pretrained", pre)):
    print(f"{name:<12}{row['iou']:>8.3f}{row['vrand']:>8.3f}")
gain = pre["iou"] - scratch["iou"]
print(f"pretraining {'helped' if gain > 0 else 'did NOT help'} here: IoU {gain:+.3f} "
      "(one seed on a small synthetic volume; real-data numbers: docs/benchmarks.md)")
for what, path in (("report", out / "REPORT.json"), ("raw | truth | scratch | pretrained", report["curve"][0]["picture"]),
                   ("pretraining reconstructions", out / "REPORT/pretrain/reconstructions"),
                   ("prediction over the volume", out / "prediction.zarr"), ("cluster map", out / "clusters.zarr"),
                   ("cluster pictures", out / "cluster/pictures"), ("cluster scores", out / "clusters.json")):
    print(f"{what:<36}{path}")
EOF
