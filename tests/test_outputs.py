"""Outputs open as meant: every store emfm writes is valid OME-Zarr in both formats, in the input's units, with
pyramids and label colours where asked; no job writes into its input; overwrite replaces only emfm's own output."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import zarr
from ome_zarr_models import open_ome_zarr
from ome_zarr_models.v04 import Image as Image04
from ome_zarr_models.v04 import ImageLabel as ImageLabel04
from ome_zarr_models.v05 import Image as Image05
from ome_zarr_models.v05 import ImageLabel as ImageLabel05

from emfm.data.ingest import write_ome_zarr
from emfm.data.synthetic import make_synthetic_em
from emfm.data.volume import Volume
from emfm.explore.pictures import palette
from emfm.explore.seeds import clusters_to_labels
from tests.conftest import TINY_PRETRAIN, CommandLine, compose_run, file_hashes

VOXEL = (0.04, 0.008, 0.008)       # micrometres: a store another tool wrote in um, not nm
ROI = "[2:6,8:88,0:96]"


def ome(path: Path) -> dict[str, Any]:
    """The NGFF attributes of a group, whichever the format (0.5 under ``ome``, 0.4 at the top)."""
    attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    return attrs.get("ome", attrs)


def validated(path: Path, fmt: int, label: bool) -> None:
    """``path`` validates with ome-zarr-models as an image (or a label image) of the format's NGFF version."""
    model = open_ome_zarr(zarr.open_group(str(path), mode="r"), version="0.5" if fmt == 3 else "0.4")
    expected = {(3, False): Image05, (3, True): ImageLabel05, (2, False): Image04, (2, True): ImageLabel04}
    assert type(model) is expected[fmt, label], (path, type(model))


def transforms(path: Path, level: int = 0) -> dict[str, list[float]]:
    dataset = ome(path)["multiscales"][0]["datasets"][level]
    return {t["type"]: t[t["type"]] for t in dataset["coordinateTransformations"]}


def units(path: Path) -> list[str | None]:
    return [a.get("unit") for a in ome(path)["multiscales"][0]["axes"] if a["type"] == "space"]


