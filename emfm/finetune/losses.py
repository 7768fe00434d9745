"""Dice + cross-entropy segmentation losses that skip unannotated pixels.

Dice is insensitive to class imbalance (thin membranes, sparse synapses) but has noisy gradients
early on; cross-entropy is the opposite, so the sum is the usual robust choice (nnU-Net, torch-em).
Targets follow ``emfm.data.targets``: ``ignore_index`` (default -1) marks pixels to skip, and a
skipped pixel contributes nothing, its logits get an exact zero gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
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


class SegmentationLoss(nn.Module):
    """``dice_weight * Dice + ce_weight * CE``, returned with its parts: ``{"loss", "dice", "ce"}``.

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
    """

    class_weights: torch.Tensor | None      # buffers, per class (channel)
    pos_weight: torch.Tensor | None

    def __init__(self, kind: str = "softmax", dice_weight: float = 1.0, ce_weight: float = 1.0,
                 class_weights: Sequence[float] | None = None, ignore_index: int = -1,
                 pos_weight: Sequence[float] | None = None) -> None:
        super().__init__()
        if kind not in KINDS:
            raise EmfmError(f"loss kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        if pos_weight is not None and kind == "softmax":
            raise EmfmError("loss pos_weight: only for kind sigmoid; use class_weights with softmax")
        for name, w in (("dice_weight", dice_weight), ("ce_weight", ce_weight)):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
                raise EmfmError(f"loss {name}: expected a number >= 0, got {w!r}")
        self.kind, self.ignore_index = kind, ignore_index
        self.dice_weight, self.ce_weight = float(dice_weight), float(ce_weight)
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
        dice, ce = (self._softmax if self.kind == "softmax" else self._sigmoid)(logits, target, known)
        return {"loss": self.dice_weight * dice + self.ce_weight * ce, "dice": dice, "ce": ce}

    def _softmax(self, logits: torch.Tensor, target: torch.Tensor,
                 known: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if target.shape != logits.shape[:1] + logits.shape[2:] or target.is_floating_point():
            raise EmfmError(f"softmax loss: expected an int target {[logits.shape[0], *logits.shape[2:]]} "
                            f"for logits {list(logits.shape)}, got {target.dtype} {list(target.shape)}")
        classes = torch.where(known, target, 0).long()
        # Mean over known pixels weighted by their class, as F.cross_entropy, but 0 (not nan) with none known.
        ce = F.cross_entropy(logits, classes, reduction="none")
        weight = known.float() if self.class_weights is None else self.class_weights[classes] * known
        ce = (ce * weight).sum() / weight.sum().clamp_min(1e-12)
        onehot = F.one_hot(classes, logits.shape[1]).movedim(-1, 1).float()
        dice = soft_dice(logits.softmax(1), onehot, known[:, None].float())
        return dice, ce

    def _sigmoid(self, logits: torch.Tensor, target: torch.Tensor,
                 known: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
        dice = soft_dice(logits.sigmoid(), fit, known.float())
        return dice, ce
