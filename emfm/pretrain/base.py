"""What every pretraining method shares: the encoder, optimiser, schedule, logging and the method registry.

A method is an :class:`Objective` in its own file (``mae.py``, ``mim.py``, ``mocov3.py``,
``simclr.py``) registered under a name. :class:`PretrainModule` owns one encoder and sums the
weighted losses of the methods listed in ``methods``, so a hybrid objective is a config, not code.
Arguments are primitives: ``load_from_checkpoint`` rebuilds the module and checkpoints load with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import nn

from emfm.data.augment import Augment
from emfm.errors import EmfmError
from emfm.models.encoders import Encoder, ViTEncoder, create_encoder
from emfm.training import adamw_warmup_cosine, compiled, param_groups

METHODS: dict[str, type[Objective]] = {}


def register(name: str) -> Callable[[type[Objective]], type[Objective]]:
    """Class decorator: make a method available as ``objective.methods.<name>``."""

    def add(cls: type[Objective]) -> type[Objective]:
        METHODS[name] = cls
        return cls

    return add


EncoderT = TypeVar("EncoderT", bound=Encoder)


class Objective(nn.Module, Generic[EncoderT]):
    """One self-supervised loss on a shared encoder, of the kind ``EncoderT`` (checked when built).

    The encoder is passed to every call rather than stored, so it is owned (and saved) once by
    :class:`PretrainModule` however many methods use it.

    Args:
        encoder: the encoder this method will train (to size heads and check compatibility).
        augment: :class:`~emfm.data.augment.Augment` settings for this method's input.
        isotropic: whether the data allows 3-D rotations/crops across z.
    """

    def __init__(self, encoder: Encoder, augment: Mapping[str, Any] | None = None, isotropic: bool = False) -> None:
        super().__init__()
        self.augment = Augment(encoder.spatial_dims, isotropic, **(augment or {}))

    def forward(
        self, encoder: EncoderT, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Loss on a batch: a dict with ``loss`` and any other scalars worth logging."""
        raise NotImplementedError

    def visualize(self, encoder: EncoderT, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named image panels, each like ``images``, showing what the method does."""
        return {}

    def before_step(self, encoder: EncoderT, progress: float) -> None:
        """Called before each training step with the fraction of training done (momentum updates)."""


def masked_method_for(encoder: Encoder) -> str:
    """``masked`` in a hybrid config: token-dropping MAE for ViTs, input-masking MIM otherwise."""
    return "mae" if isinstance(encoder, ViTEncoder) else "mim"


class PretrainModule(pl.LightningModule):
    """The LightningModule of every self-supervised objective.

    Args:
        encoder: a ``model`` config (``family`` and that family's arguments).
        methods: ``{name: {weight: w, ...method arguments}}``; ``masked`` picks MAE or MIM to fit
            the encoder. The training loss is the weighted sum.
        isotropic: data allows 3-D rotations and crops across z (set from the volumes' voxel size).
        lr: peak learning rate after warmup.
        weight_decay: AdamW decay of weight matrices (norms, biases and tokens are not decayed).
        betas: AdamW betas.
        warmup_steps: linear warmup length in optimiser steps.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
    """

    def __init__(
        self,
        encoder: Mapping[str, Any],
        methods: Mapping[str, Mapping[str, Any]],
        isotropic: bool = False,
        lr: float = 1.5e-4,
        weight_decay: float = 0.05,
        betas: Sequence[float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.01,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = create_encoder(**encoder)
        if not methods:
            raise EmfmError("objective.methods is empty: name at least one method, e.g. {mae: {weight: 1}}")
        self.methods = nn.ModuleDict()
        self.weights: dict[str, float] = {}
        for name, settings in methods.items():
            settings = dict(settings or {})
            method = masked_method_for(self.encoder) if name == "masked" else name
            if method not in METHODS:
                raise EmfmError(f"objective.methods.{name}: unknown method; expected one of {sorted(METHODS)} "
                                f"or 'masked'")
            self.weights[method] = float(settings.pop("weight", 1.0))
            try:
                self.methods[method] = METHODS[method](self.encoder, isotropic=isotropic, **settings)
            except TypeError as err:  # a misspelt key: name it, with the method's arguments
                raise EmfmError(f"objective.methods.{name}: {err}") from None
        self.compiled_loss: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None

    def compile_training(self) -> None:
        """Compute the training steps' loss through torch.compile (``trainer.compile=true``): the encoder and every
        method's heads and loss. Augmentation stays eager (:class:`~emfm.data.augment.Augment`), and so do
        validation and pictures: infrequent, and compiling their graphs too would double the compile time. The
        weights and their names stay the module's own, so checkpoints are those of an uncompiled run."""
        self.compiled_loss = compiled(self.compute_loss)

    def objectives(self) -> list[tuple[str, Objective]]:
        """The methods by name (``self.methods`` registers them as submodules, untyped)."""
        return [(name, cast(Objective, method)) for name, method in self.methods.items()]

    def compute_loss(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Weighted sum of the methods' losses, plus each method's own scalars (``mae/loss``, ...)."""
        logs, total = {}, 0.0
        for name, method in self.objectives():
            out = method(self.encoder, images, generator)
            total = total + self.weights[name] * out["loss"]
            logs.update({f"{name}/{key}": value for key, value in out.items()})
        return {"loss": total, **logs}

    @torch.no_grad()
    def visualize(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every method's panels; names get a method prefix when there are several methods."""
        panels = {}
        for name, method in self.objectives():
            for key, value in method.visualize(self.encoder, images).items():
                panels[key if len(self.methods) == 1 else f"{name}/{key}"] = value
        return panels

    def on_train_batch_start(self, batch: torch.Tensor, batch_idx: int) -> None:
        progress = self.global_step / max(1, self.trainer.max_steps)
        for _, method in self.objectives():
            method.before_step(self.encoder, progress)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        out = (self.compiled_loss or self.compute_loss)(batch)
        self.log("train/loss", out["loss"], prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in out.items() if k != "loss"})
        return out["loss"]

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        # A fixed random stream per batch: the same patches get the same masks/views every time,
        # so val/loss is comparable across the run and picks the best checkpoint.
        generator = torch.Generator(device=batch.device).manual_seed(batch_idx)
        out = self.compute_loss(batch, generator=generator)
        self.log("val/loss", out["loss"], prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        hp = self.hparams
        return adamw_warmup_cosine(param_groups(self.named_parameters(), hp["weight_decay"]), self.trainer.max_steps,
                                   hp["lr"], hp["betas"], hp["warmup_steps"], hp["min_lr_ratio"])
