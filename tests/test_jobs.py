"""Long-job behaviour through the installed command: resume after SIGKILL, SIGTERM, 2-process DDP."""

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny

MAX_STEPS = 60


def start(run_dir: Path, volume: Path, *extra: str) -> subprocess.Popen:
    args = [*tiny("vit2d", "mae"), f"data.volumes=[{volume}]", f"trainer.max_steps={MAX_STEPS}",
            "trainer.val_check_interval=10", "trainer.log_every_n_steps=1", f"hydra.run.dir={run_dir}", *extra]
    return subprocess.Popen([sys.executable, "-m", "emfm", "pretrain", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(proc: subprocess.Popen, path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.02)


def checkpoint_state(path: Path) -> tuple[int, int, int]:
    """(global step, training batches served by the datamodule, scheduler steps)."""
    state = torch.load(path, weights_only=True)
    return state["global_step"], state["PatchDataModule"]["batches_served"], state["lr_schedulers"][0]["last_epoch"]


def logged_steps(run_dir: Path) -> list[int]:
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]


def test_a_killed_run_resumes_from_its_last_checkpoint(synth_zarr: Path, tmp_path: Path) -> None:
    last = tmp_path / "checkpoints" / "last.ckpt"
    proc = start(tmp_path, synth_zarr)
    wait_for_checkpoint(proc, last)
    proc.kill()  # SIGKILL: no chance to clean up
    proc.communicate()
    step, served, scheduled = checkpoint_state(last)
    assert 0 < step < MAX_STEPS and served == step == scheduled
    assert not list(last.parent.glob(".*.partial"))  # atomic writes leave no debris

    resumed = start(tmp_path, synth_zarr, "resume=auto")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert "Restoring states from the checkpoint path" in err + out
    assert checkpoint_state(last) == (MAX_STEPS, MAX_STEPS, MAX_STEPS)  # optimiser steps, patch stream, LR schedule
    after = [s for s in logged_steps(tmp_path) if s >= step]
    assert after[-1] == MAX_STEPS - 1 and len(after) >= MAX_STEPS - step


def test_sigterm_saves_and_exits_cleanly(synth_zarr: Path, tmp_path: Path) -> None:
    last = tmp_path / "checkpoints" / "last.ckpt"
    proc = start(tmp_path, synth_zarr)
    wait_for_checkpoint(proc, last)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err and "SIGTERM at step" in err
    step, served, _ = checkpoint_state(last)
    assert step == served and step < MAX_STEPS


def test_resume_without_a_checkpoint_or_with_another_model_is_refused(synth_zarr: Path, tmp_path: Path) -> None:
    proc = start(tmp_path / "new", synth_zarr, "resume=auto")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "resume=auto: no checkpoint at" in err
    done = start(tmp_path / "a", synth_zarr, "trainer.max_steps=2")
    done.communicate(timeout=120)
    assert done.returncode == 0
    other = start(tmp_path / "a", synth_zarr, "trainer.max_steps=4", "resume=auto", "+model.depth=2")
    _, err = other.communicate(timeout=120)
    assert other.returncode == 2 and "was trained with encoder" in err.splitlines()[-1]


# Negatives per query with 4 patches on each of 2 ranks: SimCLR's 2 views x 8 patches minus the
# anchor and its positive; DenseCL's every cell (2x2 per 64x64 patch for the tiny ResNet) but one.
@pytest.mark.parametrize("objective,negatives", [("simclr", 2 * 8 - 2), ("densecl", 4 * 8 - 1)])
def test_ddp_on_two_cpu_processes_gathers_negatives_from_both(synth_zarr: Path, tmp_path: Path, objective: str,
                                                              negatives: int) -> None:
    batch = 4
    args = [*tiny("cnn2d", objective), f"data.volumes=[{synth_zarr}]", "trainer=ddp", "trainer.accelerator=cpu",
            "trainer.devices=2", f"data.batch_size={batch}", "trainer.max_steps=3", "trainer.val_check_interval=3",
            "trainer.log_every_n_steps=1", f"hydra.run.dir={tmp_path}"]
    out = subprocess.run([sys.executable, "-m", "emfm", "pretrain", *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "distributed_backend=gloo" in out.stderr and "All distributed processes registered" in out.stderr
    with (tmp_path / "csv" / "metrics.csv").open() as f:
        rows = [row for row in csv.DictReader(f) if row.get(f"train/{objective}/negatives")]
    assert {float(row[f"train/{objective}/negatives"]) for row in rows} == {negatives}
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
