"""``last.ckpt`` is a run's latest state and the run continues from it wherever its folder lives; Ctrl-C saves it as
SIGTERM does; a start refused or failed before its first checkpoint does not block the corrected one; a full disk
while saving a checkpoint is one line and keeps the checkpoint before it."""

import signal
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from emfm import run
from emfm.data.ingest import write_ome_zarr
from tests.conftest import TINY_FINETUNE, CommandLine, compose_run, file_hashes, overflowing, tiny
from tests.test_jobs import checkpoint_state, logged_losses, pretrain, refused, start, wait_for_checkpoint
from tests.test_jobs import run as run_pretrain

# With mode=max the best checkpoint is replaced only when val/loss rises, which it seldom does: the case where
# last.ckpt, saved only with the best, went stale.
STALE_BEST = ["callbacks.model_checkpoint.mode=max", "trainer.val_check_interval=4"]
ROOT = Path(__file__).resolve().parents[1]


class StateAtTrainStart(pl.Callback):
    """Saves the step and the weights a run starts training from: for a resumed run, what it restored."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.save({"global_step": trainer.global_step, "state_dict": pl_module.state_dict()}, self.path)


class Pause(pl.Callback):
    """Holds the run for a minute, once ``marker`` says so, for a test's signals: at the end of step ``step`` (a long
    step), or, ``step`` None, as it stops on SIGTERM, before last.ckpt is saved (a long save)."""

    def __init__(self, step: int | None, marker: str) -> None:
        self.step, self.marker = step, Path(marker)

    def hold(self) -> None:
        self.marker.touch()
        time.sleep(60)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object,
                           batch: object, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            self.hold()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.step is None:       # Lightning calls the checkpoint callbacks (LastCheckpoint) after the others
            self.hold()


def assert_same_weights(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(state) == list(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def test_last_ckpt_after_a_run_holds_its_final_step_and_weights(compose_config, synth_zarr: Path,
                                                                 tmp_path: Path) -> None:
    cfg = compose_config("pretrain", [*tiny(), f"data.volumes=[{synth_zarr}]", "trainer.max_steps=10", "logger=none",
                                      *STALE_BEST])
    datamodule, module, trainer, _ = run.prepare(cfg, cfg.objective)
    trainer.fit(module, datamodule=datamodule)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == trainer.global_step == 10
    assert_same_weights(saved["state_dict"], module.state_dict())
    [best] = (tmp_path / "checkpoints").glob("best-step*.ckpt")
    assert torch.load(best, weights_only=True)["global_step"] < 10      # last.ckpt did not wait for a better val/loss


def test_a_run_killed_after_several_saves_resumes_from_the_latest(synth_zarr: Path, tmp_path: Path) -> None:
    last = tmp_path / "checkpoints" / "last.ckpt"
    proc = start(tmp_path, synth_zarr, *STALE_BEST, "callbacks.last_checkpoint.every_n_steps=3",
                 "trainer.max_steps=1000")
    wait_for_checkpoint(proc, last)
    deadline, step = time.monotonic() + 120, 0
    while step < 12:            # saved at steps 3, 4, 6, 8, 9, 12: every 3 steps and after every validation
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"last.ckpt still at step {step}"
        time.sleep(0.05)
        step = torch.load(last, weights_only=True)["global_step"]
    proc.kill()                 # SIGKILL: no chance to save anything more
    proc.communicate()
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] >= 12
    stale = last.with_name(f".last.ckpt.{proc.pid}.partial")      # as a kill in the middle of a save leaves it
    stale.write_bytes(b"half a checkpoint")

    started = tmp_path / "started.pt"
    compose_run("pretrain", [*tiny(), f"data.volumes=[{synth_zarr}]", f"paths.output_dir={tmp_path}", "resume=auto",
                             f"trainer.max_steps={saved['global_step'] + 2}", *STALE_BEST,
                             f"+callbacks.started._target_={__name__}.StateAtTrainStart",
                             f"+callbacks.started.path={started}"])
    resumed = torch.load(started, weights_only=True)
    assert resumed["global_step"] == saved["global_step"]
    assert_same_weights(resumed["state_dict"], saved["state_dict"])
    assert checkpoint_state(last) == (saved["global_step"] + 2,) * 3     # step, patch stream, LR schedule go on
    assert not list(last.parent.glob(".*.partial"))       # the dead writer's half checkpoint: cleared on save


def test_a_moved_run_folder_resumes_where_it_stopped(synth_zarr: Path, tmp_path: Path, run_cli: CommandLine) -> None:
    first, moved = tmp_path / "A", tmp_path / "B"
    done = run_pretrain(run_cli, first, synth_zarr, *STALE_BEST, "trainer.max_steps=8")
    assert done.returncode == 0, done.stderr[-2000:]
    first.rename(moved)
    resumed = run_pretrain(run_cli, moved, synth_zarr, *STALE_BEST, "trainer.max_steps=12", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for warned in ("dirpath has changed", "callbacks used to create the checkpoint"):      # every record restored
        assert warned not in resumed.stderr
    assert [step for step, _ in logged_losses(moved)] == list(range(12))      # steps 0-7 in A, then 8-11
    names = sorted(p.name for p in (moved / "checkpoints").iterdir())
    assert len(names) == 2 and names[0].startswith("best-step") and names[1] == "last.ckpt", names   # no last-v1
    assert f"best checkpoint: {moved / 'checkpoints' / names[0]}" in resumed.stdout
    saved = torch.load(moved / "checkpoints" / "last.ckpt", weights_only=True)
    assert (saved["global_step"], saved["PatchDataModule"]["batches_served"]) == (12, 12)
    # The record of the best under Lightning's own key: a run begun with its ModelCheckpoint continues it too.
    assert [key for key in saved["callbacks"] if key.startswith("ModelCheckpoint{")]


def test_ctrl_c_saves_last_ckpt_and_exits_as_sigterm_does(synth_zarr: Path, tmp_path: Path) -> None:
    last = tmp_path / "checkpoints" / "last.ckpt"
    proc = start(tmp_path, synth_zarr, "trainer.max_steps=1000")
    wait_for_checkpoint(proc, last)                      # the first validation's
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    step, served, _ = checkpoint_state(last)
    assert proc.returncode == 0 and "Traceback" not in err, err[-2000:]
    assert f"Ctrl-C at step {step}: saved {last}; continue with resume=auto" in err
    assert 10 <= step == served < 1000


@pytest.mark.parametrize("stopping, said", [(False, "Detected KeyboardInterrupt, attempting graceful shutdown"),
                                             (True, "Ctrl-C again: stopped at once; the checkpoints are those saved")])
def test_a_second_ctrl_c_aborts_at_once_and_saves_nothing(synth_zarr: Path, tmp_path: Path, monkeypatch,
                                                          stopping: bool, said: str) -> None:
    """The second Ctrl-C comes during a step, or while the run stops for the first (as during a long save)."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))          # the command imports Pause from this file
    marker, last = tmp_path / "paused", tmp_path / "checkpoints" / "last.ckpt"
    proc = start(tmp_path, synth_zarr, "trainer.max_steps=1000", "trainer.val_check_interval=1000",
                 "callbacks.last_checkpoint.every_n_steps=50", f"+callbacks.pause._target_={__name__}.Pause",
                 f"+callbacks.pause.step={'null' if stopping else 52}", f"+callbacks.pause.marker={marker}")
    wait_for_checkpoint(proc, last)                      # step 50's; the next save would be step 100's
    before = file_hashes(last.parent)
    if stopping:
        proc.send_signal(signal.SIGINT)
    wait_for_checkpoint(proc, marker)                    # held for a minute: in step 52, or stopping after the Ctrl-C
    if not stopping:
        proc.send_signal(signal.SIGINT)
        time.sleep(1)                                    # its handler runs at once: the process waits in the pause
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)              # well before the pause ends
    assert proc.returncode == 1 and "Traceback" not in err, err[-2000:]
    assert "Ctrl-C: stopping as on SIGTERM" in err and said in out + err and "Ctrl-C at step" not in err
    assert file_hashes(last.parent) == before and checkpoint_state(last)[0] == 50


