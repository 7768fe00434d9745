"""Dice + cross-entropy segmentation losses that skip unannotated pixels, with topology terms for thin structures.

Dice is insensitive to class imbalance (thin membranes, sparse synapses) but has noisy gradients
early on; cross-entropy is the opposite, so the sum is the usual robust choice (nnU-Net, torch-em).
Neither sees that a gap of two pixels in a membrane merges two cells: skeleton recall and clDice
count the structure along its skeleton, where a gap costs its length, not its few pixels of area.
Targets follow ``emfm.data.targets``: ``ignore_index`` (default -1) marks pixels to skip, and a
skipped pixel contributes nothing, its logits get an exact zero gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from skimage.morphology import skeletonize
from torch import nn

from emfm.errors import EmfmError

KINDS = ("softmax", "sigmoid")


def _weights(name: str, value: Sequence[float] | None) -> torch.Tensor | None:
    if value is None:
        return None
    try:
        weights = torch.as_tensor([float(v) for v in value])
    except (TypeError, ValueError):
        raise EmfmError(f"loss {name}: expected a list of numbers, one per class/channel, got {value!r}") from None
    if weights.ndim != 1 or len(weights) == 0 or (weights < 0).any():
        raise EmfmError(f"loss {name}: expected non-negative numbers, one per class/channel, got {value!r}")
    return weights


def soft_dice(probs: torch.Tensor, onehot: torch.Tensor, mask: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """1 - mean over channels of the soft Dice of (N, C, *spatial) maps, summed over the batch and the masked pixels.

    Summing over the whole batch (not per sample) keeps a class that is absent from one patch
    from dominating the loss.
    """
    dims = [0, *range(2, probs.ndim)]
    inter = (probs * onehot * mask).sum(dims)
    total = (probs * mask).sum(dims) + (onehot * mask).sum(dims)
    return 1 - ((2 * inter + smooth) / (total + smooth)).mean()


# The skeletons are taken per (Y, X) plane of 3-D maps too: EM membranes are thin in the section plane, and
# an erosion across thick sections would remove whole sections first.

def _soft_erode(planes: torch.Tensor) -> torch.Tensor:
    """Soft erosion of (B, 1, Y, X) maps: the minimum over the 4-neighbourhood (a cross, as Shit et al.)."""
    return torch.minimum(-F.max_pool2d(-planes, (3, 1), 1, (1, 0)), -F.max_pool2d(-planes, (1, 3), 1, (0, 1)))


def _soft_open(planes: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(_soft_erode(planes), 3, 1, 1)


def soft_skeleton(maps: torch.Tensor, iterations: int) -> torch.Tensor:
    """Differentiable skeleton of maps in [0, 1] (Shit et al., CVPR 2021), per (Y, X) plane, same shape.

    What an opening removes, gathered over ``iterations`` erosions: the skeleton of structures up to
    about ``2 * iterations + 1`` pixels wide.
    """
    x = maps.reshape(-1, 1, *maps.shape[-2:])  # (N * C * Z, 1, Y, X)
    skeleton = F.relu(x - _soft_open(x))
    for _ in range(iterations):
        x = _soft_erode(x)
        delta = F.relu(x - _soft_open(x))
        skeleton = skeleton + F.relu(delta - skeleton * delta)
    return skeleton.reshape(maps.shape)


def tubed_skeleton(truth: torch.Tensor) -> torch.Tensor:
    """Kirchhoff et al.'s tubed skeleton of a 0 / 1 target (N, C, *spatial): its skeleton per (Y, X) plane
    (scikit-image, on the CPU), widened by one pixel and kept inside the target. A target, so no gradient."""
    planes = (truth.detach() > 0.5).reshape(-1, *truth.shape[-2:]).cpu().numpy()  # (N * C * Z, Y, X)
    lines = np.stack([skeletonize(p) if p.any() else p for p in planes])
    tubes = F.max_pool2d(torch.from_numpy(lines).to(truth.device, truth.dtype)[:, None], 3, 1, 1)
    return tubes.reshape(truth.shape) * truth


def skeleton_recall(probs: torch.Tensor, truth: torch.Tensor, known: torch.Tensor,
                    smooth: float = 1e-5) -> torch.Tensor:
    """1 - mean over channels of the soft recall of the target's tubed skeleton (Kirchhoff et al., ECCV 2024):
    the share of it that ``probs`` covers, summed over the batch and the ``known`` pixels."""
    skeleton = tubed_skeleton(truth) * known
    dims = [0, *range(2, probs.ndim)]
    return 1 - (((probs * skeleton).sum(dims) + smooth) / (skeleton.sum(dims) + smooth)).mean()


def cldice(probs: torch.Tensor, truth: torch.Tensor, known: torch.Tensor, iterations: int = 3,
           smooth: float = 1e-5) -> torch.Tensor:
    """1 - mean over channels of clDice (Shit et al., CVPR 2021): the harmonic mean of the share of the
    predicted soft skeleton inside the target and of the target's soft skeleton inside the prediction.

    Unknown pixels are background to both skeletons, so their logits get no gradient.
    """
    probs = torch.where(known, probs, 0.0)
    pred_skeleton = soft_skeleton(probs, iterations) * known
    true_skeleton = soft_skeleton(truth, iterations) * known
    dims = [0, *range(2, probs.ndim)]
    precision = ((pred_skeleton * truth).sum(dims) + smooth) / (pred_skeleton.sum(dims) + smooth)
    sensitivity = ((true_skeleton * probs).sum(dims) + smooth) / (true_skeleton.sum(dims) + smooth)
    return 1 - (2 * precision * sensitivity / (precision + sensitivity)).mean()


class SegmentationLoss(nn.Module):
    """``dice_weight * Dice + ce_weight * CE`` (+ the topology terms given a weight), returned with its parts:
    ``{"loss", "dice", "ce"}`` and ``skeleton_recall`` / ``cldice`` when weighted.

    Args:
        kind: ``softmax`` for (N, K, *spatial) logits and an int class map (N, *spatial): multi-class
            cross-entropy and soft Dice over the K classes. ``sigmoid`` for (N, C, *spatial)
            logits and a 0 / 1 float target of the same shape: binary cross-entropy and Dice per
            channel (foreground, boundary, affinities...), averaged over channels.
        class_weights: softmax: per-class weights of the cross-entropy (as ``F.cross_entropy``);
            sigmoid: per-channel weights of the binary cross-entropy. Dice stays unweighted.
        pos_weight: sigmoid only: per-channel weight of positive pixels in the binary
            cross-entropy (as ``F.binary_cross_entropy_with_logits``), for rare foreground.
        ignore_index: target value of pixels to skip.
        skeleton_recall_weight: weight of :func:`skeleton_recall`, per channel (sigmoid) or
            foreground class (softmax).
        cldice_weight: weight of :func:`cldice`, likewise.
        cldice_iterations: erosions of clDice's soft skeletons; structures up to about twice as
            many pixels wide get a whole skeleton.
    """

    class_weights: torch.Tensor | None      # buffers, per class (channel)
    pos_weight: torch.Tensor | None

    def __init__(self, kind: str = "softmax", dice_weight: float = 1.0, ce_weight: float = 1.0,
                 class_weights: Sequence[float] | None = None, ignore_index: int = -1,
                 pos_weight: Sequence[float] | None = None, skeleton_recall_weight: float = 0.0,
                 cldice_weight: float = 0.0, cldice_iterations: int = 3) -> None:
        super().__init__()
        if kind not in KINDS:
            raise EmfmError(f"loss kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        if pos_weight is not None and kind == "softmax":
            raise EmfmError("loss pos_weight: only for kind sigmoid; use class_weights with softmax")
        weights = {"dice": dice_weight, "ce": ce_weight, "skeleton_recall": skeleton_recall_weight,
                   "cldice": cldice_weight}
        for name, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
                raise EmfmError(f"loss {name}_weight: expected a number >= 0, got {w!r}")
        if isinstance(cldice_iterations, bool) or not isinstance(cldice_iterations, int) or cldice_iterations < 1:
            raise EmfmError(f"loss cldice_iterations: expected an int >= 1, got {cldice_iterations!r}")
        self.kind, self.ignore_index = kind, ignore_index
        self.weights = {name: float(w) for name, w in weights.items()}
        self.cldice_iterations = cldice_iterations
        self.register_buffer("class_weights", _weights("class_weights", class_weights), persistent=False)
        self.register_buffer("pos_weight", _weights("pos_weight", pos_weight), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``mask`` (broadcastable to the target, true = use) skips more pixels, on top of ``ignore_index``."""
        channels = logits.shape[1]
        for name in ("class_weights", "pos_weight"):
            w = getattr(self, name)
            if w is not None and len(w) != channels:
                raise EmfmError(f"loss {name}: {len(w)} values for {channels} output channels")
        known = target != self.ignore_index
        if mask is not None:
            known = known & mask.bool()
        ce, probs, truth, known = (self._softmax if self.kind == "softmax" else self._sigmoid)(logits, target, known)
        parts = {"dice": soft_dice(probs, truth, known.float()), "ce": ce}
        if self.kind == "softmax":  # the topology terms are about the foreground classes
            probs, truth, known = probs[:, 1:], truth[:, 1:], known[:, 1:]
        if self.weights["skeleton_recall"] > 0:
            parts["skeleton_recall"] = skeleton_recall(probs, truth, known)
        if self.weights["cldice"] > 0:
            parts["cldice"] = cldice(probs, truth, known, self.cldice_iterations)
        loss = torch.stack([self.weights[name] * part for name, part in parts.items()]).sum()
        return {"loss": loss, **parts}

    def _softmax(self, logits: torch.Tensor, target: torch.Tensor,
                 known: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The cross-entropy, and the probabilities, 0 / 1 truth and known mask, each (N, K, *spatial)."""
        if target.shape != logits.shape[:1] + logits.shape[2:] or target.is_floating_point():
            raise EmfmError(f"softmax loss: expected an int target {[logits.shape[0], *logits.shape[2:]]} "
                            f"for logits {list(logits.shape)}, got {target.dtype} {list(target.shape)}")
        classes = torch.where(known, target, 0).long()
        # Mean over known pixels weighted by their class, as F.cross_entropy, but 0 (not nan) with none known.
        ce = F.cross_entropy(logits, classes, reduction="none")
        weight = known.float() if self.class_weights is None else self.class_weights[classes] * known
        ce = (ce * weight).sum() / weight.sum().clamp_min(1e-12)
        onehot = F.one_hot(classes, logits.shape[1]).movedim(-1, 1).float()
        return ce, logits.softmax(1), onehot, known[:, None].expand_as(logits)

    def _sigmoid(self, logits: torch.Tensor, target: torch.Tensor,
                 known: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """As ``_softmax``, per channel."""
        if target.shape != logits.shape:
            raise EmfmError(f"sigmoid loss: expected a target of the logits' shape {list(logits.shape)}, "
                            f"got {list(target.shape)}")
        known = known.expand_as(logits)
        fit = torch.where(known, target.float(), 0.0)
        view = (1, -1) + (1,) * (logits.ndim - 2)  # per-channel weights against (N, C, *spatial)
        pos = None if self.pos_weight is None else self.pos_weight.view(view)
        ce = F.binary_cross_entropy_with_logits(logits, fit, reduction="none", pos_weight=pos)
        weight = known.float() if self.class_weights is None else self.class_weights.view(view) * known
        ce = (torch.where(known, ce, 0.0) * weight).sum() / weight.sum().clamp_min(1e-12)
        return ce, logits.sigmoid(), fit, known
