"""emfm predict: blockwise prediction equals the whole-region computation, resumes, runs on Dask."""

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from scipy import ndimage

from emfm.blockwise import job as blockwise_job
from emfm.blockwise.executor import Executor
from emfm.checkpoints import load_segmenter
from emfm.data.ingest import write_ome_zarr
from emfm.data.volume import Volume
from emfm.errors import EmfmError
from emfm.inference import tile_corners
from emfm.metrics import rand_scores
from emfm.predict.predict import Job, PredictRequest, make_job, model_function, run_prediction
from tests.conftest import CommandLine, compose_run, finetuned, later, pretrained, refusal, tiny


@pytest.fixture(scope="module")
def model_3d(two_step_finetuned: Callable[[str], Path]) -> Path:
    return two_step_finetuned("cnn3d")


def predict(tmp_path: Path, checkpoint: Path, volume: Path, output: Path, *extra: str) -> dict:
    return compose_run("predict", [f"checkpoint={checkpoint}", f"input={volume}", f"output={output}",
                                   f"paths.output_dir={tmp_path / 'run'}", "progress=false", *extra])


def probabilities(output: Path) -> np.ndarray:
    return zarr.open_array(f"{output}/0", mode="r")[...]


def whole_region(checkpoint: Path, volume: Path) -> np.ndarray:
    """The direct computation: the fine-tuned model's sliding window over each whole slice / the whole volume."""
    module, vol = load_segmenter(checkpoint), Volume(volume)
    image = torch.from_numpy(vol.normalize(vol.read()))
    if len(module.model.encoder.input_shape) == 2:
        return torch.stack([module.predict_region(s[None]) for s in image], dim=1).numpy()
    return module.predict_region(image[None]).numpy()


@pytest.mark.parametrize("dims, block", [(2, (3, 40, 40)), (3, (8, 40, 56))])
def test_blocks_join_without_seams_and_compute_each_tile_once(synth_zarr: Path, model_2d: Path, model_3d: Path,
                                                              tmp_path: Path, dims: int, block: tuple[int, int, int]
                                                              ) -> None:
    """Each block blends every tile of the whole-region grid that touches it, yet the model sees each tile of that
    grid once, in full batches: a batch of tiles across a block border is computed by one block and kept on disk
    for the others, until they are all done."""
    checkpoint, output = (model_2d if dims == 2 else model_3d), tmp_path / "p.zarr"
    module, volume = load_segmenter(checkpoint), Volume(synth_zarr)
    job = make_job(PredictRequest(str(checkpoint), str(synth_zarr), str(output), block_shape=block, dtype="float32",
                                  batch_size=3, precision="32"), module, volume, None)
    tiles, kept, seen = [], [], set()       # tiles per forward pass; batches kept on disk meanwhile

    def count(_: torch.nn.Module, args: tuple[torch.Tensor, ...], __: torch.Tensor) -> None:
        tiles.append(len(args[0]))
        kept.append({p.name for p in (output / "_work" / "tiles").glob("*.npy")})
        seen.update(kept[-1])

    module.model.register_forward_hook(count)
    out = run_prediction(job, module, volume, None, Executor(), overwrite=False, progress=False)
    assert out["blocks"] > 4 and out["computed"] == out["blocks"]
    assert sum(tiles) == len(tile_corners(job.shape, job.tile, job.overlap))
    assert tiles[:-1] == [3] * (len(tiles) - 1)          # one short batch at most, the grid's last
    assert 0 < max(map(len, kept)) < len(seen)          # shared tiles were kept, and deleted as their blocks finished
    blocked, direct = probabilities(output), whole_region(checkpoint, synth_zarr)
    assert blocked.dtype == np.float32 and blocked.shape == direct.shape
    np.testing.assert_allclose(blocked, direct, atol=1e-5, rtol=0)


