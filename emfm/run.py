"""The one place that turns a composed config into objects and runs them.

Each command is a plain function of its config, called by the CLI and by the tests alike.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Any, Protocol

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from emfm.checkpoints import hyper_parameters, read_checkpoint
from emfm.errors import EmfmError, first_line
from emfm.models.encoders import ViTEncoder
from emfm.training import LastCheckpoint, LogConfig, check_max_steps, compiler_missing, to_channels_last

log = logging.getLogger(__name__)


def on_cuda(accelerator: str) -> bool:
    return torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")


def choose_precision(precision: str | int, accelerator: str) -> str | int:
    """``auto`` means bf16-mixed where a CUDA device runs, full fp32 on CPU."""
    if precision != "auto":
        return precision
    if on_cuda(accelerator):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def choose_sync_batchnorm(sync: bool | str, accelerator: str) -> bool:
    """``auto`` synchronises BatchNorm statistics across GPUs; torch's SyncBatchNorm has no CPU kernel."""
    return on_cuda(accelerator) if sync == "auto" else bool(sync)


def choose_channels_last(setting: bool | str, module: torch.nn.Module, accelerator: str) -> bool:
    """``auto`` means channels-last for a convolutional network on a CUDA device, cuDNN's fast layout for tensor cores
    (PyTorch's performance guide; not measured here). Not on a CPU: there it slowed the ResNet-18 U-Net's training
    step to 0.84-0.91x (``python -m benchmarks.train --configs unet2d cnn3d --ours-channels-last true false
    --channels-last``, docs/benchmarks.md). Not for networks with a ViT encoder (its only convolution is the patch
    embedding; a UNETR head's convolutions are not measured)."""
    if setting == "auto":
        return on_cuda(accelerator) and not any(isinstance(layer, ViTEncoder) for layer in module.modules())
    if not isinstance(setting, bool):
        raise EmfmError(f"trainer.channels_last={setting!r}: expected auto, true or false")
    return setting


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


# Keys of the trainer config that emfm reads itself; the rest are the Lightning Trainer's.
EMFM_TRAINER_KEYS = ("compile", "channels_last")


def build_trainer(cfg: DictConfig) -> pl.Trainer:
    settings = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(settings, dict)
    trainer_cfg = OmegaConf.create({k: v for k, v in settings.items() if k not in EMFM_TRAINER_KEYS})
    loggers = instantiate_all(cfg.get("logger"))
    callbacks = instantiate_all(cfg.get("callbacks"))
    if not loggers:  # logger=none: the learning-rate monitor would have nowhere to write
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    else:
        config = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(config, dict)
        callbacks.append(LogConfig({str(k): v for k, v in config.items()}))
    return build(
        trainer_cfg,
        precision=choose_precision(trainer_cfg.precision, trainer_cfg.accelerator),
        sync_batchnorm=choose_sync_batchnorm(trainer_cfg.get("sync_batchnorm", False), trainer_cfg.accelerator),
        callbacks=callbacks,
        logger=loggers or False,
    )


def prepare(cfg: DictConfig,
            module_cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule, pl.Trainer, str | None]:
    """Data, module, trainer and the checkpoint to resume from, with every input checked: before the trainer
    starts, whose loggers write their files before Lightning sets the data up."""
    # RandomPatches gives each worker its own share of __len__ and its own random stream, which is
    # exactly what this Lightning warning asks for.
    warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
    check_max_steps(cfg.trainer.max_steps)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build(cfg.data)
    datamodule.setup("fit")              # opens and checks volumes, labels and slices (Lightning's call reuses them)
    module = build(module_cfg, isotropic=datamodule.isotropic)
    checkpoint = resume_checkpoint(cfg.get("resume"), Path(cfg.paths.output_dir), module)
    if choose_channels_last(cfg.trainer.get("channels_last", "auto"), module, cfg.trainer.accelerator):
        to_channels_last(module)
    if cfg.trainer.get("compile"):
        compile_training(module, cfg.trainer.accelerator)
    return datamodule, module, build_trainer(cfg), checkpoint


