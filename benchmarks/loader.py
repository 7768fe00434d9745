"""Can the patch loader feed training? Patches/s of the sampler from compressed zarr vs images/s of a step.

Both are measured in the same run on the same machine: the loader (real DataLoader, real workers,
blank filter and normalisation, reading a zstd-compressed OME-Zarr) and one MAE training step
(forward, backward, AdamW) on in-memory tensors of the same batch size. A ratio above 1 means
the loader is not the bottleneck.

    python -m benchmarks.loader                      # synthetic volume, default ViT-S MAE
    python -m benchmarks.loader --volume my.zarr --workers 4
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks.harness import command_line
from emfm.data.patches import PatchSampler, RandomPatches
from emfm.data.synthetic import make_synthetic_em, save_synthetic
from emfm.data.volume import Volume
from emfm.pretrain.base import PretrainModule


def loader_rate(volume: Path, patch: int, batch: int, workers: int, batches: int) -> float:
    sampler = PatchSampler([Volume(volume)], (patch, patch))
    dataset = RandomPatches(sampler, batch_size=batch, batches=batches + 2, seed=0)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    iterator = iter(loader)
    next(iterator), next(iterator)  # worker start-up is not throughput
    start = time.perf_counter()
    n = sum(len(b) for b in iterator)
    return n / (time.perf_counter() - start)


def train_rate(model: str, patch: int, batch: int, steps: int) -> float:
    vit = {"family": "vit2d", "name": model, "input_shape": [patch, patch], "patch_size": 16}
    module = PretrainModule(vit, {"mae": {}})
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    images = torch.randn(batch, 1, patch, patch)

    def step() -> None:
        loss = module.compute_loss(images)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = command_line("loader", __doc__)
    parser.add_argument("--volume", type=Path, help="OME-Zarr to read (default: a synthetic 64x512x512)")
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        volume = args.volume or save_synthetic(make_synthetic_em((64, 512, 512)), Path(tmp) / "bench.zarr")
        loader = loader_rate(volume, args.patch, args.batch, args.workers, args.batches)
    train = train_rate(args.model, args.patch, args.batch, args.steps)
    print(f"volume: {args.volume or 'synthetic 64x512x512 (zstd OME-Zarr)'}; patch {args.patch}^2, "
          f"batch {args.batch}, {args.workers} workers, {torch.get_num_threads()} torch threads")
    print(f"loader:        {loader:8.1f} patches/s")
    print(f"train step:    {train:8.1f} images/s  ({args.model} MAE, CPU, fp32)")
    print(f"ratio loader/train: {loader / train:.2f}  (> 1: the loader keeps up)")


if __name__ == "__main__":
    main()
