"""The one place that turns a composed config into objects and runs them.

Each command is a plain function of its config, called by the CLI and by the tests alike.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from emfm.errors import EmfmError


def choose_precision(precision: str | int, accelerator: str) -> str | int:
    """``auto`` means bf16-mixed where a CUDA device runs, full fp32 on CPU."""
    if precision != "auto":
        return precision
    cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    if cuda:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def build(config: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets errors in the user's input through unwrapped."""
    try:
        return instantiate(config, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while isinstance(cause, InstantiationException):
            cause = cause.__cause__
        if isinstance(cause, EmfmError):
            raise cause from None
        raise


def instantiate_all(group: DictConfig | None) -> list[Any]:
    """Objects of a config group holding named entries (callbacks, loggers); null entries are off."""
    return [build(entry) for entry in (group or {}).values() if entry is not None]


def build_trainer(cfg: DictConfig) -> pl.Trainer:
    trainer_cfg = cfg.trainer
    return build(
        trainer_cfg,
        precision=choose_precision(trainer_cfg.precision, trainer_cfg.accelerator),
        callbacks=instantiate_all(cfg.get("callbacks")),
        logger=instantiate_all(cfg.get("logger")) or False,
    )


def pretrain(cfg: DictConfig) -> dict[str, float]:
    """Self-supervised pretraining; returns the last logged metrics."""
    # RandomPatches gives each worker its own share of __len__ and its own random stream, which is
    # exactly what this Lightning warning asks for.
    warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build(cfg.data)
    module = build(cfg.objective)
    encoder_dims = module.encoder.spatial_dims
    if len(cfg.data.patch_shape) != encoder_dims:
        raise EmfmError(
            f"model.family={cfg.model.family} is {encoder_dims}-D but data.patch_shape "
            f"{list(cfg.data.patch_shape)} has {len(cfg.data.patch_shape)} axes"
        )
    trainer = build_trainer(cfg)
    trainer.fit(module, datamodule=datamodule)
    if trainer.is_global_zero:
        report_outputs(Path(cfg.paths.output_dir), trainer)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def report_outputs(run_dir: Path, trainer: pl.Trainer) -> None:
    """Tell the user where the results are."""
    lines = [f"run dir:         {run_dir}"]
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.best_model_path:
        lines.append(f"best checkpoint: {checkpoint.best_model_path}")
    if checkpoint is not None and checkpoint.last_model_path:
        lines.append(f"last checkpoint: {checkpoint.last_model_path}")
    for pattern, label in [("reconstructions", "reconstructions"), ("csv/metrics.csv", "metrics")]:
        if (run_dir / pattern).exists():
            lines.append(f"{label + ':':<17}{run_dir / pattern}")
    print("\n".join(lines))
