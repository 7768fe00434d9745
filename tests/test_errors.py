"""Bad inputs a new user will give, through the real command line: each exits with status 2 and one line
naming the file, key or value at fault, never a traceback (EmfmError, emfm/errors.py)."""

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
import zarr

from emfm.data.ingest import write_ome_zarr
from emfm.export import export_encoder
from tests.conftest import TINY_FINETUNE, TINY_PRETRAIN, CommandLine


def damaged_tiffs(folder: Path) -> tuple[Path, Path]:
    """A zlib-compressed stack whose page 2 holds garbage, and a stack cut in half (an interrupted copy)."""
    stack = np.random.default_rng(0).integers(0, 255, (4, 64, 64)).astype(np.uint8)
    corrupt, whole, truncated = folder / "corrupt.tif", folder / "whole.tif", folder / "truncated.tif"
    tifffile.imwrite(corrupt, stack, compression="zlib", photometric="minisblack")
    with tifffile.TiffFile(corrupt) as tif:
        start, size = tif.pages[2].dataoffsets[0], tif.pages[2].databytecounts[0]
    data = bytearray(corrupt.read_bytes())
    data[start:start + size] = bytes(b ^ 0x5A for b in data[start:start + size])
    corrupt.write_bytes(bytes(data))
    tifffile.imwrite(whole, stack, photometric="minisblack")
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return corrupt, truncated