@pytest.mark.parametrize("fmt", [3, 2])
def test_every_store_validates_in_micrometres_with_pyramid_and_label_colours(
        synth_zarr: Path, model_2d: Path, vit_checkpoint: Path, tmp_path: Path, fmt: int) -> None:
    raw, membranes = Volume(synth_zarr).read(), Volume(synth_zarr / "labels" / "membranes").read()
    image = write_ome_zarr(raw, tmp_path / "um.zarr", voxel_size=VOXEL, unit="micrometer", zarr_format=fmt,
                           labels={"membranes": membranes})
    mask = write_ome_zarr(membranes, tmp_path / "mask.zarr", voxel_size=VOXEL, unit="micrometer", zarr_format=fmt,
                          is_label=True)
    run = [f"paths.output_dir={tmp_path / 'run'}", "progress=false", f"zarr_format={fmt}"]
    pred = tmp_path / "pred.zarr"
    compose_run("predict", [f"checkpoint={model_2d}", f"input={image}", f"output={pred}", f"roi={ROI}",
                            "instances=true", "pyramid=true", *run])
    feats = tmp_path / "feats.zarr"
    compose_run("features", [f"checkpoint={vit_checkpoint}", f"input={image}", f"output={feats}", f"roi={ROI}",
                             "pca=4", *run])
    clusters = tmp_path / "clusters.zarr"
    compose_run("cluster", [f"checkpoint={vit_checkpoint}", f"input={image}", f"output={clusters}", f"roi={ROI}",
                            f"features={feats}", "k=3", "pca=4", "pictures=null", *run])
    seeds = clusters_to_labels(clusters, {0: 1, 2: 2}, tmp_path / "seeds.zarr")
    classified = tmp_path / "classified.zarr"
    compose_run("classify", ["source=filters", "filters.sigmas=[1.0]", "classifier.kind=logistic", f"input={image}",
                             f"output={classified}", f"roi={ROI}", f"labels={mask}", "train_slices=[2]", *run])

    for path, label in ((image, False), (image / "labels" / "membranes", True), (mask, True), (pred, False),
                        (pred / "labels" / "instances", True), (feats, False), (clusters, True), (seeds, True),
                        (classified, False), (classified / "features", False)):
        validated(path, fmt, label)
        assert set(units(path)) == {"micrometer"}, path
        assert zarr.open_group(str(path), mode="r").metadata.zarr_format == fmt

    # Placed on the input: the ROI's corner, the input's voxel size (feature cells: the stride's, centred).
    assert transforms(pred) == {"scale": [1.0, *VOXEL], "translation": [0.0, 2 * VOXEL[0], 8 * VOXEL[1], 0.0]}
    assert transforms(pred, 1)["scale"] == pytest.approx([1.0, VOXEL[0], 2 * VOXEL[1], 2 * VOXEL[2]])
    stride = zarr.open_group(str(feats), mode="r").attrs["emfm"]["features"]["stride"]
    assert transforms(feats)["scale"] == pytest.approx([1.0, *(k * v for k, v in zip(stride, VOXEL))])
    assert transforms(clusters)["scale"] == pytest.approx(list(VOXEL))
    assert transforms(classified) == transforms(pred) == transforms(classified / "features")
    assert transforms(seeds)["scale"] == pytest.approx(list(VOXEL))

    # The pyramid follows ingest's rules: mean pooling of the probabilities, stride pick of the instances.
    probs = [zarr.open_array(str(pred / str(i)), mode="r")[...] for i in range(2)]
    assert probs[0].dtype == np.uint8 and probs[1].shape == (1, 4, 40, 48)
    pooled = probs[0].reshape(1, 4, 40, 2, 48, 2).mean(axis=(3, 5), dtype=np.float32)
    np.testing.assert_array_equal(probs[1], np.rint(pooled).astype(np.uint8))
    objects = [zarr.open_array(str(pred / "labels" / "instances" / str(i)), mode="r")[...] for i in range(2)]
    np.testing.assert_array_equal(objects[1], objects[0][:, ::2, ::2])

    # Label images carry their colours: the cluster map the pictures' legend; seeds their first cluster's, and
    # the ignored voxels none.
    rgba = [[round(255 * c) for c in (*rgb, 1.0)] for rgb in palette(3)]
    assert [c["rgba"] for c in ome(clusters)["image-label"]["colors"]] == rgba
    assert {c["label-value"]: c["rgba"] for c in ome(seeds)["image-label"]["colors"]} == {
        1: rgba[0], 2: rgba[2], 255: [0, 0, 0, 0]}
    assert ome(image / "labels" / "membranes")["image-label"]["source"] == {"image": "../../"}
    assert Volume(mask).is_label and Volume(clusters).is_label and Volume(seeds).is_label


def test_zarr_v2_outputs_open_with_ome_zarr_py(synth_zarr: Path, model_2d: Path, vit_checkpoint: Path,
                                               tmp_path: Path) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    run = [f"paths.output_dir={tmp_path / 'run'}", "progress=false", "zarr_format=2", "roi=[0:2,:,:]"]
    pred, clusters = tmp_path / "pred.zarr", tmp_path / "clusters.zarr"
    compose_run("predict", [f"checkpoint={model_2d}", f"input={synth_zarr}", f"output={pred}", "instances=true",
                            "pyramid=true", *run])
    compose_run("cluster", [f"checkpoint={vit_checkpoint}", f"input={synth_zarr}", f"output={clusters}", "k=3",
                            "pictures=null", "pca=4", *run])
    location = parse_url(str(pred))
    assert location is not None and location.fmt.version == "0.4"
    nodes = list(Reader(location)())
    assert [d.shape for d in nodes[0].data] == [(1, 2, 96, 96), (1, 1, 48, 48)]     # isotropic: z halves too
    assert any(isinstance(spec, Label) for node in nodes for spec in node.specs)     # labels/instances
    location = parse_url(str(clusters / "features"))
    assert location is not None and location.fmt.version == "0.4"
    assert len(next(iter(Reader(location)())).data[0].shape) == 4                   # (F, z, y, x)
    [node, *_] = Reader(parse_url(str(clusters)))()
    assert node.data[0].shape == (2, 96, 96)
    assert any(isinstance(spec, Label) for spec in node.specs)                       # napari: a Labels layer
    assert len(node.metadata["color"]) == 3


