"""Semi-supervised fine-tuning: also learn from unlabeled patches of the volume.

Both methods compare two pixel-aligned views of the same unlabeled patch: the plain patch (weak)
and a photometrically perturbed copy (strong: contrast, noise, blur). No geometric change, so a
prediction on one view is a target for the other pixel for pixel.

- ``mean_teacher`` (Tarvainen & Valpola, 2017): an exponential moving average of the model (the
  teacher) predicts the weak view; the model's prediction of the strong view is pulled to it (MSE).
- ``fixmatch`` (Sohn et al., 2020): the model's own confident predictions of the weak view become
  hard pseudo-labels for the strong view; unconfident pixels are ignored.

``restore`` is different: it keeps whole-network restoration (``objective=restore``) going on the
unlabeled patches, through the segmentation decoder and an output layer of its own, as DenoiSeg
(Buchholz et al., 2020) keeps denoising while it learns to segment.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from emfm.data.augment import Augment
from emfm.data.targets import IGNORE
from emfm.errors import EmfmError
from emfm.finetune.losses import SegmentationLoss
from emfm.models.heads import SegmentationModel
from emfm.models.layers import conv_nd
from emfm.restoration import Corruption, restoration_loss

# The strong view: what a segmentation should not depend on.
STRONG = {"intensity": {"p": 1.0, "brightness": [-0.15, 0.15], "contrast": [0.6, 1.5], "gamma": [0.7, 1.4]},
          "noise": {"p": 0.5, "std": [0.0, 0.1]}, "blur": {"p": 0.5, "sigma": [0.3, 1.5]}}


class SemiSupervised(nn.Module):
    """Base: ``forward(model, images, loss, kind) -> {"loss", ...}`` on an unlabeled batch.

    Args:
        spatial_dims: 2 or 3.
        weight: weight of this loss next to the supervised one (ramped up linearly over ``rampup_steps``).
        rampup_steps: steps to reach ``weight``: early predictions are poor targets.
        strong: :class:`~emfm.data.augment.Augment` settings of the strong view.
        isotropic: whether blur may act across z.
    """

    def __init__(self, spatial_dims: int, weight: float = 1.0, rampup_steps: int = 100,
                 strong: Mapping[str, Any] | None = None, isotropic: bool = False) -> None:
        super().__init__()
        self.weight, self.rampup_steps = float(weight), int(rampup_steps)
        self.strong = Augment(spatial_dims, isotropic, **(STRONG if strong is None else strong))

    def ramp(self, step: int) -> float:
        return self.weight * min(1.0, (step + 1) / max(1, self.rampup_steps))

    def before_step(self, model: SegmentationModel) -> None:
        """Called before every training step (the teacher's update)."""

    def forward(self, model: SegmentationModel, images: torch.Tensor, loss: SegmentationLoss,
                activate: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class MeanTeacher(SemiSupervised):
    """Consistency with an EMA teacher. ``momentum``: teacher = m * teacher + (1 - m) * model."""

    def __init__(self, spatial_dims: int, model: SegmentationModel, momentum: float = 0.99, **kwargs: Any) -> None:
        super().__init__(spatial_dims, **kwargs)
        self.momentum = float(momentum)
        self.teacher = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def before_step(self, model: SegmentationModel) -> None:
        for t, s in zip(self.teacher.parameters(), model.parameters()):
            t.lerp_(s.detach(), 1 - self.momentum)
        for mine, theirs in zip(self.teacher.buffers(), model.buffers()):
            mine.copy_(theirs)

    def forward(self, model: SegmentationModel, images: torch.Tensor, loss: SegmentationLoss,
                activate: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            self.teacher.train(model.training)
            target = activate(self.teacher(images))
        prediction = activate(model(self.strong(images)))
        return {"loss": F.mse_loss(prediction, target)}


class FixMatch(SemiSupervised):
    """Pseudo-labels where the model is at least ``threshold`` sure (either way for sigmoid outputs)."""

    def __init__(self, spatial_dims: int, model: SegmentationModel, threshold: float = 0.9, **kwargs: Any) -> None:
        super().__init__(spatial_dims, **kwargs)
        if not 0.5 <= threshold < 1:
            raise EmfmError(f"semi.threshold={threshold}: expected a confidence in [0.5, 1)")
        self.threshold = float(threshold)

    def forward(self, model: SegmentationModel, images: torch.Tensor, loss: SegmentationLoss,
                activate: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            probs = activate(model(images))
            if loss.kind == "softmax":
                confidence, pseudo = probs.max(1)
                pseudo = pseudo.masked_fill(confidence < self.threshold, IGNORE)
                confident = confidence >= self.threshold
            else:
                confident = (probs >= self.threshold) | (probs <= 1 - self.threshold)
                pseudo = torch.where(confident, (probs > 0.5).float(), float(IGNORE))
        out = loss(model(self.strong(images)), pseudo)
        return {"loss": out["loss"], "confident": confident.float().mean()}


class Restoration(SemiSupervised):
    """Restore corrupted unlabeled patches through the segmentation network's own decoder.

    Args:
        model: the segmentation model; its head must have a decoder (``decode``).
        **kwargs: :class:`~emfm.pretrain.restore.Corruption` settings and the base's options.
    """

    def __init__(self, spatial_dims: int, model: SegmentationModel, weight: float = 1.0, rampup_steps: int = 0,
                 isotropic: bool = False, **corruption: Any) -> None:
        super().__init__(spatial_dims, weight, rampup_steps, isotropic=isotropic)
        if not hasattr(model.head, "width"):
            raise EmfmError("semi=restore needs a decoder head (unet or unetr), not head.name=linear")
        self.corruption = Corruption(model.encoder.input_shape, key="semi", **corruption)
        self.out = conv_nd(spatial_dims, model.head.width, model.encoder.in_chans, 1)

    def forward(self, model: SegmentationModel, images: torch.Tensor, loss: SegmentationLoss,
                activate: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
        corrupted, weight = self.corruption(images, None)
        restored = self.out(model.head.decode(corrupted, model.encoder.forward_features(corrupted)))
        return {"loss": restoration_loss(restored, images, weight)}


SEMI: dict[str, Callable[..., SemiSupervised]] = {"mean_teacher": MeanTeacher, "fixmatch": FixMatch,
                                                  "restore": Restoration}


def create_semi(name: str, spatial_dims: int, model: SegmentationModel, isotropic: bool = False,
                **options: Any) -> SemiSupervised:
    """The method ``semi=<name>`` with its options; unknown names and options are one-line errors."""
    if name not in SEMI:
        raise EmfmError(f"semi={name!r} is unknown; expected one of {sorted(SEMI)} or none")
    try:
        return SEMI[name](spatial_dims, model=model, isotropic=isotropic, **options)
    except TypeError as err:
        raise EmfmError(f"semi.{name}: {err}") from None
