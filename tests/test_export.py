"""emfm export -> emfm.load_encoder: the same encoder, bit for bit, for every family."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import emfm
from emfm.errors import EmfmError
from emfm.export import export_encoder
from emfm.models.encoders import Encoder
from emfm.pretrain.base import PretrainModule
from tests.conftest import pretrained, tiny

FAMILIES = {"vit2d": "mae", "cnn2d": "mim", "vit3d": "mae", "cnn3d": "mim"}


@pytest.fixture(scope="module")
def checkpoints(synth_zarr: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A two-step pretraining checkpoint of every encoder family."""
    return {family: pretrained(tmp_path_factory.mktemp(family), synth_zarr, 2, tiny(family, objective))
            for family, objective in FAMILIES.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_export_then_load_reproduces_the_encoder(checkpoints: dict[str, Path], tmp_path: Path, family: str) -> None:
    out = subprocess.run([sys.executable, "-m", "emfm", "export", str(checkpoints[family]), str(tmp_path / "enc")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    original = PretrainModule.load_from_checkpoint(checkpoints[family], weights_only=True).encoder.eval()
    loaded = emfm.load_encoder(tmp_path / "enc")
    x = torch.rand(2, 1, *original.input_shape)
    with torch.no_grad():
        assert torch.equal(loaded(x), original(x))
        wrapped = emfm.load_encoder(tmp_path / "enc", as_timm=False)
        assert isinstance(wrapped, Encoder)
        for a, b in zip(wrapped.forward_features(x), original.forward_features(x)):
            assert torch.equal(a, b)
    config = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert config["model"]["family"] == family and config["pretraining"]["steps"] == 2
    volume = config["data"]["volumes"][0]
    assert volume["voxel_size"] and len(volume["normalization_percentiles"]) == 2
    assert "normalise new data the same way" in (tmp_path / "enc" / "README.md").read_text()
    if family.endswith("2d"):  # a stock timm model, and the weights load into timm without emfm
        assert type(loaded).__module__.startswith("timm.")
        from safetensors.torch import load_file

        kwargs = {"img_size": original.input_shape, "patch_size": 8} if family == "vit2d" else {}
        stock = timm.create_model(config["model"]["name"], pretrained=False, num_classes=0, in_chans=1, **kwargs)
        stock.load_state_dict(load_file(tmp_path / "enc" / "encoder.safetensors"))


def test_export_refuses_what_is_not_an_emfm_checkpoint(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    with pytest.raises(EmfmError, match="not an emfm pretraining checkpoint"):
        export_encoder(foreign, tmp_path / "out")
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    with pytest.raises(EmfmError, match="not a readable PyTorch checkpoint"):
        export_encoder(tmp_path / "junk.ckpt", tmp_path / "out")
    with pytest.raises(EmfmError, match="not an emfm export"):
        emfm.load_encoder(tmp_path)


def test_export_does_not_overwrite_without_asking(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    export_encoder(checkpoints["cnn2d"], tmp_path / "enc")
    with pytest.raises(EmfmError, match="exists; pass --overwrite"):
        export_encoder(checkpoints["cnn2d"], tmp_path / "enc")
    export_encoder(checkpoints["cnn2d"], tmp_path / "enc", overwrite=True)
