"""Volume: lazy, picklable reads of plain zarr and OME-Zarr, with normalisation computed once and cached (in the
store emfm ingested, or in emfm's cache folder: never in an input)."""
from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from emfm import run
from emfm.data import volume as volume_mod
from emfm.data.ingest import write_ome_zarr
from emfm.data.volume import Volume
from emfm.errors import EmfmError
from tests.conftest import TINY_PRETRAIN, file_hashes, refusal, tiny


def _rand(shape, dtype=np.uint16, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, shape).astype(dtype)


def _plain(path, a, fmt=3, chunks=None, **kw):
    arr = zarr.open_array(str(path), mode="w", shape=a.shape, chunks=chunks or a.shape, dtype=a.dtype,
                          zarr_format=fmt, **kw)
    arr[...] = a
    return arr


@pytest.mark.parametrize("fmt", [2, 3])
def test_plain_array(tmp_path, fmt):
    a = _rand((5, 30, 40))
    _plain(tmp_path / "a.zarr", a, fmt, chunks=(2, 16, 16))
    v = Volume(tmp_path / "a.zarr")
    assert (v.shape, v.ndim, v.axes, v.dtype, v.chunks) == ((5, 30, 40), 3, "zyx", np.uint16, (2, 16, 16))
    assert v.levels == 1 and v.voxel_size is None and not v.is_label
    np.testing.assert_array_equal(v.read((slice(1, 3), slice(None), slice(5, 9))), a[1:3, :, 5:9])
    np.testing.assert_array_equal(v[1], a[1])


def test_plain_2d_and_singleton_channel_squeezed(tmp_path):
    _plain(tmp_path / "2d.zarr", _rand((30, 40)))
    assert Volume(tmp_path / "2d.zarr").axes == "yx"
    a = _rand((1, 4, 20, 20))
    _plain(tmp_path / "c.zarr", a, dimension_names=("c", "z", "y", "x"))
    v = Volume(tmp_path / "c.zarr")
    assert (v.shape, v.axes) == ((4, 20, 20), "zyx")
    np.testing.assert_array_equal(v.read((slice(0, 2),)), a[0, :2])


@pytest.mark.parametrize("fmt", [2, 3])
def test_ome_levels_and_voxel_size(tmp_path, fmt):
    a = _rand((8, 128, 96))
    out = write_ome_zarr(a, tmp_path / "o.zarr", voxel_size=(50, 5, 5), zarr_format=fmt)
    v = Volume(out)
    assert (v.shape, v.axes, v.voxel_size, v.levels) == ((8, 128, 96), "zyx", (50, 5, 5), 2)
    np.testing.assert_array_equal(v.read(), a)
    v1 = Volume(out, level=1)
    assert (v1.shape, v1.voxel_size) == ((8, 64, 48), (50, 10, 10))
    with pytest.raises(EmfmError, match="level 2 not available; levels: 0, 1"):
        Volume(out, level=2)


