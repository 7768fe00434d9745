"""Trainer pieces shared by the training commands: metrics that survive resumes, the projected time on a CPU."""

import csv
import logging
import re
from pathlib import Path

import pytest

from emfm.training import AppendingCSVLogger, duration
from tests.conftest import pretrained, tiny


def test_metrics_are_appended_across_runs_and_a_new_key_widens_the_header(tmp_path: Path) -> None:
    path = tmp_path / "csv" / "metrics.csv"
    first = AppendingCSVLogger(tmp_path, name="csv", version="")
    first.log_metrics({"train/loss": 1.0}, step=0)
    first.save()
    with path.open("a") as f:
        f.write("0.9")                 # a row cut short by a kill -9 (no newline): dropped, never glued to the next
    second = AppendingCSVLogger(tmp_path, name="csv", version="")    # the resumed run
    second.log_metrics({"train/loss": 0.5}, step=1)
    second.log_metrics({"val/loss": 0.7}, step=1)
    second.save()
    second.log_metrics({"train/loss": 0.25}, step=2)
    second.finalize("success")
    with path.open(newline="") as f:
        assert list(csv.reader(f)) == [["step", "train/loss", "val/loss"], ["0", "1.0", ""], ["1", "0.5", ""],
                                       ["1", "", "0.7"], ["2", "0.25", ""]]
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.csv"]     # no temporary file left


@pytest.mark.parametrize("hint_over_hours, hinted", [(0.0, True), (100.0, False)])
def test_a_cpu_run_says_its_seconds_per_step_and_projected_time(synth_zarr: Path, tmp_path: Path, caplog,
                                                                 hint_over_hours: float, hinted: bool) -> None:
    with caplog.at_level(logging.INFO):
        pretrained(tmp_path, synth_zarr, 6, [*tiny(), "callbacks.projected_time.after_steps=3",
                                             f"callbacks.projected_time.hint_over_hours={hint_over_hours}"])
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("on a CPU:")]
    assert len(said) == 1, said     # once, after steps 2-4 (the first step is not timed)
    match = re.fullmatch(r"on a CPU: ([\d.]+) s/step \(steps 2-4\); the 2 steps left of trainer.max_steps=6 take "
                         r"about (\d+) s(; for a CPU-sized run: data.patch_shape=\[128,128\] data.batch_size=8 "
                         r"\(or fewer trainer.max_steps\))?", said[0])
    assert match and float(match[1]) > 0 and abs(int(match[2]) - 2 * float(match[1])) <= 1
    assert bool(match[3]) == hinted


def test_durations_read_as_precisely_as_a_projection_deserves() -> None:
    assert [duration(s) for s in (42, 119, 1020, 12600, 181440)] == ["42 s", "119 s", "17 min", "3.5 h", "2.1 days"]
