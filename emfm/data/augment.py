"""Batched EM augmentations on the training device, for 2-D (N, C, Y, X) and 3-D (N, C, Z, Y, X).

Each sample draws its own parameters from the caller's ``torch.Generator``, so a training step can
be replayed from its seed. All geometric transforms (flip, rot90, crop, elastic, section
misalignment) are composed into one sampling grid and resampled once with ``grid_sample``: a
single interpolation instead of a chain of warps that would each blur, and one code path for 2-D
and 3-D. Anisotropic 3-D data (serial sections: thick z voxels) is only transformed in-plane;
``isotropic=True`` (e.g. FIB-SEM) also rotates, crops, warps and blurs across z.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from itertools import combinations
from typing import Any

import torch
import torch.nn.functional as F
from kornia.filters import filter3d, gaussian_blur2d, get_gaussian_kernel1d
from torch import nn

from emfm.errors import EmfmError

# Options of each mapping: key -> (default, lowest, highest, lowest excluded); a tuple default is a [lo, hi] range.
_INF = math.inf
OPTIONS: dict[str, dict[str, tuple[Any, float, float, bool]]] = {
    "crop": {"p": (1.0, 0, 1, False), "scale": ((0.3, 1.0), 0, 1, True), "ratio": ((0.75, 4 / 3), 0, _INF, True)},
    "elastic": {"p": (0.5, 0, 1, False), "alpha": (4.0, 0, _INF, False), "spacing": (16.0, 1, _INF, False)},
    "intensity": {"p": (0.8, 0, 1, False), "brightness": ((-0.1, 0.1), -_INF, _INF, False),
                  "contrast": ((0.8, 1.25), 0, _INF, True), "gamma": ((0.8, 1.25), 0, _INF, True)},
    "noise": {"p": (0.5, 0, 1, False), "std": ((0.0, 0.05), 0, _INF, False)},
    "blur": {"p": (0.5, 0, 1, False), "sigma": ((0.1, 1.5), 0, _INF, True)},
    "missing_section": {"p": (0.1, 0, 1, False)},
    "misaligned_section": {"p": (0.1, 0, 1, False), "max_shift": (8.0, 0, _INF, False)},
}


def _number(key: str, value: Any, lo: float = 0, hi: float = 1, open_lo: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (lo < value if open_lo else lo <= value) or value > hi:
        raise EmfmError(f"augment {key}: expected a number in {'(' if open_lo else '['}{lo}, {hi}], got {value!r}")
    return float(value)


def _range(key: str, value: Any, lo: float, hi: float, open_lo: bool) -> tuple[float, float]:
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2:
        raise EmfmError(f"augment {key}: expected a range [lo, hi], got {value!r}")
    a, b = (_number(key, v, lo, hi, open_lo) for v in value)
    if a > b:
        raise EmfmError(f"augment {key}: lo > hi in {list(value)}")
    return a, b


def _parse(name: str, cfg: Mapping | None) -> dict[str, Any] | None:
    """Validated options with defaults filled in; None when the transform is off (None or p = 0)."""
    if cfg is None:
        return None
    if not isinstance(cfg, Mapping):
        raise EmfmError(f"augment {name}: expected a mapping of options or null, got {cfg!r}")
    spec = OPTIONS[name]
    unknown = sorted(set(map(str, cfg)) - set(spec))
    if unknown:
        raise EmfmError(f"augment {name}: unknown option(s) {', '.join(unknown)}; known: {', '.join(spec)}")
    opts: dict[str, Any] = {}
    for key, (default, lo, hi, open_lo) in spec.items():
        parse = _range if isinstance(default, tuple) else _number
        opts[key] = parse(f"{name}.{key}", cfg.get(key, default), lo, hi, open_lo)
    return opts if opts["p"] > 0 else None


def _on(x: torch.Tensor, fire: torch.Tensor, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn(x[idx], idx)`` on the samples that fire; the others keep their exact values and cost nothing."""
    idx = fire.nonzero()[:, 0]
    if len(idx) == 0:
        return x
    if len(idx) == len(x):
        return fn(x, idx)
    out = x.clone()
    out[idx] = fn(x[idx], idx)
    return out


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float, in_plane: bool) -> torch.Tensor:
    """Gaussian blur of (N, C, *spatial) with one sigma per sample, in YX only if ``in_plane``.

    kornia's separable ``gaussian_blur2d`` takes a sigma per sample; folding z into channels makes it
    blur each section on its own. kornia has no 3-D Gaussian blur, and ``filter3d`` with a full k^3
    kernel costs k^2 times a separable one, so isotropic 3-D runs ``filter3d`` once per axis with
    kornia's 1-D kernels. Kernels are cut at 3 sigma and at the patch size (reflect padding needs it).
    """
    sizes = [min(2 * math.ceil(3 * max_sigma) + 1, 2 * s - 1) for s in x.shape[2:]]
    if in_plane or x.ndim == 4:
        flat = x.flatten(1, -3)
        return gaussian_blur2d(flat, (sizes[-2], sizes[-1]), sigma[:, None].expand(-1, 2), "reflect").reshape_as(x)
    for axis, k in enumerate(sizes):
        shape = [len(x), 1, 1, 1]
        shape[axis + 1] = k
        x = filter3d(x, get_gaussian_kernel1d(k, sigma[:, None]).view(shape), "reflect")
    return x


