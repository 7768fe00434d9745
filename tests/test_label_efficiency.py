"""scripts/label_efficiency.py end to end on a tiny model: both arms, the report and the picture."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_harness_compares_pretrained_and_scratch(synth_zarr: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "label_efficiency.py"), "--raw", str(synth_zarr),
           "--labels", str(synth_zarr / "labels" / "membranes"), "--unlabeled", str(synth_zarr),
           "--target", "membrane", "--labeled-slices", "0", "--labeled-slices", "0,1", "--eval-slices", "12-13",
           "--pretrain-steps", "3", "--finetune-steps", "3", "--model", "vit2d", "--model-size", "tiny",
           "--seeds", "0,1", "--workers", "0", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    for arm in ("pretrained", "scratch"):
        assert {"iou", "dice", "vrand", "vinfo"} <= set(report[arm]) and len(report[arm]["seeds"]) == 2
        assert all(0 <= report[arm][k] <= 1 for k in ("iou", "dice", "vrand", "vinfo"))
    assert [p["labeled_slices"] for p in report["curve"]] == [[0], [0, 1]]
    assert report["config"]["eval_slices"] == [12, 13] and report["seconds"]["pretrain"] > 0
    assert all(Path(p["picture"]).is_file() for p in report["curve"])
    assert "pretrained" in done.stdout and "scratch" in done.stdout


def test_labeled_slices_inside_the_eval_slices_are_refused(synth_zarr: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "scripts" / "label_efficiency.py"), "--raw", str(synth_zarr),
           "--labels", str(synth_zarr / "labels" / "membranes"), "--labeled-slices", "0", "--labeled-slices", "3-5",
           "--eval-slices", "5-7", "--out", str(tmp_path / "r.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "--labeled-slices [3, 4, 5] overlap --eval-slices at [5]" in done.stderr
    assert not (tmp_path / "r").exists()                      # refused before any work
