"""The installed `emfm` command, run as a user runs it."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile
import zarr

from tests.conftest import TINY_PRETRAIN, tiny


def emfm(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emfm", *args], capture_output=True, text=True, cwd=cwd)


def test_help_lists_the_commands_and_version_names_the_release() -> None:
    out = emfm("--help")
    assert out.returncode == 0
    for command in ("pretrain", "ingest", "synth"):
        assert f"\n  {command} " in out.stdout
    out = emfm("--version")
    assert out.returncode == 0 and out.stdout == f"emfm {importlib.metadata.version('emfm')}\n"


def test_synth_ingest_pretrain(tmp_path: Path) -> None:
    tif, zarr_path, run_dir = tmp_path / "s.tif", tmp_path / "s.zarr", tmp_path / "run"
    assert emfm("synth", "--out", str(tif), "--shape", "8", "64", "64").returncode == 0
    raw = tifffile.imread(tif)
    assert raw.shape == (8, 64, 64) and raw.dtype == np.uint8
    out = emfm("ingest", str(tif), "--out", str(zarr_path), "--voxel-size", "40", "8", "8")
    assert out.returncode == 0, out.stderr
    np.testing.assert_array_equal(zarr.open_group(zarr_path, mode="r")["0"][:], raw)
    out = emfm("pretrain", *TINY_PRETRAIN, f"data.volumes=[{zarr_path}]", "trainer.max_steps=3",
               f"hydra.run.dir={run_dir}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"run dir:         {run_dir}" in out.stdout
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert (run_dir / ".hydra" / "config.yaml").exists()


def test_user_errors_are_one_line(tmp_path: Path) -> None:
    out = emfm("ingest", str(tmp_path / "missing.tif"), "--out", str(tmp_path / "o.zarr"))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "missing.tif" in out.stderr
    out = emfm("pretrain", *TINY_PRETRAIN, f"data.volumes=[{tmp_path}/nope.zarr]",
               f"hydra.run.dir={tmp_path}/run")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("emfm pretrain: error: ")
    assert "Traceback" not in out.stderr


def test_unknown_config_key_names_the_key(tmp_path: Path) -> None:
    out = emfm("pretrain", "trainer.max_stepz=3", f"hydra.run.dir={tmp_path}/run")
    assert out.returncode != 0 and "max_stepz" in out.stderr


def test_multirun_sweeps_an_override(synth_zarr: Path, tmp_path: Path) -> None:
    out = emfm("pretrain", "-m", *tiny(debug="fdr"), f"data.volumes=[{synth_zarr}]",
               "objective.methods.mae.mask_ratio=0.5,0.75", f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    ratios = [(tmp_path / str(job) / ".hydra" / "overrides.yaml").read_text() for job in (0, 1)]
    assert "mask_ratio=0.5" in ratios[0] and "mask_ratio=0.75" in ratios[1]
