"""Training targets computed on the fly from batches of integer labels, 2-D (N, Y, X) or 3-D (N, Z, Y, X).

Computing targets on the batch (after augmentation, on the training device) keeps one label
volume usable for every kind of head, and keeps labels exact under geometric augmentation:
labels are warped with nearest neighbours, then the target is derived.

Ignore convention: pixels whose raw label equals ``ignore_label`` (e.g. 255 for "not annotated")
are unknown, and every target marks what depends on them with ``IGNORE`` (-1) in its output, the
value ``SegmentationLoss`` skips by default. A single convention for both loss kinds:

- ``softmax`` targets are int64 class maps (N, *spatial), ``IGNORE`` where unknown.
- ``sigmoid`` targets are float maps (N, C, *spatial) of 0 / 1, ``IGNORE`` where unknown (for
  affinities also where the offset pair leaves the patch); ``valid(target)`` is the mask.

Users pick a target by name, see ``TARGETS`` and ``make_target``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from emfm.errors import EmfmError

IGNORE = -1

# Nearest-neighbour offsets per dimensionality (an offset points to the partner: p + offset).
NEAREST = {2: [[-1, 0], [0, -1]], 3: [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]}


def offset_slices(offset: Sequence[int], shape: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Slices ``(src, dst)`` of the trailing ``shape`` axes such that ``x[dst]`` is ``x[src]`` moved by ``offset``.

    The pair (p, p + offset) exists for p in ``src``; its partner p + offset lies in ``dst``. Both are
    empty when the offset is longer than the axis.
    """
    src, dst = [], []
    for o, s in zip(offset, shape):
        o = int(o)
        src.append(slice(max(-o, 0), max(s - o, 0) if o > 0 else s))
        dst.append(slice(max(o, 0), max(s + o, 0) if o < 0 else s))
    return tuple(src), tuple(dst)


