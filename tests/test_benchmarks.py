"""The benchmarks (not installed; ``python -m benchmarks.NAME``) import, show their commands and keep their layout,
and the quickest one runs: a change in emfm that breaks a benchmark fails here, not on the day someone measures."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import sys
from pathlib import Path

import pytest

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
