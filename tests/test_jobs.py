"""Long-job behaviour through the installed command: resume after SIGKILL, SIGTERM, 2-process DDP."""

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import CommandLine, file_hashes, overflowing, tiny

MAX_STEPS = 60


def pretrain(run_dir: Path, volume: Path, *extra: str) -> list[str]:
    """The overrides of a tiny MAE run of MAX_STEPS steps (unless ``extra`` says otherwise) in ``run_dir``."""
    return [*tiny("vit2d", "mae"), f"data.volumes=[{volume}]", f"trainer.max_steps={MAX_STEPS}",
            "trainer.val_check_interval=10", "trainer.log_every_n_steps=1", f"hydra.run.dir={run_dir}", *extra]


def start(run_dir: Path, volume: Path, *extra: str, multirun: bool = False) -> subprocess.Popen:
    """``emfm pretrain`` started as a process of its own, for the tests that signal it."""
    return subprocess.Popen([sys.executable, "-m", "emfm", "pretrain", *(["-m"] if multirun else []),
                             *pretrain(run_dir, volume, *extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(cli: CommandLine, run_dir: Path, volume: Path, *extra: str) -> subprocess.CompletedProcess:
    """``emfm pretrain`` run to its end (CommandLine: a process of its own, forked from the session's server)."""
    [done] = cli([(["pretrain", *pretrain(run_dir, volume, *extra)], None)])
    return done


def launch(run_dir: Path, volume: Path) -> subprocess.Popen:
    """The README's SLURM recipe with Hydra's basic launcher: a one-job multirun in ``run_dir/0``, ``resume=auto``
    from the first launch on, so that a requeue is the same command."""
    return start(run_dir, volume, "resume=auto", multirun=True)


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


def logged_losses(run_dir: Path) -> list[tuple[int, str]]:
    """(step, train/loss) of every training row of the run's metrics.csv."""
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return [(int(row["step"]), row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


def test_a_killed_job_resumes_from_its_last_checkpoint_and_keeps_its_metrics(synth_zarr: Path, tmp_path: Path) -> None:
    job = tmp_path / "0"                                       # job 0 of the multirun in hydra.run.dir
    last = job / "checkpoints" / "last.ckpt"
    proc = launch(tmp_path, synth_zarr)                        # the first launch starts the run
    wait_for_checkpoint(proc, last)
    proc.kill()  # SIGKILL: no chance to clean up
    proc.communicate()
    step, served, scheduled = checkpoint_state(last)
    assert 0 < step < MAX_STEPS and served == step == scheduled
    assert not list(last.parent.glob(".*.partial"))  # atomic writes leave no debris
    before, events = logged_losses(job), set((job / "tensorboard").glob("events.*"))
    assert [s for s, _ in before][:step] == list(range(step)) and events

    resumed = launch(tmp_path, synth_zarr)                     # the requeue: the same command continues it
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert "Restoring states from the checkpoint path" in err + out
    assert checkpoint_state(last) == (MAX_STEPS, MAX_STEPS, MAX_STEPS)  # optimiser steps, patch stream, LR schedule
    rows = logged_losses(job)
    assert rows[:len(before)] == before                    # every row of the killed run is still there, first
    after = [s for s, _ in rows[len(before):]]             # then the resumed run, from its checkpoint on
    assert after == list(range(step, MAX_STEPS))
    assert events < set((job / "tensorboard").glob("events.*"))   # TensorBoard adds a file, deletes none
    log = (job / "pretrain.log").read_text()                # the run's summary is in its log file
    assert f"last checkpoint: {last}" in log and "last metrics:" in log and "train/loss" in log


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


def refused(cli: CommandLine, run_dir: Path, volume: Path, *extra: str) -> str:
    """The one-line error of a command that must be refused."""
    proc = run(cli, run_dir, volume, *extra)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return proc.stderr.strip().splitlines()[-1]


def test_a_used_run_dir_is_continued_only_explicitly_and_a_refusal_keeps_its_config(
        synth_zarr: Path, tmp_path: Path, run_cli: CommandLine) -> None:
    nowhere = tmp_path / "nowhere" / "last.ckpt"
    assert f"resume={nowhere}: no checkpoint at {nowhere}" in refused(run_cli, tmp_path / "new", synth_zarr,
                                                                      f"resume={nowhere}")
    assert not (tmp_path / "new" / ".hydra").exists()              # nothing recorded for a run that never started
    run_dir = tmp_path / "a"
    done = run(run_cli, run_dir, synth_zarr, "trainer.max_steps=2")
    assert done.returncode == 0, done.stderr[-2000:]
    kept = {name: file_hashes(run_dir / name) for name in (".hydra", "checkpoints", "csv")}
    assert "trainer.max_steps=2" in (run_dir / ".hydra" / "overrides.yaml").read_text()

    # Without resume, a second run would have started beside the first (last-v1.ckpt) and mixed their metrics.
    assert refused(run_cli, run_dir, synth_zarr, "trainer.max_steps=4") == (
        f"emfm pretrain: error: hydra.run.dir={run_dir} already holds a run (checkpoints/last.ckpt); "
        f"continue it with resume=auto, or start a new run in another hydra.run.dir")
    assert "was trained with encoder" in refused(run_cli, run_dir, synth_zarr, "trainer.max_steps=4", "resume=auto",
                                                 "+model.depth=2")
    assert {name: file_hashes(run_dir / name) for name in kept} == kept   # config, checkpoints, metrics untouched

    resumed = run(run_cli, run_dir, synth_zarr, "trainer.max_steps=4", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resume=auto" in (run_dir / ".hydra" / "overrides.yaml").read_text()   # the run's config, now continued
    assert checkpoint_state(run_dir / "checkpoints" / "last.ckpt")[0] == 4
    assert not list(run_dir.glob("checkpoints/last-v*"))


def test_a_loss_that_stops_being_finite_stops_the_run_and_keeps_the_last_good_checkpoint(
        synth_zarr: Path, tmp_path: Path, run_cli: CommandLine) -> None:
    done = run(run_cli, tmp_path, synth_zarr, "trainer.max_steps=4", "trainer.val_check_interval=2")
    assert done.returncode == 0, done.stderr[-2000:]
    good = file_hashes(tmp_path / "checkpoints")
    extreme = overflowing(synth_zarr, tmp_path / "extreme.zarr")
    line = refused(run_cli, tmp_path, synth_zarr, "trainer.max_steps=8", "resume=auto", f"data.volumes=[{extreme}]")
    assert line.startswith("emfm pretrain: error: train/loss is not finite at step 4 (train/loss nan); stopped")
    assert file_hashes(tmp_path / "checkpoints") == good          # no NaN weights saved over the good ones


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
