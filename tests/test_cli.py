"""The installed `emfm` command, run as a user runs it."""

import importlib.metadata
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from tests.conftest import TINY_PRETRAIN, CommandLine, tiny


def emfm(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emfm", *args], capture_output=True, text=True, cwd=cwd)


def test_help_lists_the_commands_and_version_names_the_release() -> None:
    out = emfm("--help")
    assert out.returncode == 0
    for command in ("pretrain", "ingest", "synth"):
        assert f"\n  {command} " in out.stdout
    for command in (["--version"], ["predict", "--version"], ["ingest", "--version"], ["pretrain", "x=1", "-V"]):
        out = emfm(*command)               # emfm's version for every command, not Hydra's
        assert out.returncode == 0 and out.stdout == f"emfm {importlib.metadata.version('emfm')}\n", command


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


@pytest.mark.parametrize("args, unbuffered", [(["--help"], True), (["--help"], False),
                                              (["pretrain", "--cfg", "job"], True)])
def test_output_into_a_pipe_whose_reader_has_gone_ends_quietly(args: list[str], unbuffered: bool) -> None:
    """``emfm --help | head -1``: once head has exited, the rest of the output has nowhere to go; the command ends
    as Unix tools do, killed by SIGPIPE (141 in the shell), without a word."""
    read, write = os.pipe()
    os.close(read)
    environ = {**os.environ, "PYTHONUNBUFFERED": "1"} if unbuffered else os.environ
    out = subprocess.run([sys.executable, "-m", "emfm", *args], stdout=write, stderr=subprocess.PIPE, text=True,
                         env=environ)
    os.close(write)
    assert out.returncode == -signal.SIGPIPE and out.stderr == ""


def test_ctrl_c_during_predict_is_one_line_and_the_same_command_resumes(
        synth_zarr: Path, two_step_finetuned: Callable[[str], Path], tmp_path: Path, run_cli: CommandLine) -> None:
    output, whole = tmp_path / "p.zarr", tmp_path / "whole.zarr"
    args = ["predict", f"checkpoint={two_step_finetuned('vit2d')}", f"input={synth_zarr}", "roi=[0:2,0:96,0:96]",
            "block_shape=[1,48,48]", "progress=false", f"hydra.run.dir={tmp_path / 'run'}"]     # 2 x 2 x 2 blocks
    progress = output / "_progress" / "predict" / "c"

    def marked() -> int:
        return sum(not f.endswith(".partial") for _, _, names in os.walk(progress) for f in names)

    # Ctrl-C in a terminal signals the foreground process group: the command in a group of its own, signalled so.
    with subprocess.Popen([sys.executable, "-m", "emfm", *args, f"output={output}"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and marked() < 1:
            time.sleep(0.01)
        assert proc.poll() is None and marked() >= 1, "no block finished before the prediction ended or timed out"
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    # Dead of SIGINT (130 in the shell), as a shell script's loop needs to stop at it.
    assert proc.returncode == -signal.SIGINT
    assert stderr == "emfm predict: interrupted; the same command continues from the blocks already written\n"
    finished = marked()
    assert 1 <= finished < 8
    resumed, uninterrupted = run_cli([([*args, f"output={output}"], None), ([*args, f"output={whole}"], None)])
    assert resumed.returncode == 0 and f"{8 - finished} of 8 blocks computed" in resumed.stdout, resumed.stderr
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    assert np.array_equal(zarr.open_array(f"{output}/0", mode="r")[...], zarr.open_array(f"{whole}/0", mode="r")[...])


def test_an_export_is_readable_as_the_umask_allows(two_step_pretrained: Callable[[str], Path], tmp_path: Path) -> None:
    """Every file ``emfm export`` writes has the mode of a new file under the user's umask (safetensors writes
    its file private, 0600: no one else in a lab could load the encoder)."""
    out = subprocess.run([sys.executable, "-m", "emfm", "export", str(two_step_pretrained("vit2d")),
                          str(tmp_path / "encoder")], capture_output=True, text=True, umask=0o027)
    assert out.returncode == 0, out.stderr
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "encoder").iterdir()}
    assert modes == {"encoder.safetensors": 0o640, "config.json": 0o640, "README.md": 0o640}


def test_ingest_without_a_voxel_size_names_the_flag(tmp_path: Path, run_cli: CommandLine) -> None:
    np.save(tmp_path / "v.npy", np.zeros((2, 16, 16), np.uint8))
    out, = run_cli([(["ingest", str(tmp_path / "v.npy"), "--out", str(tmp_path / "v.zarr")], None)])
    assert out.returncode == 0, out.stderr
    assert f"{tmp_path / 'v.npy'}: no voxel size given or found in metadata; using 1.0 nm, pass --voxel-size Z Y X" \
        in out.stderr