def test_a_read_only_input_works_and_stays_unchanged(synth_zarr: Path, model_2d: Path, vit_checkpoint: Path,
                                                     tmp_path: Path, emfm_cache: Path,
                                                     run_cli: CommandLine) -> None:
    # A store another tool wrote: no normalisation of emfm's in it. Read-only, as a shared dataset is.
    store = Path(shutil.copytree(synth_zarr, tmp_path / "shared.zarr"))
    group = zarr.open_group(str(store), mode="r+")
    group.attrs["emfm"] = {k: v for k, v in group.attrs["emfm"].items() if k != "normalization"}
    subprocess.run(["chmod", "-R", "a-w", str(store)], check=True)
    before = file_hashes(store)
    attrs = dict(zarr.open_group(str(store), mode="r").attrs)
    try:
        done = run_cli([
            (["pretrain", *TINY_PRETRAIN, f"data.volumes=[{store}]", f"paths.output_dir={tmp_path / 'pre'}",
              "trainer.max_steps=2", "logger=none"], None),
            (["predict", f"checkpoint={model_2d}", f"input={store}", f"output={tmp_path / 'pred.zarr'}",
              "roi=[0:2,:,:]", "progress=false", f"hydra.run.dir={tmp_path / 'p'}"], None),
            (["cluster", f"checkpoint={vit_checkpoint}", f"input={store}", f"output={tmp_path / 'c.zarr'}", "k=3",
              "roi=[0:2,:,:]", "pictures=null", "progress=false", f"hydra.run.dir={tmp_path / 'c'}"], None)])
        for result in done:
            assert result.returncode == 0, (result.args[0], result.stderr[-2000:])
        assert file_hashes(store) == before
        assert dict(zarr.open_group(str(store), mode="r").attrs) == attrs
        assert (tmp_path / "pre" / "checkpoints" / "last.ckpt").is_file()
        assert zarr.open_group(str(tmp_path / "pred.zarr"), mode="r").attrs["emfm"]["complete"]
        assert zarr.open_group(str(tmp_path / "c.zarr"), mode="r").attrs["emfm"]["complete"]
        cached = [p for p in (emfm_cache / "normalization").iterdir() if str(store) in p.read_text()]
        assert len(cached) == 1          # measured once, kept outside the input for every later job
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(store)], check=True)


def test_probability_dtypes_and_zarr_format_are_checked(synth_zarr: Path, model_2d: Path, tmp_path: Path) -> None:
    from emfm.errors import EmfmError

    run = [f"checkpoint={model_2d}", f"input={synth_zarr}", "roi=[0:1,:,:]", "progress=false",
           f"paths.output_dir={tmp_path / 'run'}"]
    for dtype in ("float32", "float16"):
        compose_run("predict", [*run, f"output={tmp_path / dtype}.zarr", f"dtype={dtype}"])
        assert zarr.open_array(str(tmp_path / f"{dtype}.zarr" / "0"), mode="r").dtype == np.dtype(dtype)
    with pytest.raises(EmfmError, match=r"dtype=float64: expected one of uint8, float32, float16"):
        compose_run("predict", [*run, f"output={tmp_path / 'a.zarr'}", "dtype=float64"])
    with pytest.raises(EmfmError, match=r"zarr_format=4: expected 3 \(zarr v3, OME-Zarr 0.5\) or 2"):
        compose_run("predict", [*run, f"output={tmp_path / 'b.zarr'}", "zarr_format=4"])
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()