def test_a_refused_start_writes_nothing_and_the_corrected_one_runs(synth_zarr: Path, tmp_path: Path,
                                                                   run_cli: CommandLine) -> None:
    smaller = write_ome_zarr(np.zeros((16, 64, 64), np.uint8), tmp_path / "smaller.zarr", is_label=True)
    finetune = ["finetune", "model=tiny/vit2d", *TINY_FINETUNE, f"data.raw={synth_zarr}", "data.val_slices=null",
                "trainer.max_steps=2"]
    cases = {   # run dir: (the refused command, the start of its message, the corrected command)
        "steps": (["pretrain", *pretrain(tmp_path / "steps", synth_zarr, "trainer.max_steps=0")],
                  "trainer.max_steps=0: expected a whole number of at least 1",
                  ["pretrain", *pretrain(tmp_path / "steps", synth_zarr, "trainer.max_steps=2")]),
        "every": (["pretrain", *pretrain(tmp_path / "every", synth_zarr, "callbacks.last_checkpoint.every_n_steps=0")],
                  "callbacks.last_checkpoint.every_n_steps=0: expected a whole number of at least 1",
                  ["pretrain", *pretrain(tmp_path / "every", synth_zarr, "trainer.max_steps=2")]),
        "slices": ([*finetune, f"data.labels={synth_zarr}/labels/membranes", "data.labeled_slices=[0,40]",
                    f"hydra.run.dir={tmp_path / 'slices'}"],
                   "data.labeled_slices=[0, 40]: slice indices must lie in [0, 15]",
                   [*finetune, f"data.labels={synth_zarr}/labels/membranes", "data.labeled_slices=[0,1]",
                    f"hydra.run.dir={tmp_path / 'slices'}"]),
        "shape": ([*finetune, f"data.labels={smaller}", "data.labeled_slices=[0,1]",
                   f"hydra.run.dir={tmp_path / 'shape'}"],
                  f"{smaller} has shape [16, 64, 64], but the raw volume",
                  [*finetune, f"data.labels={synth_zarr}/labels/membranes", "data.labeled_slices=[0,1]",
                   f"hydra.run.dir={tmp_path / 'shape'}"]),
    }
    for name, out in zip(cases, run_cli([(argv, None) for argv, _, _ in cases.values()])):
        verb, message = out.args[0], cases[name][1]
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert out.stderr.strip().splitlines()[-1].startswith(f"emfm {verb}: error: {message}"), out.stderr[-2000:]
        assert [p.name for p in (tmp_path / name).iterdir()] == [f"{verb}.log"]   # checked before anything is written
    for name, out in zip(cases, run_cli([(argv, None) for _, _, argv in cases.values()])):
        assert out.returncode == 0, out.stderr[-2000:]
        assert (tmp_path / name / "checkpoints" / "last.ckpt").is_file()


