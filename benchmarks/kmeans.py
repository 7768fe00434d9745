"""Which k-means backs ``emfm cluster``: faiss-cpu, scikit-learn KMeans or MiniBatchKMeans, measured.

Each backend fits the same sample (real features from a store made by ``emfm features`` /
``emfm cluster``, or Gaussian blobs) in the same run; the figures are fit seconds and the
k-means inertia (sum of squared distances to the nearest centre) relative to the best backend,
so "faster" never hides "worse".

    python -m benchmarks.kmeans --features clusters.zarr/features --k 8 --samples 20000 100000
"""

from __future__ import annotations

import time

import numpy as np
import torch

from benchmarks.harness import command_line
from emfm.explore.clusterer import BACKENDS, Clusterer
from emfm.explore.features import Projection, sample_store


def inertia(x: np.ndarray, centers: np.ndarray) -> float:
    d = (x**2).sum(1)[:, None] - 2 * x @ centers.T + (centers**2).sum(1)
    return float(d.min(1).sum())


def main() -> None:
    parser = command_line("kmeans", __doc__)
    parser.add_argument("--features", help="a feature store; default: Gaussian blobs")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--pca", type=int, default=32)
    parser.add_argument("--samples", type=int, nargs="+", default=[20000, 100000])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    for n in args.samples:
        if args.features:
            x, _ = sample_store(args.features, "0", n, seed=0, max_blocks=10**6)
            x = Projection.fit(x, min(args.pca, x.shape[1]))(x).astype(np.float32)
            source = args.features
        else:
            rng = np.random.default_rng(0)
            centres = rng.normal(0, 3, (args.k, args.pca))
            x = (centres[rng.integers(args.k, size=n)] + rng.normal(size=(n, args.pca))).astype(np.float32)
            source = "blobs"
        rows = {}
        for backend in BACKENDS:
            times, values = [], []
            for repeat in range(args.repeats):
                start = time.perf_counter()
                centers = Clusterer("kmeans", args.k, backend, seed=repeat).fit(x).centers
                times.append(time.perf_counter() - start)
                assert centers is not None
                values.append(inertia(x, centers))
            rows[backend] = (min(times), min(values))
        best = min(v for _, v in rows.values())
        print(f"\n{source}: {len(x)} vectors x {x.shape[1]} dims, k={args.k} (best of {args.repeats})")
        print(f"{'backend':<10} {'fit s':>8} {'inertia / best':>15}")
        for backend, (seconds, value) in rows.items():
            print(f"{backend:<10} {seconds:8.2f} {value / best:15.4f}")


if __name__ == "__main__":
    main()
