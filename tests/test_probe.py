"""The online dense probe: logged during a real run, and it tells useful features from useless ones."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from emfm import run
from emfm.data.ingest import write_ome_zarr
from emfm.errors import EmfmError
from emfm.pretrain.base import PretrainModule
from emfm.pretrain.probe import DenseProbe, iou_dice
from tests.conftest import tiny, tiny_encoder


def probe_for(volume: Path) -> DenseProbe:
    return DenseProbe(volume, volume / "labels" / "membranes", roi="0:4,0:96,0:96", fit_steps=60)


def test_probe_is_logged_during_pretraining(compose_config, synth_zarr: Path, tmp_path: Path) -> None:
    cfg = compose_config("pretrain", [
        *tiny("vit2d", "mae"), f"data.volumes=[{synth_zarr}]", "trainer.max_steps=4", "trainer.log_every_n_steps=1",
        "callbacks=probe", "callbacks.progress_bar=null", f"callbacks.dense_probe.raw={synth_zarr}",
        f"callbacks.dense_probe.labels={synth_zarr}/labels/membranes", "callbacks.dense_probe.roi='0:2,0:96,0:96'",
        "callbacks.dense_probe.every_n_steps=2", "callbacks.dense_probe.fit_steps=20",
    ])
    run.pretrain(cfg)
    with (tmp_path / "csv" / "metrics.csv").open() as f:
        rows = [row for row in csv.DictReader(f) if row.get("probe/iou")]
    assert [int(row["step"]) for row in rows] == [0, 2, 4]  # at the start, every 2 steps, at the end
    assert all(0 < float(row["probe/iou"]) <= float(row["probe/dice"]) <= 1 for row in rows)


def test_probe_scores_informative_features_above_uninformative_ones(synth_zarr: Path) -> None:
    torch.manual_seed(0)
    module = PretrainModule(tiny_encoder("vit2d"), {"mae": {"decoder_dim": 32}})
    informative = probe_for(synth_zarr)
    informative.load(module.encoder.input_shape)
    score = informative.probe(module)["probe/iou"]
    with torch.no_grad():
        module.encoder.vit.patch_embed.proj.weight.zero_()  # tokens no longer depend on the image
    blind = informative.probe(module)["probe/iou"]
    assert score > 0.5 and blind < 0.5 * score


def test_iou_and_dice_by_hand() -> None:
    pred = torch.tensor([[0, 1, 1, 0], [2, 2, 0, 0]])
    truth = torch.tensor([[0, 1, 0, 0], [2, 2, 2, 0]])
    iou, dice = iou_dice(pred, truth, classes=3)
    assert iou == pytest.approx((1 / 2 + 2 / 3) / 2) and dice == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_bad_probe_inputs_are_named(synth_zarr: Path, tmp_path: Path) -> None:
    labels = synth_zarr / "labels" / "membranes"
    with pytest.raises(EmfmError, match=r"callbacks.dense_probe.roi=\[0:4,0:200,0:96\]: .* outside the volume"):
        DenseProbe(synth_zarr, labels, roi="0:4,0:200,0:96").load((32, 32))
    with pytest.raises(EmfmError, match=r"callbacks.dense_probe.roi=\[0:4,0:96\]: 2 ranges for a volume of 3 axes"):
        DenseProbe(synth_zarr, labels, roi="0:4,0:96").load((32, 32))
    other = write_ome_zarr(np.zeros((4, 32, 32), np.uint8), tmp_path / "other.zarr", is_label=True)
    with pytest.raises(EmfmError, match="other.zarr has shape \\[4, 32, 32\\]"):
        DenseProbe(synth_zarr, other).load((32, 32))
    with pytest.raises(EmfmError, match="fewer than two"):
        DenseProbe(synth_zarr, labels, roi="0:1,0:32,0:32").load((32, 32))