def test_output_is_ome_zarr_with_roi_placement_and_uint8(synth_zarr: Path, model_2d: Path, tmp_path: Path) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    out = tmp_path / "roi.zarr"
    predict(tmp_path, model_2d, synth_zarr, out, "roi=[2:6,10:90,0:64]", "instances=true")    # uint8 by default
    nodes = list(Reader(parse_url(str(out)))())
    image = nodes[0]
    assert [a["name"] for a in image.metadata["axes"]] == ["c", "z", "y", "x"]
    assert image.data[0].shape == (1, 4, 80, 64) and image.data[0].dtype == np.uint8
    transforms = {t["type"]: t for t in image.metadata["coordinateTransformations"][0]}
    voxel = Volume(synth_zarr).voxel_size
    assert transforms["translation"]["translation"] == [0.0, 2 * voxel[0], 10 * voxel[1], 0.0]
    assert any(n.specs and type(n.specs[0]).__name__ == "Label" for n in nodes)   # labels/instances found
    attrs = dict(zarr.open_group(str(out), mode="r").attrs)["emfm"]
    assert attrs["complete"] and not (out / "_progress").exists() and not (out / "_work").exists()
    direct = whole_region(model_2d, synth_zarr)[:, 2:6, 10:90, 0:64]
    # the ROI is its own region: tiles cover it alone, so compare loosely (uint8 steps, other tiling)
    assert np.abs(probabilities(out) / 255 - direct).mean() < 0.05


def test_killed_run_resumes_to_identical_bytes(synth_zarr: Path, model_2d: Path, tmp_path: Path) -> None:
    block = "block_shape=[1,48,48]"                          # 16 x 2 x 2 blocks
    whole, resumed = tmp_path / "whole.zarr", tmp_path / "resumed.zarr"
    predict(tmp_path, model_2d, synth_zarr, whole, block)
    command = [sys.executable, "-m", "emfm", "predict", f"checkpoint={model_2d}", f"input={synth_zarr}", block,
               f"output={resumed}", "progress=false", f"hydra.run.dir={tmp_path / 'killed'}"]

    def marked() -> int:
        """Blocks the progress record holds: its chunk files, not the ``.partial`` file zarr writes each through
        (a kill between that file's creation and its rename leaves it behind)."""
        files = (f for _, _, names in os.walk(resumed / "_progress" / "predict" / "c") for f in names)
        return sum(not f.endswith(".partial") for f in files)

    def kept() -> list[Path]:
        """The tiles computed for blocks to come (emfm.blockwise.tiles)."""
        return list((resumed / "_work" / "tiles").glob("*.npy"))

    def stopped_keeping_tiles() -> bool:
        """Once a quarter of the blocks is marked, the run stopped where it keeps tiles for the resumed run to read;
        elsewhere it goes on."""
        if marked() < 16 or not kept():
            return False
        proc.send_signal(signal.SIGSTOP)
        os.waitpid(proc.pid, os.WUNTRACED)                   # stopped: its files are as a kill now leaves them
        if kept():
            return True
        proc.send_signal(signal.SIGCONT)
        return False

    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not stopped_keeping_tiles():
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finished = marked()
    assert proc.returncode == -signal.SIGKILL and 16 <= finished < 64 and kept(), finished
    assert not dict(zarr.open_group(str(resumed), mode="r").attrs)["emfm"]["complete"]
    (resumed / "0" / "c").mkdir(parents=True, exist_ok=True)    # as a kill during a chunk's write leaves it
    (resumed / "0" / "c" / "0.7f3a.partial").write_bytes(b"half a chunk")
    out = predict(tmp_path, model_2d, synth_zarr, resumed, block)
    assert out["computed"] == 64 - finished and not list(resumed.rglob("*.partial"))
    a, b = probabilities(whole), probabilities(resumed)
    assert a.dtype == np.uint8 and np.array_equal(a, b)
    chunks = [c for c in (whole / "0" / "c").rglob("*") if c.is_file()]
    assert len(chunks) == 64
    for chunk in chunks:
        assert chunk.read_bytes() == (resumed / chunk.relative_to(whole)).read_bytes()


def test_a_full_disk_while_keeping_shared_tiles_is_one_line(synth_zarr: Path, model_2d: Path, tmp_path: Path,
                                                            run_cli: CommandLine) -> None:
    out = tmp_path / "full.zarr"
    # Files up to 25 kB: the output's chunks fit (8 x 48 x 48 bytes), not the first batch kept (8 x 32 x 32 floats).
    [done] = run_cli([(["predict", f"checkpoint={model_2d}", f"input={synth_zarr}", f"output={out}",
                        "block_shape=[8,48,48]", "progress=false", f"hydra.run.dir={tmp_path / 'run'}"], 25_000)])
    assert refusal(done) == (f"output={out}: cannot write _work/tiles/b8-0.npy (File too large); finished "
                             f"blocks are kept, rerun the same command to continue")
    assert not list(out.rglob("*.partial"))


