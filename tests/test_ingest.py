"""Ingest: every input kind round-trips into OME-Zarr with values, dtype, shape, voxel size and a pyramid."""
from __future__ import annotations

from pathlib import Path

import h5py
import mrcfile
import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from emfm.data import sources as sources_mod
from emfm.data.ingest import ingest, write_ome_zarr
from emfm.data.sources import open_source
from emfm.data.synthetic import make_synthetic_em, save_synthetic
from emfm.data.volume import Volume
from emfm.errors import EmfmError
from tests.conftest import refusal


def _rand(shape, dtype=np.uint8, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.normal(100, 20, shape).astype(dtype)
    return rng.integers(0, min(np.iinfo(dtype).max, 4000), shape, endpoint=True).astype(dtype)


def _attrs(out: Path) -> dict:
    return dict(zarr.open_group(str(out), mode="r").attrs)


def _multiscale(out: Path) -> dict:
    a = _attrs(out)
    return (a["ome"] if "ome" in a else a)["multiscales"][0]


# ------------------------------------------------------------------------------ input kinds -> round trip
def _tiff3d(tmp: Path):
    a = _rand((6, 40, 50), np.uint16)
    p = tmp / "stack.tif"
    tifffile.imwrite(p, a, imagej=True, resolution=(1 / 4.0, 1 / 4.0),
                     metadata={"spacing": 40, "unit": "nm", "axes": "ZYX"})
    return str(p), a, (40.0, 4.0, 4.0)


def _tiff2d(tmp: Path):
    a = _rand((70, 90), np.float32)
    p = tmp / "image.tiff"
    tifffile.imwrite(p, a, photometric="minisblack")
    return str(p), a, None


def _tif_folder(tmp: Path):
    a = _rand((12, 30, 20), np.uint16)
    d = tmp / "slices"
    d.mkdir()
    for i, s in enumerate(a):                  # s1 .. s12: lexical order would put s10 after s1
        tifffile.imwrite(d / f"s{i + 1}.tif", s, photometric="minisblack")
    (d / "notes.txt").write_text("ignored")
    return str(d), a, None


def _png_folder(tmp: Path):
    a = _rand((3, 25, 33), np.uint8)
    d = tmp / "pngs"
    d.mkdir()
    for name, s in zip(["1.png", "2.png", "10.png"], a):
        Image.fromarray(s).save(d / name)
    return str(d), a, None


def _png16_folder(tmp: Path):
    a = _rand((2, 20, 24), np.uint16)
    d = tmp / "pngs16"
    d.mkdir()
    for i, s in enumerate(a):
        Image.fromarray(s).save(d / f"z{i}.png")
    return str(d), a, None


def _h5(tmp: Path):
    a = _rand((5, 33, 44), np.float32)
    p = tmp / "f.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("a/b", data=a, chunks=(1, 33, 44))
        f["a/b"].attrs["resolution"] = [30.0, 5.0, 5.0]
        f.create_dataset("other", data=np.zeros(3))
    return f"{p}:/a/b", a, (30.0, 5.0, 5.0)


def _mrc(tmp: Path):
    a = _rand((4, 30, 36), np.int16)
    p = tmp / "tomo.mrc"
    with mrcfile.new(p) as m:
        m.set_data(a)
        m.voxel_size = (21.0, 22.0, 23.0)          # x, y, z in Å
    return str(p), a, (2.3, 2.2, 2.1)


def _npy2d(tmp: Path):
    a = _rand((80, 60), np.uint8)
    p = tmp / "img.npy"
    np.save(p, a)
    return str(p), a, None


KINDS = [_tiff3d, _tiff2d, _tif_folder, _png_folder, _png16_folder, _h5, _mrc, _npy2d]


@pytest.mark.parametrize("make", KINDS, ids=lambda f: f.__name__.strip("_"))
def test_open_source_and_ingest_round_trip(tmp_path, make):
    path, a, vs = make(tmp_path)
    src = open_source(path)
    assert src.shape == a.shape and src.dtype == a.dtype
    assert src.voxel_size == (pytest.approx(vs) if vs else None)
    np.testing.assert_array_equal(src[1:3], a[1:3])
    np.testing.assert_array_equal(src[-1], a[-1])
    np.testing.assert_array_equal(src[:, 2:5], a[:, 2:5])
    src.close()

    out = ingest(path, tmp_path / "out.zarr", progress=False)
    v = Volume(out)
    assert v.shape == a.shape and v.dtype == a.dtype and v.ndim == a.ndim
    assert v.axes == "zyx"[-a.ndim:]
    assert v.voxel_size == pytest.approx(vs or (1.0,) * a.ndim)
    np.testing.assert_array_equal(v.read(), a)
    assert _attrs(out)["emfm"]["source"] == path


@pytest.mark.parametrize("fmt", [2, 3])
def test_pyramid_shapes_scales_and_mean_values(tmp_path, fmt):
    a = _rand((12, 130, 140), np.uint16)
    out = write_ome_zarr(a, tmp_path / "p.zarr", voxel_size=(40, 4, 4), zarr_format=fmt)
    ms = _multiscale(out)
    if fmt == 3:
        assert _attrs(out)["ome"]["version"] == "0.5"
        assert zarr.open_array(str(out / "0")).metadata.dimension_names == ("z", "y", "x")
    else:
        assert ms["version"] == "0.4" and "ome" not in _attrs(out)
    assert [d["path"] for d in ms["datasets"]] == ["0", "1", "2"]
    scales = [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
    assert scales == [[40, 4, 4], [40, 8, 8], [40, 16, 16]]
    assert [ax["name"] for ax in ms["axes"]] == ["z", "y", "x"]
    assert {ax["unit"] for ax in ms["axes"]} == {"nanometer"}
    assert [Volume(out, k).shape for k in range(3)] == [(12, 130, 140), (12, 65, 70), (12, 33, 35)]
    arr0 = zarr.open_array(str(out / "0"), mode="r")
    assert arr0.chunks == (8, 130, 140) and arr0.compressors and "zstd" in repr(arr0.compressors).lower()
    lvl1 = Volume(out, 1).read()
    expect = np.rint(a.reshape(12, 65, 2, 70, 2).mean(axis=(2, 4))).astype(np.uint16)
    np.testing.assert_array_equal(lvl1, expect)


def test_isotropic_pyramid_halves_z_and_anisotropic_waits(tmp_path):
    out = write_ome_zarr(_rand((64, 64, 64)), tmp_path / "iso.zarr", voxel_size=(8, 8, 8))
    assert Volume(out, 1).shape == (32, 32, 32) and Volume(out, 1).voxel_size == (16, 16, 16)
    out = write_ome_zarr(_rand((16, 256, 256)), tmp_path / "an.zarr", voxel_size=(20, 4, 4), levels=4)
    assert [Volume(out, k).voxel_size[0] for k in range(4)] == [20, 20, 20, 40]    # z joins once xy reach 16
    assert Volume(out, 3).shape == (8, 32, 32)


def test_2d_pyramid_and_levels_option(tmp_path):
    out = write_ome_zarr(_rand((300, 200)), tmp_path / "2d.zarr", voxel_size=(2, 2), levels=2)
    assert Volume(out).levels == 2 and Volume(out, 1).shape == (150, 100) and Volume(out, 1).axes == "yx"


@pytest.mark.parametrize("fmt", [2, 3])
def test_label_ingest_keeps_ids_and_pyramid_never_invents(tmp_path, fmt):
    lab = np.random.default_rng(1).choice([0, 7, 70000, 123456], size=(9, 100, 90)).astype(np.uint32)
    p = tmp_path / "lab.npy"
    np.save(p, lab)
    out = ingest(p, tmp_path / "lab.zarr", is_label=True, zarr_format=fmt, progress=False)
    v = Volume(out)
    assert v.is_label and v.dtype == np.uint32 and _attrs(out)["emfm"]["kind"] == "labels"
    np.testing.assert_array_equal(v.read(), lab)
    lvl1 = Volume(out, 1).read()
    assert set(np.unique(lvl1)) <= set(np.unique(lab))
    np.testing.assert_array_equal(lvl1, lab[::2, ::2, ::2])    # voxel size 1 everywhere: isotropic
    assert "normalization" not in _attrs(out)["emfm"]


def test_mask_images_become_0_1_labels_cut_at_half_range(tmp_path):
    """Anti-aliased masks (255 = structure, greys at the edges) as in the Drosophila VNC release."""
    d = tmp_path / "masks"
    d.mkdir()
    planes = [np.array([[0, 127, 128, 255] * 2] * 3, np.uint8), np.array([[255, 3, 200, 0] * 2] * 3, np.uint8)]
    for i, plane in enumerate(planes):
        Image.fromarray(plane).save(d / f"{i}.png")
    v = Volume(ingest(d, tmp_path / "m.zarr", mask=True, progress=False))
    assert v.is_label and v.dtype == np.uint8
    np.testing.assert_array_equal(v.read(), np.stack(planes) >= 128)


def test_float_labels_with_integer_values_are_cast_and_fractional_refused(tmp_path):
    lab = np.random.default_rng(2).integers(0, 5, (4, 20, 20)).astype(np.float32)
    v = Volume(write_ome_zarr(lab, tmp_path / "f.zarr", is_label=True))
    assert v.dtype.kind == "u"
    np.testing.assert_array_equal(v.read(), lab)
    lab[2, 3, 3] = 0.5
    with pytest.raises(EmfmError, match="non-integer.*slice 2"):
        write_ome_zarr(lab, tmp_path / "g.zarr", is_label=True)


@pytest.mark.parametrize("fmt", [2, 3])
def test_labels_written_as_ngff_label_images(tmp_path, fmt):
    raw = _rand((6, 80, 80))
    mem = (raw > 100).astype(np.uint8)
    out = write_ome_zarr(raw, tmp_path / "r.zarr", labels={"membranes": mem}, zarr_format=fmt)
    la = dict(zarr.open_group(str(out / "labels"), mode="r").attrs)
    assert (la["ome"]["labels"] if fmt == 3 else la["labels"]) == ["membranes"]
    ga = dict(zarr.open_group(str(out / "labels" / "membranes"), mode="r").attrs)
    assert "image-label" in (ga["ome"] if fmt == 3 else ga)
    v = Volume(out / "labels" / "membranes")
    assert v.is_label and v.levels == Volume(out).levels
    np.testing.assert_array_equal(v.read(), mem)
    with pytest.raises(EmfmError, match="labels 'bad'.*shape"):
        write_ome_zarr(raw, tmp_path / "s.zarr", labels={"bad": mem[:3]})


@pytest.mark.parametrize("fmt", [2, 3])
def test_output_readable_by_ome_zarr(tmp_path, fmt):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    out = write_ome_zarr(_rand((5, 130, 70)), tmp_path / "o.zarr", voxel_size=(30, 3, 3), zarr_format=fmt,
                         labels={"cells": np.ones((5, 130, 70), np.uint16)})
    loc = parse_url(str(out))
    assert loc.fmt.version == ("0.5" if fmt == 3 else "0.4")
    nodes = list(Reader(loc)())
    image = nodes[0]
    assert [d.shape for d in image.data] == [(5, 130, 70), (5, 65, 35)]
    assert [ax["name"] for ax in image.metadata["axes"]] == ["z", "y", "x"]
    assert image.metadata["coordinateTransformations"][1][0]["scale"] == [30, 6, 6]
    assert any(n.zarr.path.endswith("labels/cells") and n.data[0].shape == (5, 130, 70) for n in nodes)


def test_intensity_normalization_stored_at_write_time(tmp_path):
    a = _rand((4, 50, 50), np.uint16)
    out = write_ome_zarr(a, tmp_path / "n.zarr")
    norm = _attrs(out)["emfm"]["normalization"]
    assert norm["percentiles"] == [1.0, 99.5]
    assert norm["values"] == pytest.approx(list(np.percentile(a, [1.0, 99.5])))


# -------------------------------------------------------------------------------------------- bad inputs
def test_missing_and_unsupported_inputs(tmp_path):
    with pytest.raises(EmfmError, match="no such file or folder"):
        open_source(tmp_path / "nope.tif")
    (tmp_path / "x.xyz").write_text("?")
    with pytest.raises(EmfmError, match="unsupported.*TIFF"):
        open_source(tmp_path / "x.xyz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmfmError, match="no .* slices"):
        open_source(tmp_path / "empty")
    h5 = _h5(tmp_path)[0].split(":")[0]
    with pytest.raises(EmfmError, match="no dataset '/zz'.*/a/b"):
        open_source(h5 + ":/zz")


def test_folder_with_odd_slice_names_the_file(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    for i in range(3):
        tifffile.imwrite(d / f"{i}.tif", np.zeros((10, 12), np.uint8))
    tifffile.imwrite(d / "3.tif", np.zeros((10, 13), np.uint8))
    with pytest.raises(EmfmError, match=r"3\.tif.*\(10, 13\).*\(10, 12\)"):
        open_source(d)


def test_colour_pngs_grey_ok_real_colour_refused(tmp_path):
    g = _rand((20, 30))
    Image.fromarray(np.stack([g] * 3, -1)).save(tmp_path / "grey_rgb.png")
    Image.fromarray(np.stack([g, g], -1), mode="LA").save(tmp_path / "grey_la.png")
    for name in ("grey_rgb.png", "grey_la.png"):
        np.testing.assert_array_equal(open_source(tmp_path / name)[:], g)
    Image.fromarray(np.stack([g, g // 2, g], -1)).save(tmp_path / "colour.png")
    with pytest.raises(EmfmError, match="single-channel"):
        open_source(tmp_path / "colour.png")[:]
    np.save(tmp_path / "rgb.npy", np.zeros((30, 40, 3), np.uint8))
    with pytest.raises(EmfmError, match="single-channel"):
        open_source(tmp_path / "rgb.npy")


def test_nan_in_float_raw_names_slice(tmp_path):
    a = _rand((20, 16, 16), np.float32)
    a[13, 2, 2] = np.nan
    np.save(tmp_path / "nan.npy", a)
    with pytest.raises(EmfmError, match=r"nan\.npy.*NaN/Inf.*slice 13"):
        ingest(tmp_path / "nan.npy", tmp_path / "nan.zarr", progress=False)
    assert not list(tmp_path.glob("nan.zarr*"))


def test_existing_output_axes_and_voxel_size_checked(tmp_path):
    a = _rand((4, 20, 20))
    np.save(tmp_path / "a.npy", a)
    out = ingest(tmp_path / "a.npy", tmp_path / "a.zarr", progress=False)
    with pytest.raises(EmfmError, match="a.zarr exists; pass --overwrite"):
        ingest(tmp_path / "a.npy", out, progress=False)
    with pytest.raises(EmfmError, match="axes 'yx'"):
        ingest(tmp_path / "a.npy", tmp_path / "b.zarr", axes="yx", progress=False)
    with pytest.raises(EmfmError, match="axes 'zyq'"):
        write_ome_zarr(a, tmp_path / "b.zarr", axes="zyq")
    with pytest.raises(EmfmError, match="voxel_size"):
        write_ome_zarr(a, tmp_path / "b.zarr", voxel_size=(1, 2))
    with pytest.raises(EmfmError, match="zarr_format"):
        write_ome_zarr(a, tmp_path / "b.zarr", zarr_format=4)
    assert Volume(write_ome_zarr(a, tmp_path / "c.zarr", axes="zxy")).axes == "zxy"


# -------------------------------------------------------------------------------- atomicity, out of core
class _Counting:
    """Array-like that records the largest request and can fail on a late slab."""

    def __init__(self, a: np.ndarray, fail_at: int | None = None) -> None:
        self.a, self.shape, self.dtype, self.fail_at, self.max_elems, self.calls = a, a.shape, a.dtype, fail_at, 0, 0

    def __getitem__(self, key):
        out = self.a[key]
        self.calls += 1
        self.max_elems = max(self.max_elems, out.size)
        if self.fail_at is not None and key.start >= self.fail_at:
            raise RuntimeError("disk on fire")
        return out


def test_failed_write_leaves_nothing_and_overwrite_keeps_old_until_done(tmp_path):
    a = _rand((24, 40, 40))
    out = tmp_path / "at.zarr"
    with pytest.raises(EmfmError, match=r"^_Counting: cannot read slices 16:24 \(RuntimeError: disk on fire\)$"):
        write_ome_zarr(_Counting(a, fail_at=16), out)
    assert not out.exists() and list(tmp_path.iterdir()) == []

    write_ome_zarr(a, out)
    with pytest.raises(EmfmError, match="disk on fire"):
        write_ome_zarr(_Counting(a + 1, fail_at=16), out, overwrite=True)
    np.testing.assert_array_equal(Volume(out).read(), a)          # old output intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["at.zarr"]

    write_ome_zarr(a + 1, out, overwrite=True)
    np.testing.assert_array_equal(Volume(out).read(), a + 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["at.zarr"]


def test_level0_written_in_slabs_not_whole_volume(tmp_path):
    a = _rand((40, 96, 80), np.uint16)
    src = _Counting(a)
    out = write_ome_zarr(src, tmp_path / "ooc.zarr", chunks=(4, 32, 32))
    assert src.max_elems == 4 * 96 * 80 < a.size and src.calls == 10
    np.testing.assert_array_equal(Volume(out).read(), a)


def test_folder_source_reads_only_requested_slices(tmp_path, monkeypatch):
    path, a, _ = _tif_folder(tmp_path)
    read = []
    orig = sources_mod._read_slice
    monkeypatch.setattr(sources_mod, "_read_slice", lambda f: read.append(f.name) or orig(f))
    src = open_source(path)
    assert read == []                                               # headers only at open
    np.testing.assert_array_equal(src[9:11], a[9:11])
    assert read == ["s10.tif", "s11.tif"]


def test_tiff_variants_rgb_planar_imagej2d_and_big_endian(tmp_path):
    g = _rand((3, 20, 30))
    tifffile.imwrite(tmp_path / "rgb.tif", np.stack([g] * 3, -1), photometric="rgb")
    with open_source(tmp_path / "rgb.tif") as src:
        np.testing.assert_array_equal(src[:], g)
    tifffile.imwrite(tmp_path / "planar.tif", g, photometric="rgb", planarconfig="separate")
    with pytest.raises(EmfmError, match="3 samples per pixel; single-channel expected"):
        open_source(tmp_path / "planar.tif")
    tifffile.imwrite(tmp_path / "ij.tif", g[0], imagej=True, resolution=(200, 200), metadata={"unit": "micron"})
    assert open_source(tmp_path / "ij.tif").voxel_size == pytest.approx((5.0, 5.0))
    np.save(tmp_path / "be.npy", g.astype(">u2"))
    v = Volume(write_ome_zarr(open_source(tmp_path / "be.npy"), tmp_path / "be.zarr"))
    assert v.dtype == np.dtype("u2") and v.dtype.isnative
    np.testing.assert_array_equal(v.read(), g)


def test_voxel_size_in_micrometres_is_written_in_micrometres(tmp_path):
    np.save(tmp_path / "um.npy", _rand((4, 64, 64)))
    out = ingest(tmp_path / "um.npy", tmp_path / "um.zarr", voxel_size=(0.04, 0.008, 0.008), unit="micrometer",
                 progress=False)
    v = Volume(out)
    assert v.units == ("micrometer",) * 3 and v.voxel_size == pytest.approx((0.04, 0.008, 0.008))
    with pytest.raises(EmfmError, match=r"unit 'micrometer' applies to a given voxel size"):
        ingest(tmp_path / "um.npy", tmp_path / "other.zarr", unit="micrometer", progress=False)


@pytest.mark.parametrize("cut", [0.2, 0.5, 0.9])
def test_a_tiff_stack_cut_short_is_refused_with_the_pages_found(tmp_path, run_cli, cut):
    """An interrupted copy of a 16-slice stack was ingested as one slice (tifffile reads the pages it finds), and with
    --voxel-size the error blamed the voxel size. The ImageJ stack `emfm synth` writes declares 16 pages; a stack
    without metadata says so only by its chain of page headers, which runs past the end."""
    whole = {"imagej": save_synthetic(make_synthetic_em((16, 64, 64), seed=0), tmp_path / "synth.tif"),
             "plain": tmp_path / "plain.tif"}
    tifffile.imwrite(whole["plain"], _rand((16, 64, 64)), metadata=None)
    cases, expected = [], []
    for name, path in whole.items():
        short = tmp_path / f"{name}_cut.tif"
        short.write_bytes(path.read_bytes()[:int(cut * path.stat().st_size)])
        found = "1 of 16 pages found" if name == "imagej" else "1 whole page found, the rest lies past its end"
        for flags in ([], ["--voxel-size", "50", "4", "4"]):
            cases.append((["ingest", str(short), "--out", str(tmp_path / f"{name}{len(flags)}.zarr"), *flags], None))
            expected.append(f"{short}: truncated at {short.stat().st_size} bytes: {found} (an interrupted copy or "
                            f"download?)")
    for out, message in zip(run_cli(cases), expected):
        assert refusal(out) == message
        assert not Path(out.args[3]).exists()
