"""The benchmarks (not installed; ``python -m benchmarks.NAME``) import, show their commands and keep their layout,
and the quickest one runs: a change in emfm that breaks a benchmark fails here, not on the day someone measures."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import benchmarks
from emfm.explore.clusterer import BACKENDS

SHARED = {"harness": (), "workloads": ("harness",)}   # what every benchmark may import, and what they import
PARTS = {"peers": ("peers_arms",)}                     # a benchmark's own module, which its fresh processes import
MODULES = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__))
NAMES = [m for m in MODULES if m not in SHARED and all(m not in parts for parts in PARTS.values())]


@pytest.mark.parametrize("name", NAMES)
def test_each_benchmark_imports_and_its_help_shows_how_it_is_run(name: str, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    module = importlib.import_module(f"benchmarks.{name}")
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f"usage: python -m benchmarks.{name} ") and f"\n    python -m benchmarks.{name}" in shown


@pytest.mark.parametrize("name", MODULES)
def test_benchmarks_import_only_the_shared_modules_not_each_other(name: str) -> None:
    tree = ast.parse((Path(benchmarks.__file__).parent / f"{name}.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {f"benchmarks.{alias.name}" for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module == "benchmarks" for alias in node.names}
    allowed = {f"benchmarks.{m}" for m in SHARED.get(name, (*SHARED, *PARTS.get(name, ())))}
    assert {m for m in imported if m.startswith("benchmarks.")} <= allowed


def test_the_k_means_benchmark_runs_every_backend_on_blobs(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import kmeans

    monkeypatch.setattr(sys, "argv", ["kmeans", "--samples", "600", "--k", "3", "--pca", "4", "--repeats", "1"])
    kmeans.main()
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[-len(BACKENDS) - 2].startswith("blobs: 600 vectors x 4 dims, k=3")
    ratios = {row.split()[0]: float(row.split()[-1]) for row in rows[-len(BACKENDS):]}
    assert list(ratios) == list(BACKENDS) and min(ratios.values()) == 1.0   # inertia over the best backend's


def test_flops_count_matrix_products_convolutions_and_cpu_attention_as_by_hand() -> None:
    from benchmarks.harness import conv_peak, flops

    n, (b, h, s, d) = 64, (2, 3, 16, 8)
    a, conv, images = torch.randn(n, n), torch.nn.Conv2d(4, 6, 3, padding=1, bias=False), torch.randn(2, 4, 8, 8)
    query = torch.randn(b, h, s, d, requires_grad=True)
    assert flops(lambda: a @ a) == 2 * n**3
    assert flops(lambda: conv(images)) == 2 * 2 * 6 * 4 * 3 * 3 * 8 * 8            # 2 x N x out x in x k x k x Y x X
    # 2 s x s x d products forward (Q K^T, P V), 5 backward (Q K^T again, dP, dV, dQ, dK): torch's flash kernel
    assert flops(lambda: F.scaled_dot_product_attention(query, query, query).sum().backward()) == 14 * b * h * s * s * d
    assert conv_peak(1, 4, 16, channels_last=True, repeats=1) > 0