def test_dask_executor_equals_local_with_instances_stitched(synth_zarr: Path, model_2d: Path, tmp_path: Path) -> None:
    block = "block_shape=[4,32,32]"
    local, dask = tmp_path / "local.zarr", tmp_path / "dask.zarr"
    # one torch thread in both, as a different thread count may change the last bit of a sum
    predict(tmp_path, model_2d, synth_zarr, local, block, "instances=true", "instance_halo=8", "threads=1")
    environ = dict(os.environ)
    predict(tmp_path, model_2d, synth_zarr, dask, block, "instances=true", "instance_halo=8", "executor=dask",
            "dask.n_workers=2", "dask.threads_per_worker=1")
    # Dask's nanny sets OMP_NUM_THREADS=1 & co. in this process for its workers: taken back, or every later
    # subprocess (test_killed_run_resumes_to_identical_bytes's) would compute on one thread, other bits.
    assert dict(os.environ) == environ
    assert np.array_equal(probabilities(local), probabilities(dask))
    labels = zarr.open_array(f"{local}/labels/instances/0", mode="r")[...]
    assert np.array_equal(labels, zarr.open_array(f"{dask}/labels/instances/0", mode="r")[...])

    # The interior components of the whole volume, labelled at once, are the seeds the blocks agreed on:
    # every component carries one label, whichever blocks it spans.
    interior = probabilities(local)[0] / 255 <= 0.5
    per_slice = np.zeros((3, 3, 3), bool)
    per_slice[1] = ndimage.generate_binary_structure(2, 1)
    components, n = ndimage.label(interior, per_slice)
    assert n >= 3
    crossing = 0
    for index in range(1, n + 1):
        ids = np.unique(labels[components == index])
        assert len(ids) == 1 and ids[0] > 0
        _, ys, xs = np.nonzero(components == index)
        crossing += len(np.unique(ys // 32)) > 1 or len(np.unique(xs // 32)) > 1
    assert crossing >= 1                                    # the check did see objects cut by block borders
    assert len(np.unique(labels[labels > 0])) == n          # and no object lost or split
    # Grown over the membranes, per slice they match growing each whole slice at once.
    from emfm.instances import from_membranes

    for z in (0, 7):
        whole = from_membranes(probabilities(local)[0, z] / 255, 0.5, method="components")
        assert rand_scores(labels[z], whole, foreground_only=False)["vrand"] > 0.99


def test_rerun_of_a_complete_prediction_does_nothing_and_other_settings_are_refused(
        synth_zarr: Path, model_2d: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.zarr"
    predict(tmp_path, model_2d, synth_zarr, out, "roi=[0:2,0:96,0:96]")
    assert predict(tmp_path, model_2d, synth_zarr, out, "roi=[0:2,0:96,0:96]")["computed"] == 0
    with pytest.raises(EmfmError, match=r"already holds a different, complete prediction.*overwrite=true"):
        predict(tmp_path, model_2d, synth_zarr, out, "roi=[0:3,0:96,0:96]")
    assert predict(tmp_path, model_2d, synth_zarr, out, "roi=[0:3,0:96,0:96]", "overwrite=true")["computed"] > 0
    assert probabilities(out).shape == (1, 3, 96, 96)
    (tmp_path / "other.zarr").mkdir()
    with pytest.raises(EmfmError, match=r"not an emfm prediction"):
        predict(tmp_path, model_2d, synth_zarr, tmp_path / "other.zarr")


def test_bf16_predicts_within_its_precision_of_float32_and_is_part_of_the_settings(
        synth_zarr: Path, model_2d: Path, tmp_path: Path) -> None:
    """precision=bf16 (what auto means on a CPU with AMX) runs the forward passes under bfloat16 autocast: close to
    float32, not equal; a store of one precision is not continued in the other."""
    full, half = tmp_path / "32.zarr", tmp_path / "bf16.zarr"
    predict(tmp_path, model_2d, synth_zarr, full, "roi=[0:3,0:96,0:96]", "dtype=float32", "precision=32")
    predict(tmp_path, model_2d, synth_zarr, half, "roi=[0:3,0:96,0:96]", "dtype=float32", "precision=bf16")
    difference = np.abs(probabilities(full) - probabilities(half))
    assert 0 < difference.max() < 0.05 and difference.mean() < 0.005
    with pytest.raises(EmfmError, match=r"already holds a different, complete prediction"):
        predict(tmp_path, model_2d, synth_zarr, half, "roi=[0:3,0:96,0:96]", "dtype=float32", "precision=32")


def test_a_store_interrupted_while_laid_out_is_started_afresh(synth_zarr: Path, model_2d: Path,
                                                             tmp_path: Path) -> None:
    out, roi = tmp_path / "p.zarr", "roi=[0:2,0:64,0:64]"
    first = predict(tmp_path, model_2d, synth_zarr, out, roi)
    expected = probabilities(out)
    root = zarr.open_group(str(out), mode="r+")      # as a kill between the group and its arrays leaves it
    root.attrs["emfm"] = {**root.attrs["emfm"], "complete": False}
    for entry in out.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
    again = predict(tmp_path, model_2d, synth_zarr, out, roi)
    assert again["computed"] == first["blocks"]
    np.testing.assert_array_equal(probabilities(out), expected)


def test_bad_inputs_are_named(synth_zarr: Path, model_2d: Path, model_3d: Path, tmp_path: Path) -> None:
    pretraining = pretrained(tmp_path / "pre", synth_zarr, 1, [*tiny(), "data.batch_size=2"])
    with pytest.raises(EmfmError, match=r"no segmentation head"):
        predict(tmp_path, pretraining, synth_zarr, tmp_path / "a.zarr")
    image = tmp_path / "image.zarr"
    write_ome_zarr(Volume(synth_zarr).read()[0], image, axes="yx")
    with pytest.raises(EmfmError, match=r"a 2-D image, but the checkpoint's model is 3-D"):
        predict(tmp_path, model_3d, image, tmp_path / "b.zarr")
    with pytest.raises(EmfmError, match=r"roi=\[0:4,0:200,:\]: range 0:200 of axis 1 is outside the volume \(0:96\)"):
        predict(tmp_path, model_2d, synth_zarr, tmp_path / "c.zarr", "roi=[0:4,0:200,:]")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(EmfmError, match=rf"output={blocker}/d.zarr: cannot create the output"):
        predict(tmp_path, model_2d, synth_zarr, blocker / "d.zarr")
    semantic = finetuned(tmp_path / "sem", synth_zarr, "vit2d", 1, "target=semantic", "target.classes=[1]")
    with pytest.raises(EmfmError, match=r"instances=true: a 'semantic' target has no instances"):
        predict(tmp_path, semantic, synth_zarr, tmp_path / "e.zarr", "instances=true")


def test_a_worker_keeps_its_run_model_and_a_new_run_loads_the_retrained_checkpoint(
        synth_zarr: Path, model_2d: Path, tmp_path: Path) -> None:
    """The workers of a running Dask scheduler keep their model from one run to the next: a run goes on with the
    weights it started with, the next run on a retrained ``last.ckpt`` (same path) or with test-time flips gets
    its own, and a process joining a run after its checkpoint was rewritten stops with the reason."""
    checkpoint = tmp_path / "last.ckpt"
    shutil.copy(model_2d, checkpoint)

    def job_now(tta: bool = False) -> Job:
        request = PredictRequest(str(checkpoint), str(synth_zarr), str(tmp_path / "out.zarr"), batch_size=2,
                                 tta=tta, dtype="float16", precision="32")
        return make_job(request, load_segmenter(checkpoint), Volume(synth_zarr), None)

    job = job_now()
    tiles = torch.rand(2, 1, *job.tile, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model_function(job)(tiles)
        state = torch.load(checkpoint, weights_only=True)               # retrained: other weights, same path
        state["state_dict"] = {k: v + 0.05 if v.is_floating_point() else v for k, v in state["state_dict"].items()}
        torch.save(state, checkpoint)
        later(checkpoint)
        assert torch.equal(model_function(job)(tiles), before)          # the running job keeps its weights

        retrained = load_segmenter(checkpoint)
        expected = retrained.activate(retrained.model(tiles[:, :, 0])).unsqueeze(2)
        after = model_function(job_now())(tiles)                          # the next run
        assert not torch.allclose(after, before, atol=1e-4)
        assert torch.allclose(after, expected, atol=1e-6)
        flipped = model_function(job_now(tta=True))(tiles)
        assert not torch.allclose(flipped, after, atol=1e-4)

    blockwise_job._LOADED.clear()                                       # a new worker process of the first run
    with pytest.raises(EmfmError, match="last.ckpt: rewritten since this run started"):
        model_function(job)
