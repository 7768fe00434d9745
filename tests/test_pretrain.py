"""The pretraining command end to end: real configs, real zarr, real Trainer."""

import csv
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from omegaconf import OmegaConf

from emfm import run
from emfm.errors import EmfmError
from emfm.pretrain.base import PretrainModule
from tests.conftest import TINY_PRETRAIN, tiny

CONFIGS = Path(__file__).parents[1] / "configs"
GROUP_OPTIONS = [
    (group.name, str(option.relative_to(group).with_suffix("")))
    for group in sorted(CONFIGS.iterdir()) if group.is_dir() and group.name != "hydra"
    for option in sorted(group.rglob("*.yaml")) if not option.stem.startswith("_")
]
# Groups used inside another config rather than at the top level: where they are mounted.
MOUNTED = {"augment": "augment@objective.methods.mae.augment"}
REQUIRED = {"probe": ["callbacks.dense_probe.raw=r.zarr", "callbacks.dense_probe.labels=l.zarr"]}
# Groups (and options) only the fine-tuning command has, and each command's required keys.
FINETUNE_ONLY = {"head", "target", "semi", "data/labeled", "experiment/restore_unet/finetune",
                 "experiment/restore_unet/lp_ft"}
COMMAND_KEYS = {"pretrain": ["data.volumes=[v.zarr]"], "finetune": ["data.raw=r.zarr", "data.labels=l.zarr"]}


@pytest.mark.parametrize("group,option", GROUP_OPTIONS)
def test_every_config_composes_and_builds(compose_config, group: str, option: str) -> None:
    """Each option resolves, and its data module, module, trainer (loggers, callbacks) are built from it (with
    the tiny encoder unless the model is the option tested; volumes are opened only when training starts)."""
    command = "finetune" if {group, f"{group}/{option}"} & FINETUNE_ONLY else "pretrain"
    if group in ("model", "experiment"):    # a CNN or U-Net model pretrains by masked modelling, not MAE
        model = ["objective=mim"] if group == "model" and "vit" not in option else []
    else:
        model = ["model=tiny/vit2d"]
    cfg = compose_config(command, [f"{MOUNTED.get(group, group)}={option}", *COMMAND_KEYS[command], *model,
                                   *REQUIRED.get(option, [])])
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert isinstance(run.build(cfg.data), LightningDataModule)
    assert isinstance(run.build(cfg.objective if command == "pretrain" else cfg.module, isotropic=False),
                      LightningModule)
    if cfg.trainer.accelerator != "gpu" or torch.cuda.is_available():
        assert isinstance(run.build_trainer(cfg), Trainer)


def test_unknown_config_key_is_refused(compose_config) -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="trainer.max_stepz"):
        compose_config("pretrain", ["trainer.max_stepz=3"])


def test_fast_dev_run(compose_config, synth_zarr: Path, tmp_path: Path) -> None:
    cfg = compose_config("pretrain", [*tiny(debug="fdr"), f"data.volumes=[{synth_zarr}]"])
    metrics = run.pretrain(cfg)
    assert metrics["train/loss"] > 0 and not (tmp_path / "checkpoints").exists()   # one batch, nothing saved


def read_losses(path: Path) -> list[float]:
    with path.open() as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


def test_pretraining_learns_and_writes_its_outputs(compose_config, synth_zarr: Path, tmp_path: Path) -> None:
    cfg = compose_config("pretrain", [
        *TINY_PRETRAIN, f"data.volumes=[{synth_zarr}]", "trainer.max_steps=60",
        "trainer.val_check_interval=30", "trainer.log_every_n_steps=5", "objective.lr=2e-3",
        "objective.methods.mae.norm_pix_loss=false", "objective.methods.mae.augment={}",
        "callbacks.reconstructions.every_n_steps=30",
    ])
    run.pretrain(cfg)
    losses = read_losses(tmp_path / "csv" / "metrics.csv")
    assert len(losses) == 12
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3])
    assert sorted(p.name for p in (tmp_path / "reconstructions").glob("*.png")) == [
        "step_0000001.png", "step_0000030.png", "step_0000060.png"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    best = list((tmp_path / "checkpoints").glob("best-step*.ckpt"))
    assert len(best) == 1 and (tmp_path / "checkpoints" / "last.ckpt").exists()
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 60
    assert state["hyper_parameters"]["encoder"]["name"] == "test_vit"
    module = PretrainModule.load_from_checkpoint(best[0], weights_only=True)
    assert module.methods["mae"].mask_ratio == 0.75


def test_wandb_logger_runs_offline(compose_config, synth_zarr: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = compose_config("pretrain", [
        *TINY_PRETRAIN, f"data.volumes=[{synth_zarr}]", "logger=wandb", "trainer.max_steps=2",
        "trainer.log_every_n_steps=1", "callbacks.reconstructions.every_n_steps=1",
    ])
    run.pretrain(cfg)
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_mae_on_a_cnn_is_refused(compose_config, synth_zarr: Path) -> None:
    cfg = compose_config("pretrain", [*tiny("cnn2d", "mae", debug="fdr"), f"data.volumes=[{synth_zarr}]"])
    with pytest.raises(EmfmError, match="objective=mae drops tokens and needs a ViT encoder"):
        run.pretrain(cfg)


def test_missing_volume_is_reported(compose_config, tmp_path: Path) -> None:
    cfg = compose_config("pretrain", [*tiny(debug="fdr"), f"data.volumes=[{tmp_path}/nope.zarr]"])
    with pytest.raises(EmfmError, match="nope.zarr"):
        run.pretrain(cfg)


def test_precision_is_fp32_on_cpu_and_explicit_choices_stand() -> None:
    assert run.choose_precision("auto", "cpu") == "32-true"
    assert run.choose_precision("16-mixed", "gpu") == "16-mixed"
    if not torch.cuda.is_available():
        assert run.choose_precision("auto", "auto") == "32-true"
