"""No command deletes, replaces or writes into one of its inputs: each refuses first, naming both paths,
and the input is unchanged byte for byte."""

import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from emfm.data.ingest import ingest, write_ome_zarr
from emfm.data.volume import Volume
from emfm.errors import EmfmError
from emfm.paths import refuse_overlap
from tests.conftest import CommandLine, compose_run, file_hashes


def quoted(path: Path | str) -> str:
    return re.escape(str(path))


def test_every_spelling_of_an_input_is_recognised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tmp_path / "data" / "raw.zarr"
    raw.mkdir(parents=True)
    (tmp_path / "alias.zarr").symlink_to(raw)
    monkeypatch.chdir(tmp_path / "data")
    cases = [("raw.zarr", "is"), (tmp_path / "alias.zarr", "is"), (tmp_path / "data" / "x" / ".." / "raw.zarr", "is"),
             (tmp_path / "data", "contains"), (".", "contains"), (raw / "pred.zarr", "lies inside")]
    for output, relation in cases:
        match = rf"^output={quoted(output)} {relation} the input {quoted(raw)}; .*choose another output$"
        with pytest.raises(EmfmError, match=match):
            refuse_overlap("output", output, {"labels": None, "input": raw})
    for output in (tmp_path / "data" / "raw.zarr2", tmp_path / "data" / "pred.zarr", tmp_path / "elsewhere"):
        refuse_overlap("output", output, {"input": raw})           # siblings, even with a common prefix, are fine


@pytest.fixture
def workspace(synth_zarr: Path, model_2d: Path, vit_checkpoint: Path, tmp_path: Path) -> dict[str, Path]:
    """Copies of the inputs, so that a regression cannot damage the session's shared ones."""
    raw = tmp_path / "data" / "raw.zarr"
    shutil.copytree(synth_zarr, raw)
    paths = {"raw": raw, "segmenter": tmp_path / "ft" / "checkpoints" / "last.ckpt",
             "encoder": tmp_path / "pre" / "checkpoints" / "last.ckpt"}
    for key, source in (("segmenter", model_2d), ("encoder", vit_checkpoint)):
        paths[key].parent.mkdir(parents=True)
        shutil.copy(source, paths[key])
    return paths


def run_refused(command: str, overrides: list[str], tmp_path: Path, match: str, *untouched: Path) -> None:
    before = [file_hashes(p) for p in untouched]
    with pytest.raises(EmfmError, match=match):
        compose_run(command, [*overrides, f"paths.output_dir={tmp_path / 'run'}", "progress=false"])
    assert [file_hashes(p) for p in untouched] == before


@pytest.mark.parametrize("output, relation, name", [
    ("data/raw.zarr", "is", "input"), ("data", "contains", "input"),
    ("data/raw.zarr/pred.zarr", "lies inside", "input"), ("ft", "contains", "checkpoint")])
@pytest.mark.parametrize("overwrite", [True, False])
def test_predict_never_replaces_its_input_or_checkpoint(workspace: dict[str, Path], tmp_path: Path, output: str,
                                                        relation: str, name: str, overwrite: bool) -> None:
    raw, checkpoint = workspace["raw"], workspace["segmenter"]
    args = [f"checkpoint={checkpoint}", f"input={raw}", f"output={tmp_path / output}", f"overwrite={overwrite}"]
    # The refusal comes before "already holds ...; set overwrite=true", which would lead into deleting the input.
    run_refused("predict", args, tmp_path, rf"output=\S+ {relation} the {name} \S+; emfm never deletes[^=]*$",
                raw.parent, checkpoint.parent.parent)
    assert not (raw / "pred.zarr").exists()


def test_features_never_replace_their_input(workspace: dict[str, Path], tmp_path: Path) -> None:
    raw = workspace["raw"]
    run_refused("features", [f"checkpoint={workspace['encoder']}", f"input={raw}", f"output={raw}", "overwrite=true"],
                tmp_path, rf"output={quoted(raw)} is the input {quoted(raw)}", raw)


def test_cluster_never_writes_into_its_input_labels_or_checkpoint(workspace: dict[str, Path], tmp_path: Path) -> None:
    raw, checkpoint = workspace["raw"], workspace["encoder"]
    labels = write_ome_zarr(Volume(raw / "labels" / "membranes").read(), tmp_path / "membranes.zarr", is_label=True)
    base = [f"checkpoint={checkpoint}", f"input={raw}", "overwrite=true"]
    for extra, match in [
        ([f"output={raw / 'clusters.zarr'}"], rf"output=\S+ lies inside the input {quoted(raw)}"),
        ([f"output={labels}", f"labels={labels}"], rf"output=\S+ is the labels {quoted(labels)}"),
        ([f"output={labels}", f"labels={{membranes:{labels}}}"], rf"is the labels membranes {quoted(labels)}"),
        ([f"output={tmp_path / 'c.zarr'}", f"report={checkpoint}"],
         rf"report=\S+ is the checkpoint {quoted(checkpoint)}"),
    ]:
        run_refused("cluster", [*base, *extra], tmp_path, match, raw, labels, checkpoint)
    assert not (tmp_path / "c.zarr").exists()


def test_ingest_never_replaces_its_input(tmp_path: Path) -> None:
    stack = (np.arange(3 * 32 * 32) % 251).astype(np.uint8).reshape(3, 32, 32)
    tif = tmp_path / "stack.tif"
    tifffile.imwrite(tif, stack, photometric="minisblack")
    folder = tmp_path / "slices"
    folder.mkdir()
    for i, image in enumerate(stack):
        tifffile.imwrite(folder / f"s{i}.tif", image)
    (folder / "notes.txt").write_text("not a slice, and not emfm's to delete")
    h5 = tmp_path / "stack.h5"
    with h5py.File(h5, "w") as f:
        f["raw"] = stack
    for source, out, relation, given in [(tif, tif, "is", tif), (folder, folder, "is", folder),
                                         (folder, tmp_path, "contains", folder), (f"{h5}:/raw", h5, "is", h5)]:
        before = file_hashes(tmp_path)
        with pytest.raises(EmfmError, match=rf"output={quoted(out)} {relation} the input {quoted(given)};"):
            ingest(source, out, overwrite=True, progress=False)
        assert file_hashes(tmp_path) == before


def test_export_into_the_run_it_exports_is_refused_in_one_line(vit_checkpoint: Path, tmp_path: Path,
                                                               run_cli: CommandLine) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(vit_checkpoint.parent.parent, run_dir)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    before = file_hashes(run_dir)
    [out] = run_cli([(["export", str(checkpoint), str(run_dir), "--overwrite"], None)])
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(f"emfm export: error: out_dir={run_dir} contains the checkpoint {checkpoint};")
    assert file_hashes(run_dir) == before