def test_a_start_that_failed_before_its_first_checkpoint_is_set_aside_by_the_next(
        synth_zarr: Path, tmp_path: Path, run_cli: CommandLine) -> None:
    run_dir, extreme = tmp_path / "run", overflowing(synth_zarr, tmp_path / "extreme.zarr")
    assert "train/loss is not finite at step 0" in refused(run_cli, run_dir, extreme)
    left = {name: file_hashes(run_dir / name) for name in (".hydra", "tensorboard") if (run_dir / name).exists()}
    assert len(left) == 2 and not (run_dir / "checkpoints").exists()

    done = run_pretrain(run_cli, run_dir, synth_zarr, "trainer.max_steps=4")
    assert done.returncode == 0, done.stderr[-2000:]
    aside = run_dir / "failed-1"
    assert f"{run_dir}: an earlier start here saved no checkpoint; its records moved to {aside}" in done.stdout
    assert {name: file_hashes(aside / name) for name in left} == left          # the failed start's, as it left them
    assert str(extreme) in (aside / ".hydra" / "overrides.yaml").read_text()
    assert [step for step, _ in logged_losses(run_dir)] == [0, 1, 2, 3]      # the new run's metrics alone
    assert len(list((run_dir / "tensorboard").glob("events.*"))) == 1


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_keeps_the_one_before(
        synth_zarr: Path, tmp_path: Path, run_cli: CommandLine) -> None:
    done = run_pretrain(run_cli, tmp_path, synth_zarr, "trainer.max_steps=2")
    assert done.returncode == 0, done.stderr[-2000:]
    before, last = file_hashes(tmp_path / "checkpoints"), tmp_path / "checkpoints" / "last.ckpt"
    # Files up to 300 kB (the run's logs) can be written, not a checkpoint (3.4 MB): as on a disk that fills up.
    [full] = run_cli([(["pretrain", *pretrain(tmp_path, synth_zarr, "trainer.max_steps=4", "resume=auto")], 300_000)])
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-2000:]
    assert full.stderr.strip().splitlines()[-1] == (
        f"emfm pretrain: error: hydra.run.dir={tmp_path}: cannot write {last} (File too large); the last checkpoint "
        f"saved is kept")
    assert file_hashes(tmp_path / "checkpoints") == before        # no partial file left, the checkpoint before intact