@pytest.mark.parametrize("fmt", [2, 3])
def test_ome_channel_axis(tmp_path, fmt):
    def make(nc):
        g = zarr.open_group(str(tmp_path / f"c{nc}.zarr"), mode="w", zarr_format=fmt)
        g.create_array("0", shape=(nc, 4, 16, 16), chunks=(1, 4, 16, 16), dtype="u1")[...] = 3
        ms = {"axes": [{"name": "c", "type": "channel"}] + [{"name": n, "type": "space"} for n in "zyx"],
              "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 9, 2, 2]}]}]}
        g.attrs.update({"ome": {"version": "0.5", "multiscales": [ms]}} if fmt == 3
                       else {"multiscales": [dict(ms, version="0.4")]})
        return tmp_path / f"c{nc}.zarr"

    v = Volume(make(1))
    assert (v.shape, v.voxel_size, v.read().max()) == ((4, 16, 16), (9, 2, 2), 3)
    with pytest.raises(EmfmError, match="non-singleton 'c'.*single-channel"):
        Volume(make(2))


def test_errors(tmp_path):
    with pytest.raises(EmfmError, match=f"{tmp_path}/missing.zarr: no such file or folder"):
        Volume(tmp_path / "missing.zarr")
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    with pytest.raises(EmfmError, match="no zarr array or OME-Zarr image found"):
        Volume(tmp_path / "g.zarr")
    _plain(tmp_path / "4d.zarr", _rand((2, 3, 8, 8)))
    with pytest.raises(EmfmError, match="single-channel"):
        Volume(tmp_path / "4d.zarr")
    _plain(tmp_path / "a.zarr", _rand((3, 8, 8)))
    with pytest.raises(EmfmError, match="level 1 not available"):
        Volume(tmp_path / "a.zarr", level=1)


def test_nan_read_raises_but_clean_region_reads(tmp_path):
    a = np.ones((4, 10, 10), np.float32)
    a[3, 5, 5] = np.nan
    _plain(tmp_path / "f.zarr", a)
    v = Volume(tmp_path / "f.zarr")
    assert v.read((slice(0, 3),)).sum() == 300
    with pytest.raises(EmfmError, match=r"f\.zarr.*NaN/Inf.*region"):
        v.read((slice(2, 4),))
    with pytest.raises(EmfmError, match=r"f\.zarr.*NaN/Inf"):
        v.normalization()


def test_normalization_of_a_foreign_store_is_cached_outside_it(tmp_path, monkeypatch):
    monkeypatch.setenv("EMFM_CACHE_DIR", str(tmp_path / "cache"))
    a = _rand((6, 50, 50))
    arr = _plain(tmp_path / "n.zarr", a)
    arr.attrs["emfm"] = {"source": "keep me"}
    before = file_hashes(tmp_path / "n.zarr")
    lo, hi = Volume(tmp_path / "n.zarr").normalization()
    assert (lo, hi) == pytest.approx(tuple(np.percentile(a, volume_mod.NORM_PERCENTILES)))
    assert file_hashes(tmp_path / "n.zarr") == before                  # the input is never written
    [cached] = (tmp_path / "cache" / "normalization").iterdir()
    assert json.loads(cached.read_text()) == {"input": str((tmp_path / "n.zarr").resolve()),
                                              "percentiles": [1.0, 99.5], "values": [lo, hi]}

    def boom(_vol):
        raise AssertionError("recomputed")

    monkeypatch.setattr(volume_mod, "compute_normalization", boom)
    v = Volume(tmp_path / "n.zarr")
    assert v.normalization() == (lo, hi)
    x = v.normalize(a[:2])
    assert x.dtype == np.float32 and np.allclose(x, (a[:2] - lo) / (hi - lo))
    monkeypatch.undo()
    monkeypatch.setenv("EMFM_CACHE_DIR", str(tmp_path / "cache"))
    _plain(tmp_path / "n.zarr", a * 2)                                  # rewritten: measured afresh
    assert Volume(tmp_path / "n.zarr").normalization() == pytest.approx((2 * lo, 2 * hi))
    assert len(list((tmp_path / "cache" / "normalization").iterdir())) == 2


def test_bad_cache_file_is_refused_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("EMFM_CACHE_DIR", str(tmp_path / "cache"))
    _plain(tmp_path / "n.zarr", _rand((3, 20, 20)))
    Volume(tmp_path / "n.zarr").normalization()
    [cached] = (tmp_path / "cache" / "normalization").iterdir()
    cached.write_text(json.dumps({"percentiles": [1.0, 99.5], "values": [5, 5]}))
    with pytest.raises(EmfmError, match=rf"{cached}: values is \[5, 5\]; .* delete the file to have it recomputed"):
        Volume(tmp_path / "n.zarr").normalization()


@pytest.mark.parametrize("values", [[7.0, 7.0], [9.0, 2.0], ["1", "200"], [1.0], "auto", [True, 5], None])
def test_bad_cached_normalization_is_refused_naming_store_and_key(tmp_path, compose_config, values):
    # Equal values used to divide by zero (train/loss=nan, exit 0); strings and lists of one raised a traceback.
    out = write_ome_zarr(_rand((6, 50, 50)), tmp_path / "n.zarr")
    group = zarr.open_group(str(out), mode="r+")
    group.attrs["emfm"] = {**group.attrs["emfm"], "normalization": {"percentiles": [1.0, 99.5], "values": values}}
    match = r"n\.zarr: attribute emfm\.normalization\.values is .*; expected two finite numbers low < high"
    with pytest.raises(EmfmError, match=match):
        Volume(out).normalization()
    cfg = compose_config("pretrain", [*tiny(), f"data.volumes=[{out}]", "trainer.max_steps=2"])
    with pytest.raises(EmfmError, match=match):
        run.pretrain(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_normalization_uses_coarse_level_and_bounded_sample(tmp_path, monkeypatch):
    a = _rand((8, 512, 512), np.uint8)     # 2.1e6 voxels at level 0, 5e5 at level 1
    out = write_ome_zarr(a, tmp_path / "big.zarr", voxel_size=(40, 4, 4), chunks=(4, 64, 64), levels=2)
    seen = []
    orig = volume_mod._sample_chunks
    monkeypatch.setattr(volume_mod, "_sample_chunks", lambda v: seen.append(v.level) or orig(v))
    monkeypatch.setattr(volume_mod, "NORM_SAMPLE_VOXELS", 100_000)   # forces random chunk sampling
    lo, hi = volume_mod.compute_normalization(Volume(out))
    assert seen == [0]                      # level 1 is below NORM_MIN_VOXELS
    true = np.percentile(a, volume_mod.NORM_PERCENTILES)
    assert abs(lo - true[0]) <= 3 and abs(hi - true[1]) <= 3
    monkeypatch.setattr(volume_mod, "NORM_MIN_VOXELS", 400_000)
    volume_mod.compute_normalization(Volume(out))
    assert seen == [0, 1]


def test_constant_and_label_volumes(tmp_path):
    _plain(tmp_path / "c.zarr", np.full((3, 9, 9), 7, np.uint8))
    assert Volume(tmp_path / "c.zarr").normalization() == (7.0, 8.0)
    out = write_ome_zarr(np.ones((3, 9, 9), np.uint8), tmp_path / "l.zarr", is_label=True)
    with pytest.raises(EmfmError, match="label volume"):
        Volume(out).normalization()


def test_unwritable_cache_keeps_normalization_in_memory(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("EMFM_CACHE_DIR", str(tmp_path / "file" / "cache"))    # cannot be created
    a = _rand((3, 20, 20))
    _plain(tmp_path / "ro.zarr", a)
    before = file_hashes(tmp_path / "ro.zarr")
    v = Volume(tmp_path / "ro.zarr")
    np.testing.assert_array_equal(v.read(), a)
    assert v.normalization() == pytest.approx(tuple(np.percentile(a, volume_mod.NORM_PERCENTILES)))
    assert file_hashes(tmp_path / "ro.zarr") == before


def test_pickle_after_read_is_small_and_reopens(tmp_path):
    a = _rand((16, 64, 64))
    out = write_ome_zarr(a, tmp_path / "p.zarr", voxel_size=(30, 4, 4))
    v = Volume(out, level=1)
    v.read((slice(0, 4),))
    blob = pickle.dumps(v)
    assert len(blob) < 2000
    w = pickle.loads(blob)
    assert w._array is None and w.shape == v.shape and w.voxel_size == v.voxel_size
    np.testing.assert_array_equal(w.read(), v.read())


@pytest.mark.parametrize("fmt", [2, 3])
def test_absent_chunks_are_looked_for_where_the_store_should_hold_them(tmp_path, caplog, fmt):
    """zarr reads an absent chunk as the fill value, and writers (zarr by default, emfm before ingest marked its
    stores) leave out the chunks that hold only it: a lost chunk looks the same. Ingest writes and marks every
    chunk, so there an absent one was lost; of another tool's store nobody can say, so a read warns, once; a store
    emfm wrote without the mark is read as it is."""
    a = np.zeros((16, 32, 32), np.uint16)
    a[:8] = _rand((8, 32, 32))
    chunk = "1/0/0" if fmt == 2 else "c/1/0/0"                        # slices 8-15: zeros only
    first, plain = ("0.0.0", "1.0.0") if fmt == 2 else ("c/0/0/0", chunk)   # zarr's own v2 keys have dots
    ingested = write_ome_zarr(a, tmp_path / "i.zarr", chunks=(8, 32, 32), levels=1, zarr_format=fmt)
    assert (ingested / "0" / chunk).is_file()                        # the chunk of zeros is stored too
    other = tmp_path / "other.zarr"
    _plain(other, a, fmt, chunks=(8, 32, 32))
    assert (other / first).is_file() and not (other / plain).exists()   # zarr leaves the zeros out
    unmarked = Path(shutil.copytree(ingested, tmp_path / "unmarked.zarr"))
    group = zarr.open_group(str(unmarked), mode="r+")
    group.attrs["emfm"] = {k: v for k, v in group.attrs["emfm"].items() if k != "every_chunk"}
    for store in (unmarked, ingested):
        (store / "0" / chunk).unlink()
    caplog.set_level("WARNING", logger="emfm.data.volume")
    for path, policy in [(unmarked, "warn"), (other, "warn"), (other, "warn"), (other, "fill")]:
        np.testing.assert_array_equal(Volume(path, missing_chunks=policy).read(), a)
    assert [r.getMessage() for r in caplog.records] == [
        f"{other}: 1 chunk of region [:] is missing from the store (e.g. {plain}); read as the fill value 0: an "
        f"incomplete copy? (said once; missing_chunks=error refuses such reads, missing_chunks=fill reads them "
        f"silently)"]
    with pytest.raises(EmfmError, match=rf"i\.zarr: 1 chunk of region \[8:16\] is missing from the store \(e\.g\. "
                                        rf"0/{chunk}\): an incomplete copy\? Copy the store again, or set "
                                        rf"missing_chunks=warn to read absent chunks as the fill value 0$"):
        Volume(ingested, missing_chunks="error").read((slice(8, 16),))
    with pytest.raises(EmfmError, match=r"missing_chunks=skip: expected warn \(.*\), error \(.*\) or fill"):
        Volume(ingested, missing_chunks="skip")


def test_a_chunk_lost_from_a_store_is_said_once_in_a_run_or_refused(tmp_path, run_cli):
    """The user's case: a zarr v2 store (ingest --zarr-format 2) copied without one of its chunks trained on zeros
    without a word. Pretraining on it says so once, naming the store and a chunk; missing_chunks=error refuses it.
    The store is left as it was."""
    store = write_ome_zarr(_rand((16, 64, 64)), tmp_path / "raw.zarr", chunks=(8, 64, 64), levels=1, zarr_format=2)
    (store / "0" / "1" / "0" / "0").unlink()
    before = file_hashes(store)
    pretrain = ["pretrain", *TINY_PRETRAIN, f"data.volumes=[{store}]", "trainer.max_steps=2", "logger=none"]
    warned, refused = run_cli([([*pretrain, f"hydra.run.dir={tmp_path / 'a'}"], None),
                               ([*pretrain, "missing_chunks=error", f"hydra.run.dir={tmp_path / 'b'}"], None)])
    assert warned.returncode == 0, warned.stderr[-3000:]
    said = [line for line in (warned.stdout + warned.stderr).splitlines() if "missing from the store" in line]
    region = r"1 chunk of region \[[0-9:, ]+\] is missing from the store \(e\.g\. 0/1/0/0\)"
    assert len(said) == 1 and re.search(rf"{re.escape(str(store))}: {region}; read as the fill value 0", said[0])
    assert re.fullmatch(rf"{re.escape(str(store))}: {region}: an incomplete copy\? .*", refusal(refused))
    assert file_hashes(store) == before
