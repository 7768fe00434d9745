"""Trainer pieces shared by every command: the optimiser and its schedule, atomic checkpoints (the latest
state and the best, kept when the run's folder moves), a clean stop on preemption or Ctrl-C, metrics
appended across resumes, the whole config given to every logger, a run stopped when its loss stops being
finite, the projected time of a CPU run, compiled training steps and channels-last convolutions."""

from __future__ import annotations

import csv
import glob
import io
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, ParamSpec, TypeVar

import lightning.pytorch as pl
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import nn

from emfm.errors import EmfmError
from emfm.paths import alive


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write a checkpoint next to its final path and rename it into place.

    A job killed while saving leaves the previous checkpoint intact, never a truncated one
    (fsspec's transaction writes through the system temp dir, which may be another filesystem).
    Remote paths (``s3://`` ...) keep Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        clear_stale_partials(path)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            with partial.open("wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as err:      # a full disk, a second Ctrl-C: the half-written file goes
            partial.unlink(missing_ok=True)
            if cause := os_error(err):      # torch reports a failed write as a RuntimeError around it
                raise OSError(cause.errno, cause.strerror, str(path)) from err
            raise
        os.replace(partial, path)


def clear_stale_partials(path: Path) -> None:
    """Remove the half-written copies of ``path`` whose writer is gone (killed with -9 while saving)."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.partial"):
        pid = stale.name[len(path.name) + 2:-len(".partial")]
        if pid.isdigit() and not alive(int(pid)):
            stale.unlink(missing_ok=True)


def os_error(err: BaseException) -> OSError | None:
    """The OSError behind ``err`` (itself, or in the chain of exceptions it was raised from or during), if any."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OSError):
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (``best-*.ckpt``), continued wherever the run's folder has been moved.

    Its state records its files by the folder they were written in; Lightning ignores the record of
    another folder, so a moved run would keep its old best file beside new ones and compare against
    no earlier score. Here the record moves with the folder.
    """

    @property
    def state_key(self) -> str:
        """ModelCheckpoint's key: the record saved by it (runs begun before this class) is this class's own."""
        return ModelCheckpoint.__qualname__ + super().state_key.removeprefix(type(self).__qualname__)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved, here = state_dict.get("dirpath"), self.dirpath
        if saved and here and saved != here:
            def moved(path: str) -> str:
                return str(Path(here, Path(path).name)) if path and Path(path).parent == Path(saved) else path

            keys = [key for key in ("best_model_path", "kth_best_model_path", "last_model_path") if key in state_dict]
            best = {moved(path): score for path, score in state_dict.get("best_k_models", {}).items()}
            state_dict = {**state_dict, **{key: moved(state_dict[key]) for key in keys}, "best_k_models": best,
                          "dirpath": here}
        super().load_state_dict(state_dict)


class LastCheckpoint(Checkpoint):
    """``last.ckpt``, the run's latest state, which ``resume=auto`` continues from.

    Saved every ``every_n_steps`` steps, after every validation (once the best checkpoint is chosen,
    so its record in ``last.ckpt`` is current), at the end, and when SIGTERM (SLURM preemption,
    ``scancel``) or Ctrl-C stops the run, whether or not the monitored metric improved. Lightning
    stops a run on SIGTERM after the current step, on every rank at once; a first Ctrl-C takes that
    path, a second one aborts at once and saves nothing (the weights may be half updated). A
    Lightning ``Checkpoint``, so it runs after ModelCheckpoint.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int, filename: str = "last.ckpt") -> None:
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
            raise EmfmError(f"callbacks.last_checkpoint.every_n_steps={every_n_steps}: expected a whole number of "
                            f"at least 1")
        self.path, self.every_n_steps = Path(dirpath) / filename, every_n_steps
        self.saved_step = -1
        self.stopped_by = "SIGTERM"
        self.catching_ctrl_c = False

    def save(self, trainer: pl.Trainer) -> None:
        if not getattr(trainer, "fast_dev_run", False):       # a smoke run (debug=fdr) leaves no checkpoint
            trainer.save_checkpoint(self.path, weights_only=False)
            self.saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        due = step % self.every_n_steps == 0 or step == trainer.max_steps       # the last step: the end
        if due and step != self.saved_step:       # once a step under gradient accumulation
            self.save(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A run that ended before trainer.max_steps (trainer.max_epochs). At max_steps the save at the step's end
        # comes first: Lightning resumes from there exactly, while from here it would log the next steps one on.
        if trainer.global_step != self.saved_step:
            self.save(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning's SIGTERM handler is in place by now (not on Windows); an ignored SIGINT stays ignored.
        if (threading.current_thread() is threading.main_thread() and callable(signal.getsignal(signal.SIGTERM))
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            signal.signal(signal.SIGINT, self.on_ctrl_c)
            self.catching_ctrl_c = True

    def on_ctrl_c(self, signum: int, frame: FrameType | None) -> None:
        """A first Ctrl-C stops the run as SIGTERM does; the next raises KeyboardInterrupt at once."""
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.stopped_by = "Ctrl-C"
        rank_zero_info("Ctrl-C: stopping as on SIGTERM, after this step and with last.ckpt saved (Ctrl-C again "
                       "aborts at once, saving nothing)")
        signal.raise_signal(signal.SIGTERM)

    def release_ctrl_c(self) -> None:
        if self.catching_ctrl_c:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self.catching_ctrl_c = False

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.release_ctrl_c()
        if isinstance(exception, SIGTERMException):
            self.save(trainer)
            rank_zero_info(f"{self.stopped_by} at step {trainer.global_step}: saved {self.path}; continue with "
                           f"resume=auto")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.release_ctrl_c()


class StopOnNonFinite(pl.Callback):
    """Stop a run whose loss or gradients are no longer finite, before the optimiser writes them into the weights.

    The error names the step. Nothing is saved after it (Lightning's ModelCheckpoint does not save
    on exceptions, :class:`LastCheckpoint` only on SIGTERM or Ctrl-C), so ``last.ckpt`` keeps the last good
    weights. Every rank takes the same decision, so a DDP run stops as a whole.
    """

    def __init__(self) -> None:
        self.loss: torch.Tensor | None = None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self.loss = loss.detach()
        self._stop_if(trainer, ~torch.isfinite(self.loss).all(), "train/loss")

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return      # float16: the GradScaler skips steps whose gradients overflow, by design
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:   # NaN and Inf carry through a sum: one read of each gradient, 15x cheaper than isfinite(g).all()
            sums = torch.stack([g.sum(dtype=torch.float32) for g in grads])   # (44 -> 3 ms a ViT-S/16 step on a CPU)
            suspects = [g for g, finite in zip(grads, torch.isfinite(sums).tolist()) if not finite]
            bad = any(not torch.isfinite(g).all() for g in suspects)           # not a finite sum's overflow
            self._stop_if(trainer, torch.tensor(bad), "a gradient")

    def _stop_if(self, trainer: pl.Trainer, bad: torch.Tensor, what: str) -> None:
        if trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            loss = float(self.loss) if self.loss is not None else float("nan")
            raise EmfmError(f"{what} is not finite at step {trainer.global_step} (train/loss {loss:.4g}); stopped "
                            f"before the weights took it, nothing saved: lower the learning rate or check the data")


# Patch and batch sizes of the CPU runs in docs/benchmarks.md (the restore_unet recipe; the 3-D objective checks).
CPU_SIZED = {2: "data.patch_shape=[128,128] data.batch_size=8", 3: "data.patch_shape=[8,64,64] data.batch_size=4"}


class ProjectedTime(pl.Callback):
    """On a CPU, say after the first steps how long the run will take, and how to make it CPU-sized.

    GPU-sized settings (3-D patches, large batches) can take minutes a step on a CPU before the
    progress bar moves; a user should learn that after seconds, not after the night. The first step
    (start-up, first batches) is not timed.
    """

    def __init__(self, after_steps: int = 10, hint_over_hours: float = 1.0) -> None:
        self.after_steps, self.hint_over = after_steps, hint_over_hours * 3600
        self.start: tuple[float, int] | None = None
        self.said = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.said or trainer.strategy.root_device.type != "cpu" or trainer.max_steps < 0:
            return
        now, step = time.perf_counter(), trainer.global_step
        if self.start is None:
            self.start = (now, step)
            return
        timed = step - self.start[1]
        if timed < self.after_steps:
            return
        self.said = True
        per_step, left = (now - self.start[0]) / timed, trainer.max_steps - step
        message = (f"on a CPU: {per_step:.2f} s/step (steps {self.start[1] + 1}-{step}); the {left} steps left of "
                   f"trainer.max_steps={trainer.max_steps} take about {duration(left * per_step)}")
        dims = len(getattr(getattr(trainer, "datamodule", None), "patch_shape", ()))
        if left * per_step > self.hint_over and dims in CPU_SIZED:
            message += f"; for a CPU-sized run: {CPU_SIZED[dims]} (or fewer trainer.max_steps)"
        rank_zero_info(message)


def duration(seconds: float) -> str:
    """``42 s``, ``17 min``, ``3.5 h`` or ``2.1 days``: as precise as a projection deserves."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}" if unit != "min" else f"{seconds / size:.0f} min"
    return f"{seconds:.0f} s"


class LogConfig(pl.Callback):
    """Give every logger the whole composed config, not only the module's hyperparameters (Lightning's own
    call), so runs are compared and filtered in CSV, TensorBoard or W&B by any setting (``data.patch_shape``)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:      # loggers write on rank 0 only
            return
        for logger in trainer.loggers:
            logger.log_hyperparams(self.config)
            if isinstance(logger, TensorBoardLogger):   # its HParams view needs a session, which Lightning
                from torch.utils.tensorboard.summary import hparams  # writes only with a metric (not at start-up)

                for summary in hparams(flatten(self.config), {}):
                    logger.experiment._get_file_writer().add_summary(summary)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"data": {"patch_shape": [64, 64]}}`` -> ``{"data/patch_shape": "[64, 64]"}``: TensorBoard's scalar types."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


class AppendingCSVLogger(CSVLogger):
    """Lightning's CSV logger, continuing the run's ``metrics.csv`` where Lightning would delete it.

    A resumed run appends to the rows written before the kill or preemption (the steps between the
    checkpoint and the kill appear twice: both runs took them); nothing a run logged is lost.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if not isinstance(self._experiment, AppendingWriter):
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class AppendingWriter(ExperimentWriter):
    """Appends to an existing ``metrics.csv``; a new metric key widens its header (the file is rewritten atomically)."""

    def _check_log_dir_exists(self) -> None:
        """Called by Lightning's ``__init__`` to delete an existing file: continue it instead."""
        if self._fs.isfile(self.metrics_file_path):
            self.metrics_keys, rows = self._read()
            self._write(self.metrics_keys, rows)     # drops a row a kill cut short: the next would join it

    def save(self) -> None:
        if not self.metrics:
            return
        keys = sorted(set(self.metrics_keys).union(*self.metrics))
        if keys != self.metrics_keys:
            self._write(keys, self._read()[1] if self._fs.isfile(self.metrics_file_path) else [])
            self.metrics_keys = keys
        with self._fs.open(self.metrics_file_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=keys).writerows(self.metrics)
        self.metrics = []

    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        """The file's header and its complete rows."""
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            text = f.read()
        reader = csv.DictReader(io.StringIO(text[: text.rfind("\n") + 1]))
        return list(reader.fieldnames or []), list(reader)

    def _write(self, keys: list[str], rows: list[dict[str, str]]) -> None:
        """Replace the file by a temporary one moved into place: a kill meanwhile leaves the old file."""
        partial = f"{self.metrics_file_path}.partial"
        with self._fs.open(partial, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        self._fs.mv(partial, self.metrics_file_path)


P = ParamSpec("P")
R = TypeVar("R")


def compiled(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` through ``torch.compile`` (inductor), for ``trainer.compile=true``.

    Random numbers are drawn by torch as without compiling (inductor's ``fallback_random``): a compiled run hides
    the same tokens and adds the same noise as the uncompiled run of that seed, and differs only by rounding.
    """
    return torch.compile(fn, options={"fallback_random": True})


def compiler_missing(on_gpu: bool) -> str | None:
    """Why torch.compile cannot build kernels here, or None: on a CPU inductor compiles C++ (``$CXX`` or g++)."""
    if on_gpu:
        return None
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        return "torch.compile builds C++ kernels on a CPU and found no C++ compiler (install g++, or set CXX)"
    return None


# The channels-last memory format of a convolution's weight by its rank: 2-D (N, Y, X, C), 3-D (N, Z, Y, X, C).
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
CONVOLUTIONS = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def to_channels_last(module: nn.Module) -> None:
    """Every convolution's weight in channels-last memory (``trainer.channels_last``), cuDNN's fast layout for tensor
    cores (on this project's CPU it was slower: :func:`emfm.run.choose_channels_last`).

    A convolution with a channels-last weight computes in that layout and hands its maps on in it, so batches stay as
    loaded (converting them too gained nothing, measured). Checkpoints keep the weights' strides and load into a
    module of either layout (``load_state_dict`` copies values).
    """
    for layer in module.modules():
        if isinstance(layer, CONVOLUTIONS):
            layer.to(memory_format=CHANNELS_LAST[layer.weight.ndim])


# Parameters that are positions/tokens rather than weights: AdamW must not decay them.
NO_WEIGHT_DECAY = ("pos_embed", "cls_token", "reg_token", "mask_token")


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float, lr_scale: float = 1.0,
                 frozen_steps: int = 0) -> list[dict[str, Any]]:
    """AdamW groups of trainable parameters: weights decayed, norms / biases / tokens not.

    ``lr_scale`` multiplies the base learning rate (layer-wise decay); ``frozen_steps`` holds the
    group at zero learning rate for that many steps, then warms it up (a frozen encoder that
    stays in the DDP graph).
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in named:
        if param.requires_grad:
            skip = param.ndim <= 1 or name.split(".")[-1] in NO_WEIGHT_DECAY
            (no_decay if skip else decay).append(param)
    return [{"params": params, "weight_decay": wd, "lr_scale": lr_scale, "frozen_steps": frozen_steps}
            for params, wd in ((decay, weight_decay), (no_decay, 0.0)) if params]


def warmup_cosine(step: int, *, warmup: int, total: int, floor: float, frozen: int = 0) -> float:
    """Learning-rate factor: 0 while frozen, linear warmup, then cosine decay to ``floor`` at ``total``."""
    if step < frozen:
        return 0.0
    if step < frozen + warmup:
        return (step - frozen + 1) / warmup
    progress = min(1.0, (step - frozen - warmup) / max(1, total - frozen - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def check_max_steps(max_steps: Any) -> int:
    """The run's length: the learning-rate schedule needs it (Lightning's -1, no limit, does not do)."""
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
        raise EmfmError(f"trainer.max_steps={max_steps}: expected a whole number of at least 1 (the learning-rate "
                        f"schedule needs the run's length)")
    return max_steps


def adamw_warmup_cosine(groups: list[dict[str, Any]], total: int | None, lr: float, betas: Sequence[float],
                        warmup_steps: int, min_lr_ratio: float) -> OptimizerLRSchedulerConfig:
    """Lightning's ``configure_optimizers`` answer: AdamW over ``groups``, stepped per optimiser step."""
    total = check_max_steps(total)
    factors: list[Callable[[int], float]] = []
    for group in groups:
        group["lr"] = lr * group.pop("lr_scale", 1.0)
        frozen = group.pop("frozen_steps", 0)
        factors.append(partial(warmup_cosine, warmup=min(warmup_steps, total), total=total, floor=min_lr_ratio,
                               frozen=frozen))
    beta1, beta2 = betas
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(beta1, beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