def valid(target: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the known entries of a target."""
    return target != IGNORE


def _labels(labels: torch.Tensor | np.ndarray) -> torch.Tensor:
    """int64 tensor (N, *spatial) with 2 or 3 spatial axes; numpy (any integer dtype) is accepted too."""
    if isinstance(labels, np.ndarray):
        if not np.issubdtype(labels.dtype, np.integer):
            raise EmfmError(f"target labels: expected an integer array, got dtype {labels.dtype}")
        labels = torch.from_numpy(labels.astype(np.int64))
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex():
        raise EmfmError(f"target labels: expected an integer tensor, got {getattr(labels, 'dtype', type(labels))}")
    if labels.ndim not in (3, 4):
        raise EmfmError(f"target labels: expected (N, Y, X) or (N, Z, Y, X), got shape {list(labels.shape)}")
    return labels.long()


class Target:
    """Base of all targets: ``target(labels) -> tensor``, with what the loss needs to know about it.

    Args:
        ignore_label: raw label value of unannotated pixels; ``None`` = every pixel is annotated.
    """

    channels: int = 1
    loss: ClassVar[str] = "sigmoid"  # "softmax": multi-class over channels; "sigmoid": each channel on its own

    def __init__(self, ignore_label: int | None = None) -> None:
        if ignore_label is not None and (isinstance(ignore_label, bool) or not isinstance(ignore_label, int)):
            raise EmfmError(f"target ignore_label: expected an integer or null, got {ignore_label!r}")
        self.ignore_label = ignore_label

    def __call__(self, labels: torch.Tensor | np.ndarray) -> torch.Tensor:
        labels = _labels(labels)
        known = (labels != self.ignore_label if self.ignore_label is not None
                 else torch.ones_like(labels, dtype=torch.bool))
        return self.compute(labels, known)

    def compute(self, labels: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def check_values(self, values: Sequence[int], source: str) -> None:
        """Refuse label values this target cannot represent (``source`` names the volume in the error)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(channels={self.channels}, loss={self.loss!r})"


def _binary(mask: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """float 0 / 1 with ``IGNORE`` where not known."""
    return torch.where(known, mask.float(), float(IGNORE))


class Binary(Target):
    """One channel: label > 0. ``membrane`` (a membrane label volume) and ``foreground`` (instances)."""

    def compute(self, labels: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        return _binary(labels > 0, known)[:, None]


class Semantic(Target):
    """Class indices for a softmax head: raw label value -> class via ``classes``; other values -> 0.

    Args:
        classes: e.g. ``{1: 1, 2: 2}`` (membrane value 1 -> class 1, mitochondria value 2 -> class 2),
            or a list of label values ``[v1, v2, ...]`` meaning classes 1, 2, ...
            Keys may be strings of integers (as YAML configs give them).
        num_classes: output channels; default the highest class + 1.
    """

    loss = "softmax"

    def __init__(self, classes: Mapping[Any, int] | Sequence[int], num_classes: int | None = None,
                 ignore_label: int | None = None) -> None:
        super().__init__(ignore_label)
        if isinstance(classes, Sequence) and not isinstance(classes, str):
            classes = {value: index for index, value in enumerate(classes, start=1)}
        if not isinstance(classes, Mapping) or not classes:
            raise EmfmError(f"semantic target classes: expected a non-empty mapping label value -> class, "
                            f"got {classes!r}")
        try:
            self.classes = {int(value): int(cls) for value, cls in classes.items()}
        except (TypeError, ValueError):
            raise EmfmError(f"semantic target classes: expected integer values and classes, "
                            f"got {dict(classes)!r}") from None
        if min(self.classes.values()) < 0:
            raise EmfmError(f"semantic target classes: classes must be >= 0, got {self.classes}")
        self.channels = max(self.classes.values()) + 1 if num_classes is None else int(num_classes)
        if self.channels < max(2, max(self.classes.values()) + 1):
            raise EmfmError(f"semantic target num_classes: {num_classes} is too few for classes {self.classes}")

    def check_values(self, values: Sequence[int], source: str) -> None:
        unknown = sorted({int(v) for v in values} - set(self.classes) - {0, IGNORE})
        if unknown:
            raise EmfmError(f"{source}: label values {unknown[:10]} are not classes of target.classes {self.classes} "
                            f"(head of {self.channels} classes); add them to target.classes or set data.ignore_label")

    def compute(self, labels: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(labels)
        for value, cls in self.classes.items():
            out[labels == value] = cls
        return out.masked_fill(~known, IGNORE)


class Boundary(Target):
    """Two channels from instance labels: foreground (label > 0) and boundary, like torch-em's BoundaryTransform.

    A pixel is boundary when a face neighbour carries another id, background included (skimage's
    ``find_boundaries(mode="thick")``): both sides of a contact are boundary. A pixel whose
    neighbour is unknown and that is not already boundary is unknown itself.

    Args:
        in_plane: 3-D only: compare YX neighbours only, for anisotropic serial sections.
    """

    channels = 2

    def __init__(self, in_plane: bool = False, ignore_label: int | None = None) -> None:
        super().__init__(ignore_label)
        self.in_plane = bool(in_plane)

    def compute(self, labels: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        spatial = labels.ndim - 1
        axes = range(spatial - 2, spatial) if self.in_plane else range(spatial)
        boundary, unsure = torch.zeros_like(known), ~known
        for axis in axes:
            offset = [0] * spatial
            offset[axis] = 1
            src, dst = ((slice(None), *s) for s in offset_slices(offset, labels.shape[1:]))
            both = known[src] & known[dst]
            differs = (labels[src] != labels[dst]) & both
            for side in (src, dst):
                boundary[side] |= differs
                unsure[side] |= ~both
        bound = torch.where(boundary, 1.0, torch.where(unsure, float(IGNORE), 0.0))
        return torch.stack([_binary(labels > 0, known), bound], 1)


class Affinity(Target):
    """One channel per offset: 1 where p and p + offset are in the same non-zero instance, else 0.

    ``IGNORE`` where p + offset is outside the patch or either pixel is unknown; ``affinities``
    returns the same as a separate valid-pair mask.

    Args:
        offsets: e.g. ``[[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, -3, 0], [0, 0, -3]]`` for 3-D;
            ``NEAREST[2]`` / ``NEAREST[3]`` are the nearest neighbours.
    """

    def __init__(self, offsets: Sequence[Sequence[int]], ignore_label: int | None = None) -> None:
        super().__init__(ignore_label)
        self.offsets = _offsets(offsets)
        self.channels = len(self.offsets)

    def compute(self, labels: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        aff, ok = affinities(labels, self.offsets, known)
        return aff.masked_fill(~ok, IGNORE)


def _offsets(offsets: Any) -> list[list[int]]:
    try:
        out = [[int(o) for o in offset] for offset in offsets]
    except (TypeError, ValueError):
        raise EmfmError(f"affinity offsets: expected a list of integer offsets like [[-1, 0], [0, -1]], "
                        f"got {offsets!r}") from None
    if not out or len({len(o) for o in out}) != 1 or len(out[0]) not in (2, 3) or any(not any(o) for o in out):
        raise EmfmError(f"affinity offsets: expected non-zero offsets of one length, 2 or 3, got {offsets!r}")
    return out


def affinities(labels: torch.Tensor, offsets: Sequence[Sequence[int]],
               known: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Affinities (N, C, *spatial) float and the valid-pair mask, same shape, of instance labels (N, *spatial).

    Channel c at p compares p with p + ``offsets[c]``: 1 when both are in the same non-zero
    instance. A pair is valid when p + offset is inside the patch and both pixels are ``known``.
    """
    offsets = _offsets(offsets)
    if len(offsets[0]) != labels.ndim - 1:
        raise EmfmError(f"affinity offsets: {len(offsets[0])}-D offsets for {labels.ndim - 1}-D labels "
                        f"{list(labels.shape)}")
    known = torch.ones_like(labels, dtype=torch.bool) if known is None else known
    aff = torch.zeros(len(labels), len(offsets), *labels.shape[1:], device=labels.device)
    ok = torch.zeros_like(aff, dtype=torch.bool)
    for c, offset in enumerate(offsets):
        src, dst = ((slice(None), *s) for s in offset_slices(offset, labels.shape[1:]))
        a, b = labels[src], labels[dst]
        aff[:, c][src] = ((a == b) & (a != 0)).float()
        ok[:, c][src] = known[src] & known[dst]
    return aff, ok


TARGETS: dict[str, type[Target]] = {
    "membrane": Binary,
    "foreground": Binary,
    "boundary": Boundary,
    "semantic": Semantic,
    "affinity": Affinity,
}


def make_target(kind: str, **options: Any) -> Target:
    """The target called ``kind`` (a key of ``TARGETS``) with its options, checked."""
    if kind not in TARGETS:
        raise EmfmError(f"target kind {kind!r} is unknown; known: {', '.join(TARGETS)}")
    cls = TARGETS[kind]
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as err:
        raise EmfmError(f"target {kind}: {err}; options: {', '.join(inspect.signature(cls).parameters)}") from None
    return cls(**options)