class Compilable(Protocol):
    def compile_training(self) -> None: ...


def compile_training(module: Compilable, accelerator: str) -> None:
    """``trainer.compile=true``: the module's training loss through torch.compile (each module's
    ``compile_training`` says what it compiles), or, where it cannot build kernels, a warning and eager steps."""
    if problem := compiler_missing(on_cuda(accelerator)):
        log.warning("trainer.compile=true: %s; training uncompiled", problem)
        return
    module.compile_training()


def fit(cfg: DictConfig, module_cfg: DictConfig) -> dict[str, float]:
    """Train; returns the last logged metrics (empty after SIGTERM or Ctrl-C, which saved last.ckpt)."""
    run_dir = Path(cfg.paths.output_dir)
    if not cfg.get("resume"):
        refuse_used_run_dir(run_dir)
    datamodule, module, trainer, checkpoint = prepare(cfg, module_cfg)
    if checkpoint is None:
        set_aside_failed_start(run_dir)
    record_config(cfg, run_dir)
    try:
        with warnings.catch_warnings():
            if checkpoint:   # a resumed run writes on into its own checkpoint directory, as it should, and its
                # data module continues the patch stream where the checkpoint was saved, mid-epoch or not
                warnings.filterwarnings("ignore", message=f"Checkpoint directory {re.escape(str(run_dir))}")
                warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")
            trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint)
    except SIGTERMException:  # SIGTERM or a first Ctrl-C: LastCheckpoint saved last.ckpt and said so
        return {}
    except KeyboardInterrupt:  # Ctrl-C again while stopping for the first (during a step, Lightning's exit 1)
        log.info("Ctrl-C again: stopped at once; the checkpoints are those saved before")
        raise SystemExit(1) from None
    except OSError as e:      # a checkpoint, metrics or pictures that cannot be written: a full disk, permissions
        if e.filename and run_dir.resolve() not in Path(e.filename).resolve().parents:
            raise                 # not the run directory's: the CLI names the file
        raise EmfmError(f"hydra.run.dir={run_dir}: cannot write {e.filename or 'into it'} "
                        f"({e.strerror or first_line(e)}); the last checkpoint saved is kept") from None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        report_outputs(run_dir, trainer, metrics)
    return metrics


def pretrain(cfg: DictConfig) -> dict[str, float]:
    """Self-supervised pretraining; returns the last logged metrics."""
    return fit(cfg, cfg.objective)


def finetune(cfg: DictConfig) -> dict[str, float]:
    """Supervised (optionally semi-supervised) fine-tuning of encoder + head; returns the last metrics."""
    return fit(cfg, cfg.module)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Predict a labeled region with a fine-tuned checkpoint and score it (JSON + CSV report)."""
    from emfm.evaluation.evaluate import evaluate as run_evaluation

    return run_evaluation(cfg)


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Blockwise prediction of a volume into OME-Zarr (resumable; local or on Dask)."""
    from emfm.predict.predict import predict as run_prediction

    return run_prediction(cfg)


def features(cfg: DictConfig) -> dict[str, Any]:
    """An encoder's dense features over a volume into a zarr store (resumable; local or on Dask)."""
    from emfm.explore.features import features as run_features

    return run_features(cfg)


def cluster(cfg: DictConfig) -> dict[str, Any]:
    """Cluster dense features into a map on the raw grid; score it against labels when given."""
    from emfm.explore.cluster import cluster as run_cluster

    return run_cluster(cfg)


def classify(cfg: DictConfig) -> dict[str, Any]:
    """A pixel classifier on features of a few labelled slices, predicted over a volume (resumable)."""
    from emfm.explore.classify import classify as run_classify

    return run_classify(cfg)


def refuse_used_run_dir(run_dir: Path) -> None:
    """A new run never starts beside another: it would replace the older run's checkpoints and mix its
    metrics into the older run's. A folder without a checkpoint holds no run (see set_aside_failed_start)."""
    found = next(iter(sorted(run_dir.glob("checkpoints/*.ckpt"))), None)
    if found is not None:
        raise EmfmError(f"hydra.run.dir={run_dir} already holds a run ({found.relative_to(run_dir)}); continue it "
                        f"with resume=auto, or start a new run in another hydra.run.dir")