def test_units_other_tools_write_are_given_their_ngff_names(caplog: pytest.LogCaptureFixture) -> None:
    from emfm.data.ngff import image_attrs, pyramid_plan

    plan = pyramid_plan((4, 8, 8), (1.0, 1.0, 1.0), 1)
    attrs = image_attrs("x", "zyx", ["µm", "nm", "furlong"], plan, [0.0] * 3, 3, is_label=False)
    assert [a.get("unit") for a in attrs["ome"]["multiscales"][0]["axes"]] == ["micrometer", "nanometer", None]
    assert "unit 'furlong' is not an OME-Zarr space unit" in caplog.text


# Overwrite replaces only what emfm wrote. The user's things each command is aimed at, in a folder nothing else
# writes into: a notes file, folders of documents, a TIFF stack (no emfm marker, as synth TIFFs before they had
# one), a zarr store another tool wrote (no emfm attributes) and a fine-tuning run (its checkpoints).
MINE = {"notes": "notes.txt", "docs": "docs", "docs.zarr": "docs.zarr", "tiff": "stack.tif", "store": "other.zarr",
        "run": "run"}
AIMS = {"ingest": ["notes", "docs", "store"], "synth": ["tiff", "docs.zarr"], "export": ["notes", "docs", "run"],
        "predict": ["notes", "docs", "store"], "features": ["notes", "docs"], "cluster": ["notes", "docs"],
        "classify": ["notes", "docs"]}


def own_things(mine: Path, run: Path) -> None:
    """The user's things of MINE in ``mine``; ``run``: a fine-tuning run to copy."""
    for docs in (mine / MINE["docs"], mine / MINE["docs.zarr"]):
        (docs / "sub").mkdir(parents=True)
        (docs / "letter.txt").write_text("dear reviewer\n")
        (docs / "sub" / "table.csv").write_text("a,b\n1,2\n")
    (mine / MINE["notes"]).write_text("my notes: not emfm's to delete\n")
    tifffile.imwrite(mine / MINE["tiff"], np.arange(4 * 32 * 32, dtype=np.uint16).reshape(4, 32, 32), imagej=True)
    zarr.create_array(str(mine / MINE["store"]), shape=(4, 8), chunks=(2, 8), dtype="uint8")[:] = 7
    shutil.copytree(run, mine / MINE["run"])


