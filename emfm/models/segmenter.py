"""A fine-tuned segmentation network as inference runs it: encoder + head, its target and activation, and the
sliding window over a whole region.

``emfm predict``, ``emfm evaluate`` and ``emfm export`` run a :class:`Segmenter` (loaded by
:func:`emfm.checkpoints.load_segmenter`); fine-tuning trains the same network, built and run by the
same functions, so what validation measures is what inference computes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from emfm.data.targets import IGNORE, Target, make_target
from emfm.inference import sliding_window
from emfm.models.encoders import create_encoder
from emfm.models.heads import SegmentationModel, create_head


def segmentation_network(encoder: Mapping[str, Any], head: Mapping[str, Any],
                         target: Mapping[str, Any]) -> tuple[SegmentationModel, Target]:
    """The network of a ``model``, ``head`` and ``target`` config (random weights), and its target."""
    settings = dict(target)
    made = make_target(settings.pop("kind"), ignore_label=IGNORE, **settings)
    net = create_encoder(**encoder)
    return SegmentationModel(net, create_head(encoder=net, out_channels=made.channels, **head)), made


def activate(logits: torch.Tensor, target: Target) -> torch.Tensor:
    """Probabilities: softmax over classes, or a sigmoid per channel."""
    return logits.softmax(1) if target.loss == "softmax" else logits.sigmoid()


@torch.no_grad()
def predict_region(model: SegmentationModel, target: Target, image: torch.Tensor, overlap: float) -> torch.Tensor:
    """Probabilities (K, *spatial) over a whole slice (1, Y, X) or block (1, Z, Y, X), tiled by the encoder's input
    shape."""
    return sliding_window(lambda x: activate(model(x), target), image, model.encoder.input_shape, overlap)


class Predicts:
    """What inference asks of a network with its target: shared by :class:`Segmenter` and the fine-tuning module."""

    model: SegmentationModel
    target: Target
    hparams: Any                    # "overlap": the sliding window's tile overlap

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities: softmax over classes, or a sigmoid per channel."""
        return activate(logits, self.target)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The tile of ``predict_region``: the encoder's input shape."""
        return self.model.encoder.input_shape

    def predict_region(self, image: torch.Tensor, overlap: float | None = None) -> torch.Tensor:
        """Probabilities (K, *spatial) over a whole slice (1, Y, X) or block (1, Z, Y, X)."""
        return predict_region(self.model, self.target, image, self.hparams["overlap"] if overlap is None else overlap)


class Segmenter(Predicts, torch.nn.Module):
    """A fine-tuned network with its activation: images (N, C, *spatial) -> probabilities (N, K, *spatial).

    What ``emfm export`` traces into a bioimage.io package, and the architecture its state dict
    names: bioimage.io tools rebuild it from the three configs kept in the package.

    Args:
        encoder, head, target: the ``model``, ``head`` and ``target`` configs of the fine-tuning run.
        overlap: tile overlap of ``predict_region``'s sliding window.
    """

    def __init__(self, encoder: Mapping[str, Any], head: Mapping[str, Any], target: Mapping[str, Any],
                 overlap: float = 0.25) -> None:
        super().__init__()
        self.hparams = {"encoder": dict(encoder), "head": dict(head), "target": dict(target),
                                        "overlap": overlap}
        self.model, self.target = segmentation_network(encoder, head, target)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.model(x))



def overlap_counts(probs: torch.Tensor, truth: torch.Tensor, kind: str) -> torch.Tensor:
    """(3, C) intersection, predicted and true pixel counts per foreground class/channel, known pixels only: what
    fine-tuning's validation and ``emfm evaluate`` compute IoU and Dice from.

    ``probs`` (K, *spatial) probabilities and ``truth`` the target of the same region: a class map
    for softmax (classes 1..K-1 counted), per-channel 0/1 maps for sigmoid (threshold 0.5).
    """
    if kind == "softmax":
        pred, known = probs.argmax(0), truth != IGNORE
        classes = torch.arange(1, probs.shape[0], device=probs.device).view(-1, *[1] * truth.ndim)
        pred, truth, known = pred[None] == classes, truth[None] == classes, known[None]
    else:
        pred, known, truth = probs > 0.5, truth != IGNORE, truth == 1
    pred, truth = pred & known, truth & known
    dims = tuple(range(1, pred.ndim))
    return torch.stack([(pred & truth).sum(dims), pred.sum(dims), truth.sum(dims)]).double()
