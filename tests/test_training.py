"""Trainer pieces shared by the training commands: metrics that survive resumes."""

import csv
from pathlib import Path

from emfm.training import AppendingCSVLogger


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
