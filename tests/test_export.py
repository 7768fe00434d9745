"""emfm export: a pretraining checkpoint -> emfm.load_encoder gives the same encoder, bit for bit, for every family;
a fine-tuning checkpoint -> a bioimage.io package that bioimageio.core's own test passes offline."""

import json
import re
import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import emfm
from emfm.checkpoints import load_segmenter
from emfm.errors import EmfmError
from emfm.export import export, export_encoder
from emfm.models.encoders import Encoder
from emfm.pretrain.base import PretrainModule
from tests.conftest import FAMILY_OBJECTIVES, CommandLine

FAMILIES = list(FAMILY_OBJECTIVES)


@pytest.fixture(scope="module")
def checkpoints(two_step_pretrained: Callable[[str], Path]) -> dict[str, Path]:
    """A two-step pretraining checkpoint of every encoder family."""
    return {family: two_step_pretrained(family) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_export_then_load_reproduces_the_encoder(checkpoints: dict[str, Path], tmp_path: Path, family: str,
                                                 run_cli: CommandLine) -> None:
    [out] = run_cli([(["export", str(checkpoints[family]), str(tmp_path / "enc")], None)])
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
    card = (tmp_path / "enc" / "README.md").read_text()
    assert "normalise new data the same way" in card
    run_snippet(card, tmp_path / "enc")
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


def run_snippet(card: str, folder: Path) -> dict:
    """Execute the model card's Python block in ``folder``, as its reader would; returns its variables."""
    (code,) = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    namespace: dict = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        exec(compile(code, str(folder / "README.md"), "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def segmenters(two_step_finetuned: Callable[[str], Path]) -> dict[str, Path]:
    """Fine-tuning checkpoints of a 2-D ViT + UNETR and a 3-D CNN + U-Net, two steps each."""
    return {model: two_step_finetuned(model) for model in ("vit2d", "cnn3d")}


def offline(*args: object) -> None:
    raise OSError("this test runs without network")


@pytest.mark.parametrize("model", ["vit2d", "cnn3d"])
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")   # what bioimage.io reads;
@pytest.mark.filterwarnings("ignore::ResourceWarning")                              # bioimageio.core leaves
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")      # files open
def test_a_fine_tuned_checkpoint_exports_as_a_bioimage_io_package_that_passes_its_test(
        segmenters: dict[str, Path], synth_zarr: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        run_cli: CommandLine, model: str) -> None:
    from bioimageio.core import test_model

    [out] = run_cli([(["export", str(segmenters[model]), str(tmp_path / "pkg"), "--sample", str(synth_zarr),
                       "--author", "A. Tester"], None)])
    assert out.returncode == 0, out.stderr[-2000:]
    package = tmp_path / "pkg"
    assert {p.name for p in package.iterdir()} == {"rdf.yaml", "README.md", "cover.png", "test_input.npy",
                                                   "test_output.npy", "weights.pt", "weights_torchscript.pt"}
    monkeypatch.setattr(socket.socket, "connect", offline)
    summary = test_model(package / "rdf.yaml")
    assert summary.status == "passed", summary.format()

    raw = torch.from_numpy(np.load(package / "test_input.npy"))
    segmenter = load_segmenter(segmenters[model])
    lo, hi = np.percentile(raw.numpy(), [1, 99.5])
    image = ((raw - lo) / (hi - lo + 1e-6)).float()
    with torch.no_grad():
        expected = segmenter.activate(segmenter.model(image))
        traced = torch.jit.load(package / "weights_torchscript.pt")
        assert (traced(image) - expected).abs().max() <= 1e-5
    assert np.allclose(np.load(package / "test_output.npy"), expected.numpy(), atol=1e-5)
    snippet = run_snippet((package / "README.md").read_text(), package)
    assert snippet["probabilities"].shape == tuple(expected.shape)


def test_export_options_of_a_package_are_refused_for_an_encoder(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(EmfmError, match="a pretraining checkpoint, exported as its encoder; --sample"):
        export(checkpoints["cnn2d"], tmp_path / "out", sample=tmp_path)


def test_a_license_the_bioimage_io_spec_refuses_is_named(segmenters: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(EmfmError, match=r"^--license no-such-license: not an SPDX license id bioimage.io takes"):
        export(segmenters["vit2d"], tmp_path / "pkg", license="no-such-license")
    assert not (tmp_path / "pkg").exists()