def malformed(base: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """Copies of an OME-Zarr image with one attribute broken in each of the ways users (and tools) break them,
    and the start of the message naming it."""
    attrs = dict(zarr.open_group(str(base), mode="r").attrs)
    ms = attrs["ome"]["multiscales"][0]
    broken = {
        "multiscales a string": ({**attrs, "ome": {**attrs["ome"], "multiscales": "0"}},
                                 "malformed attributes: multiscales is '0', expected a list of objects"),
        "multiscales a list of strings": ({**attrs, "ome": {**attrs["ome"], "multiscales": ["0"]}},
                                          "malformed attributes: multiscales is ['0'], expected a list of objects"),
        "ome a string": ({**attrs, "ome": "0.5"}, "malformed attributes: ome is '0.5', expected an object"),
        "axes without name": ({**attrs, "ome": {**attrs["ome"], "multiscales": [
            {**ms, "axes": [{"type": "space"}] * 3}]}}, "malformed attributes: multiscales[0].axes is"),
        "emfm a string": ({**attrs, "emfm": "image"}, "malformed attributes: emfm is 'image', expected an object"),
        "non-numeric normalisation": ({**attrs, "emfm": {**attrs["emfm"], "normalization": {
            "percentiles": [1.0, 99.5], "values": ["low", "high"]}}}, "attribute emfm.normalization.values is"),
        "non-numeric scale": ({**attrs, "ome": {**attrs["ome"], "multiscales": [{**ms, "datasets": [
            {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": "big"}]}]}]}},
            "malformed attributes: multiscales[0].datasets[0].coordinateTransformations scale is 'big', expected 3 "
            "positive numbers"),
    }
    paths = {}
    for key, (new, message) in broken.items():
        path = folder / f"bad_{len(paths)}.zarr"
        shutil.copytree(base, path)
        (path / "zarr.json").write_text(json.dumps({**json.loads((path / "zarr.json").read_text()),
                                                    "attributes": new}))
        paths[key] = (path, message)
    return paths


def broken_exports(checkpoint: Path, folder: Path) -> dict[str, Path]:
    """Copies of a real export with a damaged weights file, foreign weights, bad JSON, a model key timm would obey."""
    good = export_encoder(checkpoint, folder / "export")
    cases = {}
    for name in ("truncated", "pickle", "json", "checkpoint_path"):
        cases[name] = Path(shutil.copytree(good, folder / f"export_{name}"))
    weights = cases["truncated"] / "encoder.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    torch.save({"w": torch.zeros(2)}, cases["pickle"] / "encoder.safetensors")
    (cases["json"] / "config.json").write_text('{"format": "emfm-encoder/1", "model": ')
    config = json.loads((good / "config.json").read_text())
    config["model"]["checkpoint_path"] = str(checkpoint)      # timm would load any file named here
    (cases["checkpoint_path"] / "config.json").write_text(json.dumps(config))
    return cases


# k as typed on the command line, as the message shows it, and the hint: Hydra reads k='3' as text, refused as
# text is for every whole-number key, with the way to write it.
BAD_K = [("1", "1", ""), ("a", "'a'", ""), ("null", "null", ""), ("[3]", "[3]", ""), ("2.5", "2.5", ""),
         ("'3'", "'3'", " (write k=3, unquoted)")]


@pytest.fixture(scope="module")
def results(synth_zarr: Path, vit_checkpoint: Path, two_step_finetuned: Callable[[str], Path],
            tmp_path_factory: pytest.TempPathFactory, run_cli: CommandLine) -> dict:
    """Every case of the table, run once: {name: (expected start of the message, completed process)}."""
    tmp = tmp_path_factory.mktemp("errors")
    corrupt, truncated = damaged_tiffs(tmp)
    not_a_dict = tmp / "list.ckpt"
    torch.save([torch.zeros(1)], not_a_dict)
    blocker = tmp / "a_file"
    blocker.write_text("not a folder")
    pixels = np.random.default_rng(0).integers(0, 255, (4, 32, 32), dtype=np.uint8)
    image, npy = write_ome_zarr(pixels, tmp / "image.zarr"), tmp / "image.npy"
    np.save(npy, pixels)
    exports = broken_exports(vit_checkpoint, tmp)
    features = [f"checkpoint={vit_checkpoint}", f"input={synth_zarr}", "progress=false", f"hydra.run.dir={tmp}/run"]
    pretrain = [*TINY_PRETRAIN, "trainer.max_steps=1", f"hydra.run.dir={tmp}/pretrain"]
    cluster = [f"input={synth_zarr}", f"output={tmp}/clusters.zarr", "progress=false", f"hydra.run.dir={tmp}/run"]
    table: dict[str, tuple[list[str], int | None, Any]] = {   # name: (argv, max file size, the error line's start)
        "corrupt TIFF data": (["ingest", str(corrupt), "--out", f"{tmp}/c.zarr"], None,
                              f"{corrupt} page 2: cannot decode the image data"),
        "truncated TIFF": (["ingest", str(truncated), "--out", f"{tmp}/t.zarr"], None, f"{truncated}: truncated"),
        "output folder not creatable": (["ingest", str(npy), "--out", f"{blocker}/x.zarr"], None,
                                        f"cannot write {blocker}/x.zarr ({blocker}: File exists)"),
        "full disk": (["ingest", str(npy), "--out", f"{tmp}/full.zarr"], 300,
                      f"cannot write {tmp}/full.zarr (File too large)"),
        "synth into .h5": (["synth", "--out", f"{tmp}/x.h5", "--shape", "4", "32", "32"], None,
                           f"--out {tmp}/x.h5: expected a .zarr path"),
        "export of a non-dict": (["export", str(not_a_dict), f"{tmp}/e"], None, f"{not_a_dict}: holds a list"),
        "export --overwrite onto a file": (["export", str(vit_checkpoint), str(blocker), "--overwrite"], None,
                                           f"out_dir={blocker} is a file"),
        "predict without arguments": (["predict"], None, "missing required keys checkpoint, input, output"),
        "predict with a non-dict": (["predict", f"checkpoint={not_a_dict}", f"input={synth_zarr}",
                                     f"output={tmp}/p.zarr"], None, f"checkpoint={not_a_dict}: holds a list"),
        "init= a non-dict": (["finetune", "model=tiny/vit2d", *TINY_FINETUNE, f"data.raw={synth_zarr}",
                              f"data.labels={synth_zarr}/labels/membranes", "data.labeled_slices=[0]",
                              f"init={not_a_dict}", f"hydra.run.dir={tmp}/ft"], None,
                             f"init={not_a_dict}: holds a list"),
        "data.batch_size=0": (["pretrain", *pretrain, f"data.volumes=[{synth_zarr}]", "data.batch_size=0"], None,
                              "data.batch_size=0: expected a whole number of at least 1"),
        "data.volumes without brackets": (["pretrain", *pretrain, f"data.volumes={synth_zarr}"], None,
                                          f"data.volumes={synth_zarr}: expected a list of volumes"),
        "run dir not creatable": (["pretrain", *TINY_PRETRAIN, f"data.volumes=[{synth_zarr}]",
                                   f"hydra.run.dir={blocker}/run"], None, f"{blocker}/run: Not a directory"),
        "overwrite=true onto a file": (["features", *features, f"output={blocker}", "overwrite=true"], None,
                                       f"output={blocker} is a file"),
        "features output not creatable": (["features", *features, f"output={blocker}/f.zarr"], None,
                                          f"output={blocker}/f.zarr: cannot create the feature store"),
        "features on a full disk": (["features", *features, f"output={tmp}/full_f.zarr"], 20_000,  # Hydra's files fit
                                    f"output={tmp}/full_f.zarr: cannot write 0[:, 0:4, 0:12, 0:12] (File too large)"),
        "reversed ROI": (["features", *features, f"output={tmp}/r.zarr", "roi=[5:2,0:96,0:96]"], None,
                         "roi=[5:2,0:96,0:96]: range 5:2 of axis 0 is reversed"),
        "features without a checkpoint": (["features", *features[1:], f"output={tmp}/nc.zarr"], None,
                                          "checkpoint: required with source=encoder"),
        **{f"cluster with k={k}": (["cluster", f"checkpoint={vit_checkpoint}", cluster[0], f"output={tmp}/k{i}.zarr",
                                     *cluster[2:], f"k={k}"], None,
                                    f"k={shown}: expected a whole number of at least 2 clusters{hint}")
           for i, (k, shown, hint) in enumerate(BAD_K)},
        "missing input": (["features", *features[:1], f"input={tmp}/missing.zarr", f"output={tmp}/mi.zarr",
                           *features[2:]], None, f"{tmp}/missing.zarr: no such file or folder"),
        "unquoted non-ASCII path": (["features", *features[:1], f"input={tmp}/données.zarr", f"output={tmp}/u.zarr",
                                     *features[2:]], None,
                                    f"input={tmp}/données.zarr: Hydra reads 'é' only inside quotes; "
                                    f"write \"input='{tmp}/données.zarr'\""),
        "unquoted '~' in a list": (["pretrain", *pretrain, f"data.volumes=[{synth_zarr},{tmp}/a~b.zarr]"], None,
                                   f"data.volumes=[{synth_zarr},{tmp}/a~b.zarr]: Hydra reads '~' only inside quotes; "
                                   f"write \"data.volumes=[{synth_zarr},'{tmp}/a~b.zarr']\""),
        **{f"export folder: {name}": (["cluster", f"checkpoint={path}", *cluster], None, message)
           for name, path, message in [
               ("truncated weights", exports["truncated"],
                f"{exports['truncated']}/encoder.safetensors: not a readable safetensors file"),
               ("pickled weights", exports["pickle"], f"{exports['pickle']}/encoder.safetensors: not a readable"),
               ("bad config.json", exports["json"], f"{exports['json']}/config.json: not valid JSON"),
               ("checkpoint_path in config.json", exports["checkpoint_path"],
                f"{exports['checkpoint_path']}/config.json: model.checkpoint_path: not an encoder setting")]},
        **{f"malformed attribute {key}": (["features", *features[:1], f"input={path}", f"output={tmp}/m{i}.zarr",
                                           *features[2:]], None, f"{path}: {message}")
           for i, (key, (path, message)) in enumerate(malformed(image, tmp).items())},
    }
    # A zarr v2 input whose one chunk is garbage (every read meets it): the store and the chunk, not zarr's traceback.
    damaged = write_ome_zarr(pixels, tmp / "damaged.zarr", zarr_format=2)
    (damaged / "0" / "0" / "0" / "0").write_bytes(b"garbage " * 40)
    chunk = f"{damaged}: chunk 0/0/0/0 cannot be read (RuntimeError: error during blosc decompression: -1)"
    table["corrupt chunk to predict"] = (["predict", f"checkpoint={two_step_finetuned('vit2d')}", f"input={damaged}",
                                          f"output={tmp}/dp.zarr", "progress=false", f"hydra.run.dir={tmp}/dp"], None,
                                         chunk)
    table["corrupt chunk to pretrain"] = (["pretrain", *TINY_PRETRAIN, "trainer.max_steps=1",
                                           f"data.volumes=[{damaged}]", f"hydra.run.dir={tmp}/damaged"], None, chunk)
    # Labels of the ignore label alone (what `emfm seeds` of absent clusters wrote) trained at loss 0.
    unlabelled = write_ome_zarr(np.full(pixels.shape, 255, np.uint8), tmp / "unlabelled.zarr", is_label=True)
    table["labels with no labelled pixel"] = (
        ["finetune", "model=tiny/vit2d", *TINY_FINETUNE, f"data.raw={image}", f"data.labels={unlabelled}",
         "data.ignore_label=255", "data.labeled_slices=[0,1]", f"hydra.run.dir={tmp}/unlabelled"], None,
        f"{unlabelled}: data.labeled_slices [0, 1] hold no labelled pixel, only data.ignore_label=255; nothing to "
        f"train on")
    # An ingest killed midway left <out>.tmp-<pid> (its process is gone); another name is someone else's.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale, kept = tmp / f"out.zarr.tmp-{int(dead.stdout)}", tmp / f"out.zarr.tmp-{os.getpid()}x"
    write_ome_zarr(pixels, stale)
    kept.mkdir()
    table["ingest after a killed one"] = (["ingest", str(npy), "--out", f"{tmp}/out.zarr"], None, (stale, kept))
    done = run_cli([(argv, size) for argv, size, _ in table.values()])
    return {name: (message, out) for (name, (_, _, message)), out in zip(table.items(), done)}


NAMES = ["corrupt TIFF data", "truncated TIFF", "output folder not creatable", "full disk", "synth into .h5",
         "export of a non-dict", "export --overwrite onto a file", "predict without arguments",
         "predict with a non-dict", "init= a non-dict", "data.batch_size=0", "data.volumes without brackets",
         "run dir not creatable", "overwrite=true onto a file", "features output not creatable",
         "features on a full disk", "reversed ROI", "features without a checkpoint",
         *(f"cluster with k={k}" for k, _, _ in BAD_K), "missing input",
         "unquoted non-ASCII path", "unquoted '~' in a list", "corrupt chunk to predict", "corrupt chunk to pretrain",
         "labels with no labelled pixel",
         *(f"export folder: {name}" for name in ("truncated weights", "pickled weights", "bad config.json",
                                                 "checkpoint_path in config.json")),
         *(f"malformed attribute {key}" for key in ("multiscales a string", "multiscales a list of strings",
                                                    "ome a string", "axes without name", "emfm a string",
                                                    "non-numeric normalisation", "non-numeric scale"))]


@pytest.mark.parametrize("name", NAMES)
def test_a_bad_input_is_one_line_naming_it(results: dict, name: str) -> None:
    message, out = results[name]
    verb = out.args[0]
    errors = [line for line in out.stderr.splitlines() if line.startswith(f"emfm {verb}: error: ")]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert len(errors) == 1 and errors[0] == out.stderr.strip().splitlines()[-1], out.stderr[-3000:]
    assert errors[0].startswith(f"emfm {verb}: error: {message}"), errors[0]


@pytest.mark.parametrize("k", [k for k, _, _ in BAD_K])
def test_nothing_is_left_by_a_refused_cluster_run(results: dict, k: str) -> None:
    """k is checked before the output is created, so the corrected rerun is not blocked by a half-made map."""
    _, out = results[f"cluster with k={k}"]
    output = next(arg.split("=", 1)[1] for arg in out.args if arg.startswith("output="))
    assert out.returncode == 2 and not Path(output).exists()


def test_an_ingest_killed_midway_leaves_no_temporary_for_long(results: dict) -> None:
    """kill -9 leaves <out>.tmp-<pid>; the next ingest into the same output removes those of dead processes."""
    (stale, kept), out = results["ingest after a killed one"]
    assert out.returncode == 0, out.stderr
    assert not stale.exists() and kept.exists() and Path(out.args[-1], "zarr.json").is_file()
