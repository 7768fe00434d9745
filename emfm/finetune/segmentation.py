"""Fine-tuning an encoder with a segmentation head on a few labeled slices.

The encoder starts from an emfm checkpoint, an exported encoder, or scratch; the head and target
come from config. The network, its activation and its sliding window are those inference runs
(:mod:`emfm.models.segmenter`): validation predicts whole held-out slices as ``emfm evaluate`` does
and logs IoU / Dice, so the best checkpoint is the best segmenter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from timm.layers import resample_abs_pos_embed

from emfm.checkpoints import PretrainedHead, fill, read_init
from emfm.data.augment import Augment
from emfm.data.labeled import LabeledDataModule
from emfm.data.targets import IGNORE
from emfm.errors import EmfmError
from emfm.finetune.losses import SegmentationLoss
from emfm.finetune.semi import create_semi
from emfm.models.encoders import Encoder, ViTEncoder
from emfm.models.heads import SegmentationModel, head_settings
from emfm.models.public import PublicWeights, fit_timm
from emfm.models.segmenter import Predicts, overlap_counts, segmentation_network
from emfm.training import adamw_warmup_cosine, compiled, param_groups

# Settings that must agree between a pretrained encoder and the one fine-tuned (the input shape may differ).
ARCHITECTURE = ("family", "name", "patch_size", "in_chans", "channels", "blocks", "strides", "stem_stride", "depth")


def load_pretrained(model: SegmentationModel, config: Mapping[str, Any], head: Mapping[str, Any], init: str,
                    decoder: bool = True) -> None:
    """Copy the weights of ``init`` into ``model`` after checking they are the same architecture.

    The encoder always; the decoder too when ``init`` has one and ``decoder`` is true, all but its output layer,
    which belongs to the pretraining task (or another target) and starts fresh. A public encoder's file
    (:mod:`emfm.models.public`) fills the run's timm model.
    """
    network, public = read_init(init)
    encoder = model.encoder
    if public is not None:
        target, where = public_target(encoder, config, public, init), f"init={init} ({public.layout})"
        weights = fit_timm(target, public.weights, where)
    else:
        assert network is not None
        check_architecture(network.encoder, config, init)
        target, weights, where = encoder, network.weights, f"init={init}"
    own = target.state_dict()
    for key, value in weights.items():  # learned 2-D positions follow another patch shape
        if isinstance(encoder, ViTEncoder) and key.endswith("pos_embed") and key in own \
                and value.shape != own[key].shape:
            weights[key] = resample_abs_pos_embed(value, list(encoder.grid_size),
                                                  num_prefix_tokens=encoder.num_prefix_tokens)
    fill(target, weights, where)
    if decoder and network is not None and network.head is not None:
        load_decoder(model, network.head, head, init)


def check_architecture(source: Mapping[str, Any], config: Mapping[str, Any], init: str) -> None:
    """An emfm encoder is refused unless built as this run's (the input shape may differ)."""
    for key in ARCHITECTURE:
        if source.get(key) != config.get(key):
            raise EmfmError(f"init={init}: encoder has {key}={source.get(key)!r} but this run builds "
                            f"model.{key}={config.get(key)!r}; use the same model settings as in pretraining")


def public_target(encoder: Encoder, config: Mapping[str, Any], public: PublicWeights, init: str) -> torch.nn.Module:
    """The timm model a public file fills: a 2-D timm encoder, of the family its layout fits."""
    model = encoder.timm_model
    if model is None or public.family not in (None, config.get("family")):
        wanted = public.family or "vit2d or model=cnn2d"
        raise EmfmError(f"init={init}: a {public.layout}; it loads into model={wanted} (a timm model), but this run "
                        f"builds model.family={config.get('family')!r}")
    return model


