"""Outputs open as meant: every store emfm writes is valid OME-Zarr in both formats, in the input's units, with
pyramids and label colours where asked; and no job writes into its input."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from ome_zarr_models import open_ome_zarr
from ome_zarr_models.v04 import Image as Image04
from ome_zarr_models.v04 import ImageLabel as ImageLabel04
from ome_zarr_models.v05 import Image as Image05
from ome_zarr_models.v05 import ImageLabel as ImageLabel05

from emfm.data.ingest import write_ome_zarr
from emfm.data.volume import Volume
from emfm.explore.cluster import clusters_to_labels
from emfm.explore.pictures import palette
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

    for path, label in ((image, False), (image / "labels" / "membranes", True), (mask, True), (pred, False),
                        (pred / "labels" / "instances", True), (feats, False), (clusters, True), (seeds, True)):
        validated(path, fmt, label)
        assert set(units(path)) == {"micrometer"}, path
        assert zarr.open_group(str(path), mode="r").metadata.zarr_format == fmt

    # Placed on the input: the ROI's corner, the input's voxel size (feature cells: the stride's, centred).
    assert transforms(pred) == {"scale": [1.0, *VOXEL], "translation": [0.0, 2 * VOXEL[0], 8 * VOXEL[1], 0.0]}
    assert transforms(pred, 1)["scale"] == pytest.approx([1.0, VOXEL[0], 2 * VOXEL[1], 2 * VOXEL[2]])
    stride = zarr.open_group(str(feats), mode="r").attrs["emfm"]["features"]["stride"]
    assert transforms(feats)["scale"] == pytest.approx([1.0, *(k * v for k, v in zip(stride, VOXEL))])
    assert transforms(clusters)["scale"] == pytest.approx(list(VOXEL))
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
