"""An ilastik-style filter bank: the pixel features users pick when they have no learned ones.

ilastik's default pixel-classification features, with its scale conventions, so a classifier on them is the
baseline users know: per sigma, Gaussian smoothing, Laplacian of Gaussian, Gaussian gradient magnitude, difference
of Gaussians (sigma minus 0.66 sigma), structure-tensor eigenvalues (inner scale sigma, outer 0.5 sigma) and
Hessian-of-Gaussian eigenvalues, eigenvalues largest first. Every filter is scipy's separable Gaussian (reflecting
at the image's edge) cut at ``radius(sigma)``, so a block read with a margin of :meth:`FilterBank.halo` and cropped
after filtering equals the same place of the whole image. Anisotropic stacks are filtered slice by slice
(``per_slice``): 2-D features of each z-slice, nothing mixed across z.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations_with_replacement
from typing import TypeVar

import numpy as np
from scipy import ndimage
from skimage.feature import hessian_matrix_eigvals, structure_tensor_eigenvalues

from emfm.errors import EmfmError

T = TypeVar("T")

SIGMAS = (0.7, 1.0, 1.6, 3.5, 5.0, 10.0)   # ilastik's scales
FINE_SIGMA = 0.3                            # ilastik offers this one for smoothing only
TRUNCATE = 4.0                              # kernel radius in sigmas, scipy's default
DOG_RATIO = 0.66                            # difference of Gaussians: G(sigma) - G(0.66 sigma)
OUTER_RATIO = 0.5                           # structure tensor: products of gradients smoothed at 0.5 sigma


def radius(sigma: float) -> int:
    """Half-width of the Gaussian kernel at ``sigma``: every filter here is cut there (scipy's ``radius=``)."""
    return math.ceil(TRUNCATE * sigma)


@dataclass(frozen=True)
class FilterBank:
    """The filters at ``sigmas``; ``fine`` adds smoothing at 0.3 as ilastik's first channel; ``per_slice`` filters
    the last two axes of a 3-D input only.

    Channels, for each sigma in order (:meth:`names`): ``gaussian_S``, ``log_S``, ``gradient_S``, ``dog_S``,
    ``structure_tensor_S_eI`` and ``hessian_S_eI`` for I = 0 .. d-1 (eigenvalue 0 the largest), d the number of
    filtered axes: 8 channels a sigma in 2-D, 10 in 3-D.
    """

    sigmas: tuple[float, ...] = SIGMAS
    per_slice: bool = False
    fine: bool = False

    def __post_init__(self) -> None:
        if not self.sigmas or min(self.sigmas) <= 0:
            raise EmfmError(f"filters.sigmas={list(self.sigmas)}: expected at least one sigma, all positive")

    def axes(self, ndim: int) -> tuple[int, ...]:
        """The axes filtered in an image of ``ndim`` spatial axes (2-D or 3-D)."""
        if ndim not in (2, 3):
            raise EmfmError(f"filter bank: expected a 2-D image or a 3-D volume, got {ndim} axes")
        return tuple(range(ndim - 2, ndim)) if self.per_slice else tuple(range(ndim))

    def names(self, ndim: int) -> list[str]:
        """One name per output channel, in order, for an input of ``ndim`` spatial axes."""
        d = len(self.axes(ndim))
        names = [f"gaussian_{FINE_SIGMA}"] if self.fine else []
        for s in self.sigmas:
            names += [f"gaussian_{s}", f"log_{s}", f"gradient_{s}", f"dog_{s}"]
            names += [f"{kind}_{s}_e{i}" for kind in ("structure_tensor", "hessian") for i in range(d)]
        return names

    def halo(self, ndim: int) -> tuple[int, ...]:
        """Margin per axis that a block must be read with for its features to equal the whole image's: the
        structure tensor smooths gradients, so it reaches the sum of its two radii; every other filter one radius
        (a difference of Gaussians filters the input twice side by side, not one after the other)."""
        reach = max(radius(s) + radius(OUTER_RATIO * s) for s in self.sigmas)
        filtered = self.axes(ndim)
        return tuple(reach if axis in filtered else 0 for axis in range(ndim))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Features of a 2-D image (Y, X) or a 3-D volume (Z, Y, X) as float32 (C, *spatial)."""
        axes = self.axes(image.ndim)
        image = np.asarray(image, dtype=np.float32)
        channels = [_smooth(image, FINE_SIGMA, axes)] if self.fine else []
        for s in self.sigmas:
            smooth = _smooth(image, s, axes)
            gradient = [_derivative(image, s, axes, (a,)) for a in axes]
            hessian = {pair: _derivative(image, s, axes, pair) for pair in _pairs(axes)}
            for a in axes:      # a sampled second-derivative kernel sums to a little below 0; vigra removes that
                hessian[a, a] -= _second_derivative_sum(s) * smooth
            tensor = [_smooth(gi * gj, OUTER_RATIO * s, axes) for gi, gj in _pairs(gradient)]
            channels += [smooth, np.add.reduce([hessian[a, a] for a in axes]), np.linalg.norm(gradient, axis=0),
                         smooth - _smooth(image, DOG_RATIO * s, axes)]
            channels += [*structure_tensor_eigenvalues(tensor), *hessian_matrix_eigvals(list(hessian.values()))]
        return np.stack(channels).astype(np.float32, copy=False)   # [C, *spatial]


def _smooth(image: np.ndarray, sigma: float, axes: tuple[int, ...]) -> np.ndarray:
    return ndimage.gaussian_filter(image, sigma, axes=axes, radius=radius(sigma))


def _derivative(image: np.ndarray, sigma: float, axes: tuple[int, ...], along: tuple[int, ...]) -> np.ndarray:
    """The Gaussian derivative of ``image`` once along each axis in ``along`` (twice where it repeats)."""
    order = [along.count(a) for a in axes]
    return ndimage.gaussian_filter(image, sigma, order=order, axes=axes, radius=radius(sigma))


def _second_derivative_sum(sigma: float) -> float:
    """The sum of scipy's sampled second-derivative kernel at ``sigma``: 0 in theory, -0.005 at 0.7 and -7e-5 at 1.0,
    so a constant image of intensity v would get a Laplacian of -0.005 v. Taking this times the smoothed image off
    the response gives a kernel of sum 0 (vigra's, hence ilastik's, are) that still answers a ramp with 0."""
    return float(ndimage.gaussian_filter1d(np.ones(1), sigma, order=2, radius=radius(sigma))[0])


def _pairs(items: Sequence[T]) -> list[tuple[T, T]]:
    """The upper-triangular pairs (i <= j), row by row: the order skimage takes a symmetric matrix's elements in."""
    return list(combinations_with_replacement(items, 2))
