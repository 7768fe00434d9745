"""Does blockwise prediction cost more than the model? And does its memory stay flat as the volume grows?

Throughput: `emfm predict` (zarr in, blocks, blended tiles, float16 OME-Zarr out) against a bare
PyTorch loop that runs the same model on the same tiles of the same volume held in memory (no
reading, no blending, no writing), both in voxels of the volume per second, measured in the same
run. Memory: peak RSS of `emfm predict` in a fresh process on a volume and on one 8x larger.

    python -m benchmarks.predict                      # synthetic 8x512x512 and 16x1024x1024
    python -m benchmarks.predict --checkpoint ft/checkpoints/last.ckpt --volume my.zarr
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import command_line
from benchmarks.workloads import emfm_predict, make_checkpoint
from emfm.checkpoints import load_segmenter
from emfm.data.synthetic import make_synthetic_em, save_synthetic
from emfm.data.volume import Volume
from emfm.inference import tile_corners


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
    parser = command_line("predict", __doc__)
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
            ours_run = emfm_predict(checkpoint, volume, work / "pred.zarr", args.batch_size)
            bare_seconds = bare(checkpoint, volume, args.batch_size)
            ratio = bare_seconds / ours_run["block_seconds"]
            rows.append(ratio)
            print(f"repeat {repeat}: ours {voxels[volume] / ours_run['block_seconds']:.0f} voxels/s "
                  f"({ours_run['blocks']} blocks in {ours_run['block_seconds']:.1f} s; {ours_run['seconds']:.1f} s "
                  f"with model load and checks), bare {voxels[volume] / bare_seconds:.0f} voxels/s "
                  f"({bare_seconds:.1f} s), ratio {ratio:.3f}")
        memory = {p: emfm_predict(checkpoint, p, work / "mem.zarr", args.batch_size) for p in (volume, large)}
        for p, m in memory.items():
            print(f"peak RSS {m['rss_mib']:.0f} MiB for {Volume(p).shape} ({voxels[p] / 1e6:.1f} Mvoxels, "
                  f"{m['blocks']} blocks, {m['seconds']:.1f} s)")
        small_rss, large_rss = (memory[p]["rss_mib"] for p in (volume, large))
        print(f"throughput ratio ours / bare: {min(rows):.3f}-{max(rows):.3f} (target >= 0.85); "
              f"peak RSS 8x volume / 1x volume: {large_rss / small_rss:.2f} (target: flat, ~1)")


if __name__ == "__main__":
    main()