# What a training run writes besides its checkpoints and log file: its config, loggers and pictures.
RUN_RECORDS = (".hydra", "csv", "tensorboard", "wandb", "reconstructions", "predictions")


@rank_zero_only
def set_aside_failed_start(run_dir: Path) -> None:
    """Move what an earlier start in ``run_dir`` recorded into ``run_dir/failed-N`` when it saved no checkpoint
    (it failed or was killed first): there is no run to continue, and a new run's metrics, events and pictures
    must not be mixed into those of the failed start, which stay there to be read."""
    records = [run_dir / name for name in RUN_RECORDS if (run_dir / name).exists()]
    if not records:
        return
    number = 1
    while (aside := run_dir / f"failed-{number}").exists():
        number += 1
    aside.mkdir()
    for path in records:
        path.rename(aside / path.name)
    log.info("%s: an earlier start here saved no checkpoint; its records moved to %s", run_dir, aside)


@rank_zero_only
def record_config(cfg: DictConfig, run_dir: Path) -> None:
    """Write ``.hydra/`` (config, Hydra config, overrides) as Hydra does, once the run's inputs are checked.

    The training configs turn Hydra's own write off (it comes before any check), so a refused
    command (a rerun, a resume of another model) leaves the config of the run in ``run_dir`` as it was.
    """
    if not HydraConfig.initialized():       # called from Python, not through the ``emfm`` command
        return
    hydra = HydraConfig.get()
    folder = run_dir / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    files = {"config.yaml": cfg, "hydra.yaml": {"hydra": hydra}, "overrides.yaml": hydra.overrides.task}
    for name, node in files.items():
        (folder / name).write_text(OmegaConf.to_yaml(node))


def resume_checkpoint(resume: str | None, run_dir: Path, module: pl.LightningModule) -> str | None:
    """The checkpoint ``resume=`` asks for, checked to fit the run.

    ``auto``: this run directory's last.ckpt if there is one, else none (a new run starts), so one
    command serves a first launch and every requeue of a job. A path must hold a checkpoint.
    """
    if not resume:
        return None
    path = run_dir / "checkpoints" / "last.ckpt" if resume == "auto" else Path(resume)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if resume == "auto" and not path.is_file():
        log.info("resume=auto: no checkpoint at %s yet; starting the run", path)
        return None
    if not path.is_file():
        raise EmfmError(
            f"resume={resume}: no checkpoint at {path}; give a run directory or a .ckpt, or resume=auto "
            f"to continue the run in hydra.run.dir"
        )
    hparams = hyper_parameters(read_checkpoint(path, "resume"), f"resume={path}")
    for key in ("encoder", "methods", "head", "target"):  # what fixes the architecture
        if key in module.hparams and hparams.get(key) != module.hparams[key]:
            raise EmfmError(
                f"resume={resume}: {path} was trained with {key} {hparams.get(key)}, "
                f"but this run builds {module.hparams[key]}"
            )
    return str(path)


def report_outputs(run_dir: Path, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Tell the user (and the run's log file) where the results are, and the last metrics."""
    lines = [f"run dir:         {run_dir}"]
    checkpoint = trainer.checkpoint_callback
    if isinstance(checkpoint, ModelCheckpoint) and checkpoint.best_model_path:
        lines.append(f"best checkpoint: {checkpoint.best_model_path}")
    last = next((c.path for c in trainer.checkpoint_callbacks if isinstance(c, LastCheckpoint)), None)
    if last is not None and last.is_file():
        lines.append(f"last checkpoint: {last}")
    for pattern, label in [("reconstructions", "reconstructions"), ("csv/metrics.csv", "metrics")]:
        if (run_dir / pattern).exists():
            lines.append(f"{label + ':':<17}{run_dir / pattern}")
    lines.append(f"{'last metrics:':<17}" + ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())))
    for line in lines:
        log.info(line)
