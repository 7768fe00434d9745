"""Shared fixtures: a synthetic OME-Zarr volume made by emfm itself, and the real configs composed."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from emfm.data.ingest import write_ome_zarr
from emfm.data.synthetic import make_synthetic_em, save_synthetic
from emfm.data.volume import Volume

# Overrides that shrink the real configs to a tiny ViT-MAE on 32x32 patches (seconds on 2 cores).
TINY_PRETRAIN = [
    "model.name=test_vit",
    "model.patch_size=8",
    "data.patch_shape=[32,32]",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.patches_per_epoch=64",
    "data.val_patches=8",
    "objective.methods.mae.decoder_dim=32",
    "objective.methods.mae.decoder_depth=1",
    "objective.methods.mae.decoder_heads=2",
    "objective.warmup_steps=2",
    "trainer.accelerator=cpu",
    "trainer.enable_model_summary=false",
    "callbacks.progress_bar=null",
]


# The tiny ViT as a model config, for tests that build modules without composing a config.
TINY_VIT = {"family": "vit2d", "name": "test_vit", "input_shape": [32, 32], "patch_size": 8}

# Tiny versions of every encoder family and objective, for the real configs.
TINY_MODELS = {
    "vit2d": ["model.name=test_vit", "model.patch_size=8", "data.patch_shape=[32,32]"],
    "vit3d": ["model.name=test_vit", "model.patch_size=[4,8,8]", "data.patch_shape=[8,32,32]"],
    "cnn2d": ["model.name=test_resnet", "data.patch_shape=[64,64]"],
    "cnn3d": ["model.name=test_resnet3d", "data.patch_shape=[8,64,64]"],
    # Fine-grid ViTs with their configs' patch sizes, (4, 4) and (2, 8, 8); vit2d above is at patch 8.
    "vit2d_p4": ["model.name=test_vit", "data.patch_shape=[32,32]"],
    "vit3d_p8": ["model.name=test_vit", "data.patch_shape=[8,32,32]"],
}
TINY_OBJECTIVES = {
    "mae": ["objective.methods.mae.decoder_dim=32", "objective.methods.mae.decoder_depth=1",
            "objective.methods.mae.decoder_heads=2"],
    "mim": ["objective.methods.mim.decoder_dim=16"],
    "mocov3": ["objective.methods.mocov3.proj_dim=16", "objective.methods.mocov3.hidden_dim=32"],
    "simclr": ["objective.methods.simclr.proj_dim=16", "objective.methods.simclr.hidden_dim=32"],
    "densecl": ["objective.methods.densecl.proj_dim=16", "objective.methods.densecl.hidden_dim=32"],
    "restore": ["+head.channels=8", "objective.methods.restore.mask_patch=8"],
    "hybrid": ["objective.methods.masked.decoder_dim=32", "objective.methods.mocov3.proj_dim=16",
               "objective.methods.mocov3.hidden_dim=32"],
}
TINY_TRAINING = [
    "data.batch_size=4", "data.num_workers=0", "data.patches_per_epoch=64", "data.val_patches=4",
    "objective.warmup_steps=2", "trainer.accelerator=cpu", "trainer.enable_model_summary=false",
    "callbacks.progress_bar=null",
]


def tiny(model: str, objective: str) -> list[str]:
    """Overrides for a seconds-long run of ``model=... objective=...``."""
    return [f"model={model}", f"objective={objective}", *TINY_MODELS[model], *TINY_OBJECTIVES[objective],
            *TINY_TRAINING]


# A seconds-long fine-tuning of a tiny model, without validation.
TINY_FINETUNE_RUN = ["data.batch_size=4", "data.num_workers=0", "data.patches_per_epoch=64", "module.warmup_steps=2",
                     "module.lr=3e-3", "trainer.accelerator=cpu", "trainer.enable_model_summary=false",
                     "callbacks.progress_bar=null", "logger=none", "data.val_slices=null",
                     "+trainer.limit_val_batches=0", "callbacks.model_checkpoint.monitor=null",
                     "data.labeled_slices=[0,1,2,3]"]


def compose_run(name: str, overrides: list[str]) -> Any:
    """Run the command ``name`` on its real composed config, as ``emfm NAME`` does."""
    from emfm import run

    with initialize_config_module("emfm.configs", version_base="1.3"):
        cfg = compose(name, overrides)
    return getattr(run, name)(cfg)


def finetuned(root: Path, volume: Path, model: str, steps: int, *extra: str) -> Path:
    """The last checkpoint of a real ``emfm finetune`` run on the membranes of the synthetic ``volume``."""
    compose_run("finetune", [f"model={model}", *TINY_MODELS[model], f"data.raw={volume}",
                             f"data.labels={volume}/labels/membranes", f"trainer.max_steps={steps}",
                             f"paths.output_dir={root}", *TINY_FINETUNE_RUN, *extra])
    return root / "checkpoints" / "last.ckpt"


def file_hashes(path: Path) -> dict[str, str]:
    """sha256 of the file ``path``, or of every file under the folder ``path``: equal before and after = untouched."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def overflowing(volume: Path, out: Path) -> Path:
    """``volume`` as intensities in [0, 0.5] with a float32-max sentinel every 16 pixels: finite as stored (reading
    and normalising accept it) but infinite once normalised, so a run on it meets a non-finite loss at once."""
    raw = Volume(volume).read().astype(np.float32) / 510
    raw[..., ::16, ::16] = np.finfo(np.float32).max
    return write_ome_zarr(raw, out, levels=1)    # no pyramid: its means would overflow


@pytest.fixture(scope="session")
def synth_zarr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A (16, 96, 96) synthetic EM volume with labels, as OME-Zarr on disk."""
    volume = make_synthetic_em((16, 96, 96), seed=0)
    return save_synthetic(volume, tmp_path_factory.mktemp("data") / "synth.zarr")


def pretrained(root: Path, volume: Path, steps: int, overrides: list[str]) -> Path:
    """The last checkpoint of a real ``emfm pretrain`` run of ``steps`` steps on ``volume``."""
    compose_run("pretrain", [*overrides, f"data.volumes=[{volume}]", f"paths.output_dir={root}",
                             f"trainer.max_steps={steps}", "logger=none"])
    return root / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def vit_checkpoint(synth_zarr: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ViT (patch 8, 32x32 tiles) after a brief (60-step) MAE pretraining on the synthetic volume."""
    return pretrained(tmp_path_factory.mktemp("vit"), synth_zarr, 60, TINY_PRETRAIN)


@pytest.fixture(scope="session")
def model_2d(synth_zarr: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ViT + UNETR fine-tuned for 40 steps on the synthetic membranes."""
    return finetuned(tmp_path_factory.mktemp("ft2d"), synth_zarr, "vit2d", 40)


@pytest.fixture
def compose_config(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose a command's real config, with the run directory in ``tmp_path``."""

    def _compose(name: str, overrides: list[str] = ()) -> DictConfig:
        with initialize_config_module("emfm.configs", version_base="1.3"):
            return compose(name, overrides=[f"paths.output_dir={tmp_path}", *overrides])

    return _compose