@pytest.fixture(scope="module")
def refused(synth_zarr: Path, two_step_pretrained: Callable[[str], Path], two_step_finetuned: Callable[[str], Path],
            tmp_path_factory: pytest.TempPathFactory, run_cli: CommandLine) -> dict[str, tuple]:
    """Each command with --overwrite / overwrite=true aimed at each of the user's things of AIMS, run once:
    {"VERB onto THING": (the output's key, the path, what the command writes, its files' hashes before, process)}."""
    tmp = tmp_path_factory.mktemp("foreign")
    segmenter, encoder = two_step_finetuned("vit2d"), two_step_pretrained("vit2d")
    own_things(tmp / "mine", segmenter.parent.parent)
    npy = tmp / "pixels.npy"
    np.save(npy, np.zeros((4, 32, 32), dtype=np.uint8))
    hydra = [f"hydra.run.dir={tmp / 'hydra'}", "progress=false", "roi=[0:1,:,:]", "overwrite=true"]
    commands: dict[str, tuple[str, str, Callable[[str], list[str]]]] = {
        "ingest": ("output", "image or label store", lambda p: ["ingest", str(npy), "--out", p, "--overwrite"]),
        "synth": ("output", "synthetic TIFF", lambda p: ["synth", "--out", p, "--shape", "4", "32", "32",
                                                         "--overwrite"]),
        "export": ("out_dir", "export", lambda p: ["export", str(encoder), p, "--overwrite"]),
        "predict": ("output", "prediction", lambda p: ["predict", f"checkpoint={segmenter}", f"input={synth_zarr}",
                                                       f"output={p}", *hydra]),
        "features": ("output", "feature store", lambda p: ["features", f"checkpoint={encoder}", f"input={synth_zarr}",
                                                           f"output={p}", *hydra]),
        "cluster": ("report", "cluster report", lambda p: ["cluster", f"checkpoint={encoder}", f"input={synth_zarr}",
                                                           f"output={tmp / 'clusters.zarr'}", f"report={p}", "k=2",
                                                           "pictures=null", *hydra]),
        "classify": ("output", "classification", lambda p: ["classify", "source=filters", "filters.sigmas=[1.0]",
                                                            f"input={synth_zarr}", f"output={p}", "train_slices=[0]",
                                                            f"labels={synth_zarr}/labels/membranes", *hydra]),
    }
    cases = {f"{verb} onto {thing}": (verb, tmp / "mine" / MINE[thing]) for verb, things in AIMS.items()
             for thing in things}
    before = {name: file_hashes(path) for name, (_, path) in cases.items()}
    done = run_cli([(commands[verb][2](str(path)), None) for verb, path in cases.values()])
    assert not (tmp / "clusters.zarr").exists()           # refused before anything was written
    whats = {name: "image or label store" if path.suffix == ".zarr" and verb == "synth" else commands[verb][1]
             for name, (verb, path) in cases.items()}      # synth writes by suffix
    return {name: (commands[verb][0], str(path), whats[name], before[name], out)
            for (name, (verb, path)), out in zip(cases.items(), done)}


@pytest.mark.parametrize("name", [f"{verb} onto {thing}" for verb, things in AIMS.items() for thing in things])
def test_overwrite_never_replaces_what_emfm_did_not_write(refused: dict, name: str) -> None:
    key, path, what, before, out = refused[name]
    verb = out.args[0]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    [line] = [line for line in out.stderr.splitlines() if line.startswith(f"emfm {verb}: error: ")]
    assert line == out.stderr.strip().splitlines()[-1], out.stderr[-3000:]
    thing = "a file" if Path(path).is_file() else "a folder"
    assert line == (f"emfm {verb}: error: {key}={path} is {thing} that is not an emfm {what}; emfm replaces only an "
                    f"earlier {what} of its own, nothing else: choose another {key}"), line
    assert "overwrite" not in line.replace(path, "")       # never advised for something that is not emfm's
    assert file_hashes(Path(path)) == before               # every file byte for byte, none added