class Augment(nn.Module):
    """EM augmentations of a batch, each sample with its own random parameters.

    Order: geometry (one resampling) -> intensity -> blur -> noise -> missing section. Every
    argument is a primitive or a mapping of primitives; a mapping left out, ``None`` or ``p: 0``
    turns its transform off, a key left out of a mapping takes the default below.

    Args:
        spatial_dims: 2 for (N, C, Y, X) images, 3 for (N, C, Z, Y, X) volumes.
        isotropic: 3-D voxels are cubic, so rot90, crop, elastic and blur may act across z.
            Otherwise only flips touch z.
        flip: probability, per sample and spatial axis (z too), of flipping that axis.
        rot90: probability of a 90/180/270-degree rotation in YX, or with ``isotropic`` in a random
            one of the ZY, ZX, YX planes; planes that are not square in the patch are never used.
        crop: random resized crop, the view of contrastive methods, resized back to the input size:
            ``{p: 1.0, scale: [0.3, 1.0], ratio: [0.75, 1.333]}``. ``scale`` is the fraction of the
            YX area (of the volume with ``isotropic``; anisotropic 3-D keeps all of z), ``ratio`` the
            X/Y aspect, drawn log-uniformly; sides are clipped to the patch.
        elastic: smooth random warp, ``{p: 0.5, alpha: 4.0, spacing: 16.0}``: control points every
            ``spacing`` pixels move by up to ``alpha`` pixels, linearly interpolated in between
            (in YX only for anisotropic 3-D).
        intensity: ``{p: 0.8, brightness: [-0.1, 0.1], contrast: [0.8, 1.25], gamma: [0.8, 1.25]}``:
            ``x**gamma`` on positive values, then contrast about the sample mean, plus brightness.
            Contrast and gamma are drawn log-uniformly, brightness uniformly.
        noise: additive Gaussian noise, ``{p: 0.5, std: [0.0, 0.05]}``.
        blur: Gaussian blur, ``{p: 0.5, sigma: [0.1, 1.5]}`` in pixels (in YX for anisotropic 3-D).
        missing_section: ``{p: 0.1}``, 3-D only: one z-plane replaced by the sample mean, like a
            lost serial section.
        misaligned_section: ``{p: 0.1, max_shift: 8.0}``, 3-D only: the z-planes from a random index
            on are shifted in YX by up to ``max_shift`` pixels, like a misaligned section.
    """

    def __init__(self, spatial_dims: int, isotropic: bool = False, flip: float = 0.0, rot90: float = 0.0,
                 crop: Mapping | None = None, elastic: Mapping | None = None, intensity: Mapping | None = None,
                 noise: Mapping | None = None, blur: Mapping | None = None,
                 missing_section: Mapping | None = None, misaligned_section: Mapping | None = None) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise EmfmError(f"augment spatial_dims: expected 2 or 3, got {spatial_dims!r}")
        self.spatial_dims, self.isotropic = spatial_dims, bool(isotropic)
        # Axes that may be mixed, cropped, warped and blurred: all but z for anisotropic 3-D.
        self.plane_axes = tuple(range(spatial_dims)) if isotropic or spatial_dims == 2 else (1, 2)
        self.flip, self.rot90 = _number("flip", flip), _number("rot90", rot90)
        self.crop, self.elastic = _parse("crop", crop), _parse("elastic", elastic)
        self.intensity, self.noise = _parse("intensity", intensity), _parse("noise", noise)
        self.blur = _parse("blur", blur)
        self.missing_section = _parse("missing_section", missing_section) if spatial_dims == 3 else None
        self.misaligned_section = _parse("misaligned_section", misaligned_section) if spatial_dims == 3 else None

    def extra_repr(self) -> str:
        on = {k: getattr(self, k) for k in ("flip", "rot90", *OPTIONS) if getattr(self, k)}
        return f"spatial_dims={self.spatial_dims}, isotropic={self.isotropic}" + "".join(
            f", {k}={v}" for k, v in on.items())

    # Never traced by torch.compile (trainer.compile=true): which samples a transform touches sets tensor sizes,
    # which would break the graph at every transform and compile it again for every count.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Augmented copy of ``x`` (same shape, dtype and device); ``x`` itself is never modified.

        With ``labels`` (N, C', *spatial) integer maps, returns ``(x, labels)``: the labels get the
        same geometry, resampled with nearest neighbour (ids stay exact below 2**24), and no
        intensity change.
        """
        d = self.spatial_dims
        if x.ndim != d + 2 or not x.is_floating_point():
            raise EmfmError(f"augment: expected a float {d + 2}-D (N, C, {'Z, ' * (d == 3)}Y, X) tensor, "
                            f"got {x.dtype} {tuple(x.shape)}")
        if labels is not None:
            if labels.shape[0] != x.shape[0] or labels.shape[2:] != x.shape[2:]:
                raise EmfmError(f"augment: labels {tuple(labels.shape)} do not match images {tuple(x.shape)}")
            both = self._geometry(torch.cat([x, labels.to(x.dtype)], 1), generator, labels=labels.shape[1])
            x, labels = both[:, : x.shape[1]], both[:, x.shape[1]:].round().to(labels.dtype)
            return self._photometric(x, generator), labels
        return self._photometric(self._geometry(x, generator), generator)

    def _photometric(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Intensity, blur, noise and missing sections: what changes the image but not its labels."""
        n, dims, dev, dt = len(x), tuple(range(1, x.ndim)), x.device, x.dtype

        def rand() -> torch.Tensor:
            return torch.rand(n, generator=generator, device=dev)

        def uniform(bounds: tuple[float, float], log: bool = False) -> torch.Tensor:
            """One value per sample in ``bounds``, shaped to broadcast against ``x``."""
            lo, hi = bounds
            if log:
                return torch.exp(uniform((math.log(lo), math.log(hi))))
            return (lo + (hi - lo) * rand()).to(dt).view(-1, *[1] * len(dims))

        if c := self.intensity:
            fire, shift = rand() < c["p"], uniform(c["brightness"])
            scale, gamma = uniform(c["contrast"], log=True), uniform(c["gamma"], log=True)

            def intensity(xs: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
                xs = torch.where(xs > 0, xs.clamp(min=0) ** gamma[i], xs)
                mean = xs.mean(dims, keepdim=True)
                return (xs - mean) * scale[i] + mean + shift[i]

            x = _on(x, fire, intensity)
        if c := self.blur:
            fire, sigma, max_sigma = rand() < c["p"], uniform(c["sigma"]).flatten(), c["sigma"][1]
            x = _on(x, fire, lambda xs, i: gaussian_blur(xs, sigma[i], max_sigma, not self.isotropic))
        if c := self.noise:
            fire, std = rand() < c["p"], uniform(c["std"])
            x = _on(x, fire, lambda xs, i: xs + std[i] * torch.randn(xs.shape, generator=generator, device=dev,
                                                                     dtype=dt))
        if (c := self.missing_section) and x.shape[2] > 1:
            fire = rand() < c["p"]
            plane = torch.randint(x.shape[2], (n,), generator=generator, device=dev)

            def missing(xs: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
                out = xs.clone()
                out[torch.arange(len(i), device=dev), :, plane[i]] = xs.mean(dims)[:, None, None, None]
                return out

            x = _on(x, fire, missing)
        return x

    def _geometry(self, x: torch.Tensor, generator: torch.Generator | None, labels: int = 0) -> torch.Tensor:
        """Flip, rot90, crop, elastic and misalignment as one grid; ``x`` unchanged where none fires.

        Coordinates are normalised to [-1, 1] with pixel centres at (2i + 1) / S - 1
        (``align_corners=False``), so flips and rotations map centres onto centres: bit-exact for
        power-of-two sizes, else within grid_sample's float rounding (~1e-7 * size). An output
        point u (after elastic and misalignment offsets) samples the input at A @ u + t, with
        A = crop scale @ rotation @ flip and t the crop centre.
        """
        n, d, size, dev = len(x), self.spatial_dims, x.shape[2:], x.device

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(n, *shape, generator=generator, device=dev)

        A, t = torch.eye(d, device=dev).repeat(n, 1, 1), torch.zeros(n, d, device=dev)
        fired = torch.zeros(n, dtype=torch.bool, device=dev)
        if self.flip:
            sign = 1 - 2 * (rand(d) < self.flip).float()
            A, fired = A * sign[:, None, :], fired | (sign < 0).any(1)
        planes = [(a, b) for a, b in combinations(self.plane_axes, 2) if size[a] == size[b]]
        if self.rot90 and planes:
            k = torch.randint(1, 4, (n,), generator=generator, device=dev) * (rand() < self.rot90)
            a, b = torch.tensor(planes, device=dev)[torch.randint(len(planes), (n,), generator=generator,
                                                                   device=dev)].unbind(1)
            cos, sin = (torch.tensor(v, device=dev)[k] for v in ([1.0, 0, -1, 0], [0.0, 1, 0, -1]))
            rot, i = torch.eye(d, device=dev).repeat(n, 1, 1), torch.arange(n, device=dev)
            rot[i, a, a], rot[i, a, b], rot[i, b, a], rot[i, b, b] = cos, sin, -sin, cos
            A, fired = rot @ A, fired | (k > 0)
        if c := self.crop:
            fire, area = rand() < c["p"], c["scale"][0] + (c["scale"][1] - c["scale"][0]) * rand()
            lo, hi = math.log(c["ratio"][0]), math.log(c["ratio"][1])
            ratio = torch.exp(lo + (hi - lo) * rand())
            frac = torch.ones(n, d, device=dev)
            if len(self.plane_axes) == 3:
                frac[:, 0] = area ** (1 / 3)
                area = frac[:, 0] ** 2
            frac[:, -2], frac[:, -1] = (area / ratio).sqrt(), (area * ratio).sqrt()
            frac = torch.where(fire[:, None], frac.clamp(max=1), 1.0)
            t = (1 - frac) * (2 * rand(d) - 1)
            A, fired = frac[:, :, None] * A, fired | fire
        elastic = rand() < self.elastic["p"] if self.elastic else torch.zeros_like(fired)
        misaligned = self.misaligned_section if size[0] > 1 else None
        shifted = rand() < misaligned["p"] if misaligned else torch.zeros_like(fired)
        fired |= elastic | shifted

        def resample(xs: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
            m, dt = len(i), x.dtype
            centres = [(2 * torch.arange(s, device=dev, dtype=dt) + 1) / s - 1 for s in size]
            u = torch.stack(torch.meshgrid(*centres, indexing="ij"), -1).repeat(m, *[1] * (d + 1))
            to_unit = torch.tensor([2 / s for s in size], device=dev, dtype=dt)  # pixels -> normalised
            first = self.plane_axes[0]  # elastic moves the plane axes, which are the last ones
            if c := self.elastic:
                coarse = [math.ceil(s / c["spacing"]) + 1 for s in size]
                amp = c["alpha"] * elastic[i].to(dt).view(-1, 1, *[1] * d) * to_unit[first:].view(-1, *[1] * d)
                field = amp * (2 * torch.rand(m, d - first, *coarse, generator=generator, device=dev, dtype=dt) - 1)
                field = F.interpolate(field, size=tuple(size), mode="bilinear" if d == 2 else "trilinear",
                                      align_corners=True)
                u[..., first:] += field.movedim(1, -1)
            if c := misaligned:
                start = torch.randint(1, size[0], (m,), generator=generator, device=dev)
                shift = c["max_shift"] * (2 * torch.rand(m, 2, generator=generator, device=dev, dtype=dt) - 1)
                after = (torch.arange(size[0], device=dev) >= start[:, None]) & shifted[i, None]
                u[..., 1:] -= (after[..., None] * shift[:, None] * to_unit[1:])[:, :, None, None]
            # grid_sample wants (x, y[, z]) last: reversing the rows of A and t gives that order directly.
            grid = torch.baddbmm(t[i].flip(-1).to(dt)[:, None], u.view(m, -1, d), A[i].flip(1).mT.to(dt))
            grid = grid.view(m, *size, d)
            image = xs.shape[1] - labels  # the last `labels` channels are label maps
            out = F.grid_sample(xs[:, :image], grid, mode="bilinear", padding_mode="reflection", align_corners=False)
            if not labels:
                return out
            nearest = F.grid_sample(xs[:, image:], grid, mode="nearest", padding_mode="reflection", align_corners=False)
            return torch.cat([out, nearest], 1)

        return _on(x, fired, resample)
