"""Mean ± std over seeds, paired differences and the label-efficiency curve, on hand-computed cases."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emfm.errors import EmfmError
from emfm.evaluation.comparison import mean_std, paired_differences, plot_curve, side_by_side, summarize
from emfm.pictures import LINE

BASELINE = [{"seed": 0, "iou": 0.50, "vrand": 0.40}, {"seed": 1, "iou": 0.60, "vrand": 0.50},
            {"seed": 2, "iou": 0.70, "vrand": 0.60}]
RECIPE = [{"seed": 2, "iou": 0.74, "vrand": 0.55}, {"seed": 0, "iou": 0.52, "vrand": 0.46},   # other order
          {"seed": 1, "iou": 0.66, "vrand": 0.52}]


def test_summary_is_mean_and_sample_std_over_seeds() -> None:
    summary = summarize(BASELINE)
    assert summary["iou"] == pytest.approx(0.6) and summary["vrand"] == pytest.approx(0.5)
    # sample std of (0.5, 0.6, 0.7): sqrt((0.01 + 0 + 0.01) / 2) = 0.1
    assert summary["std"] == pytest.approx({"iou": 0.1, "vrand": 0.1})
    assert summary["seeds"] == BASELINE and "dice" not in summary           # only metrics every row has
    assert mean_std([0.3]) == (0.3, 0.0)                                     # one seed: no spread


def test_paired_differences_pair_rows_by_seed() -> None:
    diff = paired_differences(RECIPE, BASELINE)
    iou, vrand = diff["iou"], diff["vrand"]
    assert iou["seeds"] == [0, 1, 2] and iou["values"] == pytest.approx([0.02, 0.06, 0.04])
    assert iou["mean"] == pytest.approx(0.04) and iou["std"] == pytest.approx(0.02)   # sqrt((4+4)e-4 / 2)
    assert iou["all_positive"]
    assert vrand["values"] == pytest.approx([0.06, 0.02, -0.05]) and not vrand["all_positive"]
    assert vrand["mean"] == pytest.approx(0.01) and vrand["std"] == pytest.approx(np.std([0.06, 0.02, -0.05], ddof=1))
    with pytest.raises(EmfmError, match="same seeds"):
        paired_differences(RECIPE[:2], BASELINE)


def test_curve_and_side_by_side_are_readable_pngs(tmp_path: Path) -> None:
    arms = {"scratch": [summarize(BASELINE), summarize(BASELINE[:2])],
            "pretrained": [summarize(RECIPE), summarize(RECIPE[:2])]}
    plot_curve(tmp_path / "curve.png", [1, 2], arms, title="test")
    with Image.open(tmp_path / "curve.png") as image:
        assert image.format == "PNG" and image.size[0] > image.size[1] > 100    # two panels side by side
    raw, truth = np.random.default_rng(0).normal(size=(24, 32)), np.zeros((24, 32), dtype=int)
    side_by_side(tmp_path / "sheet.png", raw, truth, {"a": np.zeros((1, 24, 32)), "b": np.ones((1, 24, 32))})
    with Image.open(tmp_path / "sheet.png") as image:
        assert image.size == (4 * 32, 24 + LINE) and np.asarray(image)[LINE:, -32:].min() == 255
        assert np.asarray(image)[:LINE, -30:-2].min() < 100                # the last column's title: "b probability"