def test_overwrite_replaces_emfm_s_own_earlier_output(synth_zarr: Path, two_step_pretrained: Callable[[str], Path],
                                                     two_step_finetuned: Callable[[str], Path], tmp_path: Path,
                                                     run_cli: CommandLine) -> None:
    segmenter, encoder = two_step_finetuned("vit2d"), two_step_pretrained("vit2d")
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(a, np.zeros((4, 32, 32), dtype=np.uint8))
    np.save(b, np.full((4, 32, 32), 9, dtype=np.uint8))
    hydra = [f"hydra.run.dir={tmp_path / 'hydra'}", "progress=false"]
    synth = ["synth", "--shape", "4", "32", "32"]
    predict = ["predict", f"checkpoint={segmenter}", f"input={synth_zarr}", f"output={tmp_path / 'p.zarr'}", *hydra]
    features = ["features", f"checkpoint={encoder}", f"input={synth_zarr}", f"output={tmp_path / 'f.zarr'}", *hydra]
    cluster = ["cluster", f"checkpoint={encoder}", f"input={synth_zarr}", f"report={tmp_path / 'r.json'}", "k=2",
               "roi=[0:1,:,:]", "pictures=null", *hydra]
    [full] = run_cli([(features, 20_000)])          # a full disk: an unfinished feature store is left
    assert full.returncode == 2 and not zarr.open_group(str(tmp_path / "f.zarr"), mode="r").attrs["emfm"]["complete"]
    cases = [   # (argv, exit status): emfm's own output is refused without overwrite, replaced with it
        (["ingest", str(a), "--out", str(tmp_path / "i.zarr")], 0),
        (["ingest", str(b), "--out", str(tmp_path / "i.zarr")], 2),
        (["ingest", str(b), "--out", str(tmp_path / "i.zarr"), "--overwrite"], 0),
        ([*synth, "--out", str(tmp_path / "s.tif")], 0),
        ([*synth, "--out", str(tmp_path / "s.tif"), "--seed", "1"], 2),
        ([*synth, "--out", str(tmp_path / "s.tif"), "--seed", "1", "--overwrite"], 0),
        ([*synth, "--out", str(tmp_path / "s.zarr")], 0),
        ([*synth, "--out", str(tmp_path / "s.zarr"), "--seed", "1", "--overwrite"], 0),
        (["export", str(encoder), str(tmp_path / "e")], 0),
        (["export", str(encoder), str(tmp_path / "e")], 2),
        (["export", str(encoder), str(tmp_path / "e"), "--overwrite"], 0),
        (["export", str(segmenter), str(tmp_path / "pkg")], 0),                    # a bioimage.io package,
        (["export", str(encoder), str(tmp_path / "pkg"), "--overwrite"], 0),       # replaced by an encoder
        ([*predict, "roi=[0:1,:,:]"], 0),
        ([*predict, "roi=[0:2,:,:]", "overwrite=true"], 0),
        ([*features, "roi=[0:1,:,:]", "overwrite=true"], 0),
        ([*cluster, f"output={tmp_path / 'c.zarr'}"], 0),
        ([*cluster, f"output={tmp_path / 'c.zarr'}"], 0),                         # a rerun rewrites its report
        ([*cluster, f"output={tmp_path / 'c2.zarr'}"], 2),
        ([*cluster, f"output={tmp_path / 'c2.zarr'}", "overwrite=true"], 0),
    ]
    done = run_cli([(argv, None) for argv, _ in cases])
    for (argv, code), out in zip(cases, done):
        assert out.returncode == code and "Traceback" not in out.stderr, (argv, out.stderr[-3000:])
    assert [out.stderr.strip().splitlines()[-1] for (_, code), out in zip(cases, done) if code] == [
        f"emfm ingest: error: {tmp_path / 'i.zarr'} exists; pass --overwrite",
        f"emfm synth: error: {tmp_path / 's.tif'} exists; pass --overwrite",
        f"emfm export: error: {tmp_path / 'e'} exists; pass --overwrite to replace it",
        f"emfm cluster: error: report={tmp_path / 'r.json'} holds the report of another cluster map "
        f"({tmp_path / 'c.zarr'}); choose another report or set overwrite=true"]
    replaced = make_synthetic_em((4, 32, 32), seed=1).raw
    assert (Volume(tmp_path / "i.zarr").read() == 9).all()
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "s.tif"), replaced)
    np.testing.assert_array_equal(Volume(tmp_path / "s.zarr").read(), replaced)
    assert {p.name for p in (tmp_path / "pkg").iterdir()} == {"encoder.safetensors", "config.json", "README.md"}
    assert zarr.open_array(str(tmp_path / "p.zarr" / "0"), mode="r").shape[1] == 2
    assert zarr.open_group(str(tmp_path / "f.zarr"), mode="r").attrs["emfm"]["features"]["roi"] == [[0, 1], [0, 96],
                                                                                                     [0, 96]]
    assert json.loads((tmp_path / "r.json").read_text())["output"] == str(tmp_path / "c2.zarr")
