"""Augment: exact geometry, z kept apart from YX for anisotropic data, artefacts, determinism, config errors."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from emfm.data.augment import Augment
from emfm.errors import EmfmError

FULL = {"flip": 0.5, "rot90": 0.5, "crop": {}, "elastic": {"p": 1.0}, "intensity": {}, "noise": {}, "blur": {},
        "missing_section": {}, "misaligned_section": {}}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def z_only(n: int = 4, shape: tuple[int, int, int] = (8, 16, 16)) -> torch.Tensor:
    """(n, 1, Z, Y, X) whose value depends on z only: every z-plane is constant."""
    z = torch.rand(n, 1, shape[0], 1, 1)
    return z.expand(n, 1, *shape).contiguous()


def plane_spread(x: torch.Tensor) -> torch.Tensor:
    """Per sample and z-plane, max - min over YX (and channels)."""
    v = x.transpose(1, 2).flatten(2)
    return v.amax(-1) - v.amin(-1)


def hf_energy(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.diff(dim=dim).pow(2).mean()


@pytest.mark.parametrize("shape", [(3, 2, 16, 16), (2, 1, 4, 16, 16)])
def test_identity_returns_input_bit_for_bit(shape: tuple[int, ...]) -> None:
    x = torch.rand(shape)
    off = {"flip": 0.0, "rot90": 0.0, "crop": {"p": 0}, "elastic": None, "noise": {"p": 0.0}}
    assert torch.equal(Augment(len(shape) - 2, **off)(x, gen()), x)
    assert torch.equal(Augment(len(shape) - 2)(x), x)


# Pixel centres are exact in float32 for power-of-two sizes; grid_sample's own float32 arithmetic
# leaves an error of about 1e-7 * size per unit of intensity step for other sizes.
@pytest.mark.parametrize("shape,atol", [((5, 2, 16, 32), 0.0), ((3, 1, 4, 16, 8), 0.0), ((3, 1, 12, 12, 12), 1e-5)])
def test_flip_p1_equals_torch_flip(shape: tuple[int, ...], atol: float) -> None:
    x = torch.rand(shape)
    dims = tuple(range(2, len(shape)))
    out = Augment(len(shape) - 2, flip=1.0)(x, gen())
    torch.testing.assert_close(out, torch.flip(x, dims), rtol=0, atol=atol)


def test_rot90_p1_is_a_torch_rot90_per_sample_2d() -> None:
    x = torch.rand(16, 2, 16, 16)
    out = Augment(2, rot90=1.0)(x, gen())
    used = set()
    for a, b in zip(out, x):
        k = [k for k in (1, 2, 3) if torch.allclose(a, torch.rot90(b, k, (-2, -1)), rtol=0, atol=1e-6)]
        assert len(k) == 1
        used.add(k[0])
    assert used == {1, 2, 3}


def test_rot90_skips_non_square_plane() -> None:
    x = torch.rand(4, 1, 16, 32)
    assert torch.equal(Augment(2, rot90=1.0)(x, gen()), x)


def test_isotropic_rot90_rotates_z_into_yx_for_cubes() -> None:
    x = z_only(16, (8, 8, 8))
    out = Augment(3, isotropic=True, rot90=1.0)(x, gen())
    rotations = [torch.rot90(x, k, p) for p in ((-2, -1), (-3, -2), (-3, -1)) for k in (1, 2, 3)]
    for n in range(len(x)):
        assert any(torch.allclose(out[n], r[n], rtol=0, atol=1e-6) for r in rotations)
    assert (plane_spread(out) > 1e-3).any(), "no sample had z rotated into y or x"


def test_anisotropic_never_mixes_z_with_yx() -> None:
    x = z_only(8, (6, 16, 16))
    cfg = {"flip": 0.5, "rot90": 1.0, "crop": {"scale": [0.2, 0.5]}, "elastic": {"p": 1.0, "alpha": 5.0},
           "blur": {"p": 1.0}}
    out = Augment(3, isotropic=False, **cfg)(x, gen())
    assert plane_spread(out).max() < 1e-5
    # The planes were at most reordered by a z flip: each sample's set of plane values is kept.
    before, after = x[:, 0, :, 0, 0].sort(-1).values, out[:, 0, :, 0, 0].sort(-1).values
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_anisotropic_crop_keeps_z_whole_and_isotropic_crop_does_not() -> None:
    ramp = torch.linspace(0, 1, 8).view(1, 1, 8, 1, 1).expand(4, 1, 8, 8, 8).contiguous()
    aniso = Augment(3, crop={"scale": [0.3, 0.3]})(ramp, gen())
    torch.testing.assert_close(aniso, ramp, rtol=0, atol=1e-6)
    iso = Augment(3, isotropic=True, crop={"scale": [0.3, 0.3]})(ramp, gen())
    assert (iso[:, 0, -1, 0, 0] - iso[:, 0, 0, 0, 0] < 0.9).all()


def test_crop_of_ramp_zooms_in() -> None:
    ramp = torch.linspace(0, 1, 64).expand(8, 1, 64, 64).contiguous()
    out = Augment(2, crop={"scale": [0.2, 0.5], "ratio": [1.0, 1.0]})(ramp, gen())
    span = out.amax((1, 2, 3)) - out.amin((1, 2, 3))
    assert (span < 0.8).all() and (span > 0.3).all()
    assert (out.diff(dim=-1) > 0).all(), "the crop must keep the ramp increasing"
    assert (out.diff(dim=-2).abs() < 1e-6).all(), "no rotation or shear"


@pytest.mark.parametrize("spatial_dims,isotropic", [(2, False), (3, False), (3, True)])
def test_full_config_keeps_shape_dtype_and_is_seeded(spatial_dims: int, isotropic: bool) -> None:
    aug = Augment(spatial_dims, isotropic, **FULL)
    for dtype in (torch.float32, torch.float64):
        x = torch.rand((4, 2) + (16,) * spatial_dims, dtype=dtype)
        out = aug(x, gen(1))
        assert out.shape == x.shape and out.dtype == dtype and torch.isfinite(out).all()
        assert torch.equal(out, aug(x, gen(1)))
        assert not torch.equal(out, aug(x, gen(2)))
    assert torch.equal(x, x.clone()), "input modified in place"


def test_accepts_hydra_config() -> None:
    cfg = OmegaConf.create({"flip": 0.5, "crop": {"scale": [0.5, 1.0]}, "blur": {"p": 1.0, "sigma": [0.5, 1]}})
    aug = Augment(2, **cfg)
    assert aug.crop == {"p": 1.0, "scale": (0.5, 1.0), "ratio": (0.75, 4 / 3)}
    assert aug(torch.rand(2, 1, 16, 16), gen()).shape == (2, 1, 16, 16)


def test_missing_section_makes_one_plane_constant() -> None:
    x = torch.rand(6, 2, 8, 16, 16)
    out = Augment(3, missing_section={"p": 1.0})(x, gen())
    spread = plane_spread(out)
    assert ((spread == 0).sum(1) == 1).all()
    changed = (out != x).flatten(3).any(-1).any(1)
    assert (changed == (spread == 0)).all(), "only the constant plane differs"
    blank = out.transpose(1, 2)[spread == 0]
    torch.testing.assert_close(blank.flatten(1)[:, 0], x.mean((1, 2, 3, 4)), rtol=0, atol=1e-6)
    flat = torch.rand(3, 1, 16, 16)
    assert torch.equal(Augment(2, missing_section={"p": 1.0}, misaligned_section={"p": 1.0})(flat, gen()), flat)


def test_misaligned_section_shifts_planes_from_an_index_on() -> None:
    z, size, max_shift = 8, 32, 3.0
    yy, xx = torch.meshgrid(torch.arange(size * 1.0), torch.arange(size * 1.0), indexing="ij")
    x = torch.stack([yy, xx]).view(1, 2, 1, size, size).expand(8, 2, z, size, size).contiguous()
    out = Augment(3, misaligned_section={"p": 1.0, "max_shift": max_shift})(x, gen())
    inner = (slice(None), slice(None), slice(None), slice(4, -4), slice(4, -4))
    shift = (x - out)[inner].mean((-2, -1))                                      # (N, 2, Z) in pixels
    torch.testing.assert_close((x - out)[inner], shift[..., None, None].expand_as((x - out)[inner]), atol=1e-4, rtol=0)
    for s in shift:
        moved = s.abs().amax(0) > 1e-4
        start = int(moved.float().argmax())
        assert start >= 1 and moved[start:].all() and not moved[:start].any()
        assert torch.allclose(s[:, start:], s[:, start:start + 1], atol=1e-4)
        assert (s.abs() <= max_shift + 1e-4).all()
    torch.testing.assert_close(out[:, :, 0], x[:, :, 0], rtol=0, atol=1e-5)


def test_noise_adds_requested_std() -> None:
    x = torch.full((8, 1, 64, 64), 0.5)
    out = Augment(2, noise={"p": 1.0, "std": [0.1, 0.1]})(x, gen())
    torch.testing.assert_close(out.std((1, 2, 3)), torch.full((8,), 0.1), rtol=0.05, atol=0)


@pytest.mark.parametrize("shape", [(4, 1, 32, 32), (2, 1, 8, 32, 32)])
def test_blur_lowers_high_frequencies(shape: tuple[int, ...]) -> None:
    x = torch.rand(shape)
    out = Augment(len(shape) - 2, blur={"p": 1.0, "sigma": [1.0, 2.0]})(x, gen())
    assert hf_energy(out, -1) < 0.3 * hf_energy(x, -1)
    torch.testing.assert_close(out.mean(), x.mean(), rtol=0, atol=0.01)


def test_blur_3d_acts_across_z_only_when_isotropic() -> None:
    x, blur = z_only(), {"p": 1.0, "sigma": [1.0, 1.0]}
    torch.testing.assert_close(Augment(3, blur=blur)(x, gen()), x, rtol=0, atol=1e-6)
    iso = Augment(3, isotropic=True, blur=blur)(x, gen())
    assert hf_energy(iso, 2) < 0.5 * hf_energy(x, 2) and plane_spread(iso).max() < 1e-6


def test_elastic_changes_image_but_keeps_mean() -> None:
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    x = (0.5 + 0.4 * torch.sin(yy / 3) * torch.cos(xx / 4)).expand(4, 1, 64, 64).contiguous()
    out = Augment(2, elastic={"p": 1.0, "alpha": 4.0, "spacing": 16})(x, gen())
    assert ((out - x).abs().amax((1, 2, 3)) > 0.1).all()
    torch.testing.assert_close(out.mean((1, 2, 3)), x.mean((1, 2, 3)), rtol=0, atol=0.02)


def test_intensity_changes_values_monotonically() -> None:
    ramp = torch.linspace(0, 1, 32).expand(8, 1, 32, 32).contiguous()
    out = Augment(2, intensity={"p": 1.0})(ramp, gen())
    assert (out.diff(dim=-1) > 0).all() and not torch.allclose(out, ramp)


@pytest.mark.parametrize("kwargs,key", [
    ({"spatial_dims": 4}, "spatial_dims"),
    ({"flip": 1.5}, "flip"),
    ({"rot90": True}, "rot90"),
    ({"crop": {"scale": [0.5, 0.2]}}, "crop.scale"),
    ({"crop": {"scale": [0.0, 0.5]}}, "crop.scale"),
    ({"elastic": {"p": -0.1}}, "elastic.p"),
    ({"elastic": {"spacing": 0}}, "elastic.spacing"),
    ({"blur": {"sigmaa": [1, 2]}}, "sigmaa"),
    ({"blur": {"sigma": [0, 1]}}, "blur.sigma"),
    ({"noise": {"std": 0.1}}, "noise.std"),
    ({"intensity": {"gamma": [0.5, "a"]}}, "intensity.gamma"),
    ({"misaligned_section": 0.5}, "misaligned_section"),
])
def test_bad_config_names_the_key(kwargs: dict, key: str) -> None:
    kwargs = {"spatial_dims": 3, **kwargs}
    with pytest.raises(EmfmError, match=key):
        Augment(**kwargs)


def test_wrong_input_rank_raises() -> None:
    with pytest.raises(EmfmError, match="augment"):
        Augment(3)(torch.rand(2, 1, 16, 16))


def test_labels_follow_the_geometry_exactly_and_stay_integers() -> None:
    labels = torch.randint(0, 6, (4, 1, 8, 16, 16))
    images = labels.float()
    exact = Augment(3, isotropic=True, flip=0.5, rot90=1.0)
    out, moved = exact(images, torch.Generator().manual_seed(0), labels=labels)
    assert moved.dtype == labels.dtype and torch.equal(moved, out.round().long())
    assert not torch.equal(moved, labels)
    warped = Augment(3, elastic={"p": 1.0, "alpha": 3.0}, intensity={"p": 1.0})
    _, bent = warped(images, torch.Generator().manual_seed(1), labels=labels)
    assert set(bent.unique().tolist()) <= set(range(6)) and not torch.equal(bent, labels)