def load_decoder(model: SegmentationModel, decoder: PretrainedHead, head: Mapping[str, Any], init: str) -> None:
    """A pretrained decoder's weights, all but its output layer, after checking it is this run's head."""
    theirs, ours = head_settings(decoder.config, model.encoder), head_settings(head, model.encoder)
    if theirs != ours:
        raise EmfmError(f"init={init}: its decoder is head {theirs} but this run builds head {ours}; "
                        f"use the same head settings as in pretraining")
    kept = {k: v for k, v in decoder.weights.items() if not k.startswith("out.")}
    missing, unexpected = model.head.load_state_dict(kept, strict=False)
    if unexpected or any(not k.startswith("out.") for k in missing):
        raise EmfmError(f"init={init}: decoder weights do not fit head {ours} "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


class SegmentationModule(Predicts, pl.LightningModule):
    """Encoder + head trained on labeled patches (and, with ``semi``, unlabeled ones).

    Args:
        encoder: a ``model`` config.
        head: a ``head`` config (``name`` and its options).
        target: a ``target`` config (``kind`` and its options).
        loss: :class:`~emfm.finetune.losses.SegmentationLoss` options (weights of Dice and CE, class weights).
        semi: a ``semi`` config (``name`` null = supervised only).
        init: ``scratch``, an emfm checkpoint or an ``emfm export`` directory.
        init_decoder: take ``init``'s decoder too, when it has one (false: its encoder only; the decoder starts
            fresh, without what pretraining taught it).
        augment: :class:`~emfm.data.augment.Augment` settings (geometry applies to labels too).
        isotropic: 3-D voxels are cubic (set from the data).
        lr, weight_decay, betas, warmup_steps, min_lr_ratio: AdamW with warmup + cosine.
        layer_decay: learning rate of encoder depth group g of G is ``lr * encoder_lr_ratio * layer_decay ** (G - g)``.
        encoder_lr_ratio: the encoder's learning rate relative to the head's (below 1 keeps pretrained
            features closer to where pretraining left them).
        freeze_encoder_steps: the encoder learns nothing for this many steps (the head settles first).
        freeze_decoder_steps: nor does the decoder (the head but its output layer); with the encoder
            frozen as long, the first steps are a linear probe of the pretrained network (LP-FT).
        overlap: tile overlap of the validation sliding window.
    """

    def __init__(
        self,
        encoder: Mapping[str, Any],
        head: Mapping[str, Any],
        target: Mapping[str, Any],
        loss: Mapping[str, Any] | None = None,
        semi: Mapping[str, Any] | None = None,
        init: str = "scratch",
        init_decoder: bool = True,
        augment: Mapping[str, Any] | None = None,
        isotropic: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: Sequence[float] = (0.9, 0.999),
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.01,
        layer_decay: float = 0.75,
        encoder_lr_ratio: float = 1.0,
        freeze_encoder_steps: int = 0,
        freeze_decoder_steps: int = 0,
        overlap: float = 0.25,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model, self.target = segmentation_network(encoder, head, target)
        net = self.model.encoder
        if str(init) != "scratch":
            load_pretrained(self.model, encoder, head, str(init), init_decoder)
        self.loss = SegmentationLoss(self.target.loss, ignore_index=IGNORE, **(loss or {}))
        self.augment = Augment(net.spatial_dims, isotropic, **(augment or {}))
        semi = dict(semi or {})
        name = semi.pop("name", None)
        semi.pop("unlabeled_batch_size", None)  # read by the data module
        self.semi = create_semi(name, net.spatial_dims, self.model, isotropic, **semi) if name else None
        self.val_counts: list[torch.Tensor] = []
        self.compiled_loss: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]] | None = None

    def compile_training(self) -> None:
        """Compute the supervised loss of training steps (network and loss) through torch.compile
        (``trainer.compile=true``). Augmentation, targets, the semi-supervised term and validation's sliding window
        stay eager. The weights and their names stay the module's own, so checkpoints are those of an uncompiled
        run."""
        self.compiled_loss = compiled(self.supervised_loss)

    def supervised_loss(self, images: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss of the network's output on ``images`` against ``target``, with its parts."""
        return self.loss(self.model(images), target)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)   # set by Trainer.fit
        if isinstance(datamodule, LabeledDataModule):
            self.target.check_values(datamodule.label_values(), str(datamodule.label_path))

    def on_train_batch_start(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        if self.semi is not None:
            self.semi.before_step(self.model)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = self.augment(batch["image"], labels=batch["labels"])
        out = (self.compiled_loss or self.supervised_loss)(images, self.target(labels[:, 0]))
        total = out["loss"]
        logs = {f"train/{k}": v for k, v in out.items() if k != "loss"}
        if self.semi is not None:
            if "unlabeled" not in batch:
                raise EmfmError("semi-supervised training needs unlabeled patches: set data.unlabeled_batch_size > 0")
            extra = self.semi(self.model, batch["unlabeled"], self.loss, self.activate)
            total = total + self.semi.ramp(self.global_step) * extra["loss"]
            logs.update({f"train/semi/{k}": v for k, v in extra.items()})
        self.log("train/loss", total, prog_bar=True)
        self.log_dict(logs)
        return total

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        probs = self.predict_region(batch["image"])
        truth = self.target(batch["labels"])[0]
        self.val_counts.append(overlap_counts(probs, truth, self.target.loss))
        return probs

    def on_validation_epoch_end(self) -> None:
        if not self.val_counts:
            return
        counts = self.trainer.strategy.reduce(torch.stack(self.val_counts).sum(0), reduce_op="sum")
        self.val_counts.clear()
        inter, pred, true = counts
        iou = inter / (pred + true - inter).clamp(min=1)
        dice = 2 * inter / (pred + true).clamp(min=1)
        self.log_dict({"val/iou": iou.mean().float(), "val/dice": dice.mean().float()}, prog_bar=True)
        if len(iou) > 1:
            self.log_dict({f"val/iou_{c + 1}": v.float() for c, v in enumerate(iou)})

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        hp = self.hparams
        groups = self.model.encoder.layer_groups()
        names = dict(self.model.encoder.named_parameters())
        param_list = []
        for depth, group in enumerate(groups):
            scale = hp["encoder_lr_ratio"] * hp["layer_decay"] ** (len(groups) - depth)
            param_list += param_groups(((n, names[n]) for n in group), hp["weight_decay"], scale,
                                       hp["freeze_encoder_steps"])
        head = self.model.head
        is_output = {n: n.startswith("out.") or not hasattr(head, "out") for n, _ in head.named_parameters()}
        param_list += param_groups(((n, p) for n, p in head.named_parameters() if not is_output[n]),
                                   hp["weight_decay"], frozen_steps=hp["freeze_decoder_steps"])
        param_list += param_groups(((n, p) for n, p in head.named_parameters() if is_output[n]), hp["weight_decay"])
        if self.semi is not None:  # its own layers (a teacher has no trainable parameters)
            param_list += param_groups(self.semi.named_parameters(), hp["weight_decay"])
        return adamw_warmup_cosine(param_list, self.trainer.max_steps, hp["lr"], hp["betas"], hp["warmup_steps"],
                                   hp["min_lr_ratio"])

