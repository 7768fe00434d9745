"""Does blockwise prediction cost more than the model? And does its memory stay flat as the volume grows?

Throughput: `emfm predict` (zarr in, blocks, blended tiles, float16 OME-Zarr out) against a bare
PyTorch loop that runs the same model on the same tiles of the same volume held in memory (no
reading, no blending, no writing), both in voxels of the volume per second, measured in the same
run. Memory: peak RSS of `emfm predict` in a fresh process on a volume and on one 8x larger.

    python scripts/bench_predict.py                      # synthetic 8x512x512 and 16x1024x1024
    python scripts/bench_predict.py --checkpoint ft/checkpoints/last.ckpt --volume my.zarr
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_train import peak_rss_mib
from hydra import compose, initialize_config_module

from emfm import run
from emfm.data.synthetic import make_synthetic_em, save_synthetic
from emfm.data.volume import Volume
from emfm.finetune.segmentation import load_segmenter
from emfm.inference import tile_corners

MODEL = ["model=vit2d", "model.name=vit_tiny_patch16_224", "model.patch_size=16", "data.patch_shape=[128,128]"]


def make_checkpoint(work: Path, volume: Path) -> Path:
    """A fine-tuning checkpoint of a ViT-Ti/16 UNETR (its weights do not matter for speed)."""
    with initialize_config_module("emfm.configs", version_base="1.3"):
        cfg = compose("finetune", [*MODEL, f"data.raw={volume}", f"data.labels={volume}/labels/membranes",
                                   "data.labeled_slices=[0]", "trainer.max_steps=1", "logger=none",
                                   "data.num_workers=0", "data.batch_size=2", "callbacks.progress_bar=null",
                                   "+trainer.limit_val_batches=0", "callbacks.model_checkpoint.monitor=null",
                                   f"paths.output_dir={work / 'finetune'}"])
    run.finetune(cfg)
    return work / "finetune" / "checkpoints" / "last.ckpt"


def timed_predict(checkpoint: Path, volume: Path, output: Path, batch: int, blend: str = "linear",
                  dtype: str = "float16") -> dict[str, float]:
    """`emfm predict` in this process, timed from the model load to the finished store: seconds in all and in
    the block phase, and the process's peak RSS."""
    with initialize_config_module("emfm.configs", version_base="1.3"):
        cfg = compose("predict", [f"checkpoint={checkpoint}", f"input={volume}", f"output={output}", "overwrite=true",
                                  "progress=false", f"batch_size={batch}", f"dtype={dtype}", f"blend={blend}",
                                  f"paths.output_dir={output}.run"])
    start = time.perf_counter()
    out = run.predict(cfg)
    return {"seconds": time.perf_counter() - start, "blocks": out["blocks"],
            "block_seconds": out["seconds"]["predict"], "rss_mib": peak_rss_mib()}


def ours(checkpoint: Path, volume: Path, output: Path, batch: int, blend: str = "linear",
         dtype: str = "float16") -> dict[str, float]:
    """``timed_predict`` in a fresh interpreter, as a user starts `emfm predict`."""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from bench_predict import "
            f"timed_predict; print(json.dumps(timed_predict(*{[str(checkpoint), str(volume), str(output)]!r}, "
            f"{batch}, {blend!r}, {dtype!r})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def bare(checkpoint: Path, volume: Path, batch: int) -> float:
    """Seconds of the model alone over the tiles of every slice, from a tensor in memory."""
    module, vol = load_segmenter(checkpoint), Volume(volume)
    image = torch.from_numpy(vol.normalize(vol.read()))
    patch = tuple(module.model.encoder.input_shape)
    corners = tile_corners(image.shape[1:], patch, 0.25)
    tiles = [(z, y, x) for z in range(image.shape[0]) for y, x in corners]
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, len(tiles), batch):
            chunk = tiles[first:first + batch]
            x = torch.stack([image[z, y:y + patch[0], x:x + patch[1]] for z, y, x in chunk])[:, None]
            module.activate(module.model(x))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="fine-tuned 2-D checkpoint (default: a ViT-Ti/16 UNETR)")
    parser.add_argument("--volume", type=Path, help="zarr to time (default: synthetic 8x512x512)")
    parser.add_argument("--large", type=Path, help="8x larger volume for the memory check (default: synthetic)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        volume = args.volume or save_synthetic(make_synthetic_em((8, 512, 512), seed=0), work / "small.zarr")
        large = args.large or save_synthetic(make_synthetic_em((16, 1024, 1024), seed=1), work / "large.zarr")
        checkpoint = args.checkpoint or make_checkpoint(work, volume)
        voxels = {p: float(torch.tensor(Volume(p).shape).prod()) for p in (volume, large)}

        rows = []
        for repeat in range(args.repeats):
            ours_run = ours(checkpoint, volume, work / "pred.zarr", args.batch_size)
            bare_seconds = bare(checkpoint, volume, args.batch_size)
            ratio = bare_seconds / ours_run["block_seconds"]
            rows.append(ratio)
            print(f"repeat {repeat}: ours {voxels[volume] / ours_run['block_seconds']:.0f} voxels/s "
                  f"({ours_run['blocks']} blocks in {ours_run['block_seconds']:.1f} s; {ours_run['seconds']:.1f} s "
                  f"with model load and checks), bare {voxels[volume] / bare_seconds:.0f} voxels/s "
                  f"({bare_seconds:.1f} s), ratio {ratio:.3f}")
        memory = {p: ours(checkpoint, p, work / "mem.zarr", args.batch_size) for p in (volume, large)}
        for p, m in memory.items():
            print(f"peak RSS {m['rss_mib']:.0f} MiB for {Volume(p).shape} ({voxels[p] / 1e6:.1f} Mvoxels, "
                  f"{m['blocks']} blocks, {m['seconds']:.1f} s)")
        small_rss, large_rss = (memory[p]["rss_mib"] for p in (volume, large))
        print(f"throughput ratio ours / bare: {min(rows):.3f}-{max(rows):.3f} (target >= 0.85); "
              f"peak RSS 8x volume / 1x volume: {large_rss / small_rss:.2f} (target: flat, ~1)")


if __name__ == "__main__":
    main()
