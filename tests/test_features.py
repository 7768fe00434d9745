"""emfm features: dense features on the expected grid (an encoder map, a hypercolumn, a pretrained decoder, the filter
bank), blockwise equal to the whole region, resumable store."""

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from emfm.blockwise import job as blockwise_job
from emfm.blockwise.executor import Executor
from emfm.checkpoints import load_encoder, load_network
from emfm.data.synthetic import make_synthetic_em, save_synthetic
from emfm.data.volume import Volume
from emfm.errors import EmfmError
from emfm.explore.features import (
    FeatureJob,
    FeatureRequest,
    dense_features,
    extract_features,
    job_network,
    make_job,
)
from emfm.explore.filters import FilterBank
from emfm.inference import tile_corners
from tests.conftest import compose_run, later


def features(tmp_path: Path, checkpoint: Path, volume: Path, output: Path, *extra: str) -> dict:
    return compose_run("features", [f"checkpoint={checkpoint}", f"input={volume}", f"output={output}",
                                    f"paths.output_dir={tmp_path / 'run'}", "progress=false", *extra])


@pytest.mark.parametrize("roi, stride, block", [(None, 4, "[8,7,9]"), ("[2:7,5:90,0:61]", 8, "[3,4,5]")])
def test_store_has_the_grid_and_equals_the_whole_region(synth_zarr: Path, vit_checkpoint: Path, tmp_path: Path,
                                                        roi: str | None, stride: int, block: str) -> None:
    extra = [f"stride={stride}", f"block_shape={block}"] + ([f"roi={roi}"] if roi else [])
    summary = features(tmp_path, vit_checkpoint, synth_zarr, tmp_path / "f.zarr", *extra)
    store = zarr.open_group(str(tmp_path / "f.zarr"), mode="r")
    data = store["0"][...]
    region = (slice(2, 7), slice(5, 90), slice(0, 61)) if roi else (slice(0, 16), slice(0, 96), slice(0, 96))
    shape = [r.stop - r.start for r in region]
    grid = [shape[0], -(-shape[1] // stride), -(-shape[2] // stride)]
    encoder = load_encoder(vit_checkpoint, as_timm=False)
    assert data.dtype == np.float16 and list(data.shape) == [encoder.feature_channels[-1], *grid]
    assert summary["blocks"] >= 4
    assert "_progress" not in store and store.attrs["emfm"]["complete"]
    scale, translation = store.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    voxel = Volume(synth_zarr).voxel_size
    assert scale["scale"] == [1.0, voxel[0], stride * voxel[1], stride * voxel[2]]
    assert translation["translation"][2] == pytest.approx((region[1].start + (stride - 1) / 2) * voxel[1])
    volume = Volume(synth_zarr)
    whole = dense_features(encoder, volume.normalize(volume.read(region)), stride=stride)
    assert whole.shape == data.shape
    np.testing.assert_allclose(data.astype(np.float32), whole, atol=2e-2, rtol=1e-2)


def test_cnn_features_at_a_chosen_scale(synth_zarr: Path, tmp_path: Path,
                                        two_step_pretrained: Callable[[str], Path]) -> None:
    checkpoint = two_step_pretrained("cnn3d")
    encoder = load_encoder(checkpoint, as_timm=False)
    features(tmp_path, checkpoint, synth_zarr, tmp_path / "f.zarr", "layer=1")
    data = zarr.open_array(str(tmp_path / "f.zarr/0"), mode="r")
    stride = encoder.feature_strides[1]
    assert data.shape == (encoder.feature_channels[1], *(-(-s // k) for s, k in zip((16, 96, 96), stride)))
    assert np.isfinite(data[...].astype(np.float32)).all() and data[...].std() > 0


def test_pca_projection_reuse_and_refusal(synth_zarr: Path, vit_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.zarr"
    first = features(tmp_path, vit_checkpoint, synth_zarr, out, "pca=3", "sample=500")
    store = zarr.open_group(str(out), mode="r")
    pca = store["pca"][...].astype(np.float32)
    assert pca.shape == (3, *store["0"].shape[1:]) and store.attrs["emfm"]["pca"]["components"] == 3
    assert pca[0].var() >= pca[1].var() >= pca[2].var()          # components come in order of variance
    assert first["computed"] == first["blocks"]
    again = features(tmp_path, vit_checkpoint, synth_zarr, out, "pca=3", "sample=500")
    assert again["computed"] == 0                                  # same settings: the store is reused
    with pytest.raises(EmfmError, match="already holds a different, complete feature store"):
        features(tmp_path, vit_checkpoint, synth_zarr, out, "stride=4")
    replaced = features(tmp_path, vit_checkpoint, synth_zarr, out, "stride=4", "overwrite=true")
    assert replaced["computed"] == replaced["blocks"] and zarr.open_array(str(out / "0")).shape[-1] == 24


def test_an_exported_encoder_gives_the_same_features(synth_zarr: Path, vit_checkpoint: Path, tmp_path: Path) -> None:
    from emfm.export import export_encoder

    export = export_encoder(vit_checkpoint, tmp_path / "export")
    features(tmp_path, vit_checkpoint, synth_zarr, tmp_path / "a.zarr")
    features(tmp_path, export, synth_zarr, tmp_path / "b.zarr")
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "a.zarr/0"))[...],
                                  zarr.open_array(str(tmp_path / "b.zarr/0"))[...])


def test_bad_feature_settings_are_named(synth_zarr: Path, vit_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(EmfmError, match="stride=.*must divide the encoder tile"):
        features(tmp_path, vit_checkpoint, synth_zarr, tmp_path / "a.zarr", "stride=5")
    with pytest.raises(EmfmError, match="layer=7: the encoder has 4 feature maps"):
        features(tmp_path, vit_checkpoint, synth_zarr, tmp_path / "b.zarr", "layer=7")
    with pytest.raises(EmfmError, match="not an emfm checkpoint|no such checkpoint"):
        features(tmp_path, tmp_path / "missing.ckpt", synth_zarr, tmp_path / "c.zarr")


def test_unfinished_store_is_continued_and_dask_gives_the_same_bytes(synth_zarr: Path, vit_checkpoint: Path,
                                                                    tmp_path: Path) -> None:
    common = ["block_shape=[8,6,6]", "threads=1"]
    done = features(tmp_path, vit_checkpoint, synth_zarr, tmp_path / "a.zarr", *common)
    reference = zarr.open_array(str(tmp_path / "a.zarr/0"), mode="r")[...]
    # Make it the store of a run that died after its first blocks: the rest zeroed and unmarked.
    root = zarr.open_group(str(tmp_path / "a.zarr"), mode="r+")
    root.attrs["emfm"] = {**root.attrs["emfm"], "complete": False}
    progress = root.create_array("_progress/features", shape=(2, 2, 2), chunks=(1, 1, 1), dtype=bool, fill_value=False)
    progress[0] = True
    root["0"][:, 8:] = 0
    resumed = features(tmp_path, vit_checkpoint, synth_zarr, tmp_path / "a.zarr", *common)
    assert done["computed"] == 8 and resumed["computed"] == 4
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "a.zarr/0"), mode="r")[...], reference)
    features(tmp_path, vit_checkpoint, synth_zarr, tmp_path / "d.zarr", "block_shape=[8,6,6]", "executor=dask",
             "dask.n_workers=2", "dask.threads_per_worker=1")
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "d.zarr/0"), mode="r")[...], reference)


def test_the_encoder_sees_each_tile_of_the_region_once(synth_zarr: Path, vit_checkpoint: Path, tmp_path: Path) -> None:
    """As in `emfm predict`: a tile across block borders is computed by one block, in full batches, and kept on disk
    for the others until they are done (it ran once per block it touches: 19 % more tiles at 8x the benchmarks'
    volume; then batched per block: 7 % more forward passes)."""
    output, network, volume = tmp_path / "f.zarr", load_network(vit_checkpoint, decoder="none"), Volume(synth_zarr)
    request = FeatureRequest(str(vit_checkpoint), str(synth_zarr), str(output), roi="0:2,0:64,0:64",
                             block_shape=[2, 4, 4], stride=4, batch_size=3, progress=False)
    tiles, kept = [], []                    # tiles per forward pass; batches kept on disk meanwhile

    def count(_: torch.nn.Module, args: tuple[torch.Tensor, ...], __: torch.Tensor) -> None:
        tiles.append(len(args[0]))
        kept.append(len(list((output / "_work" / "tiles").glob("*.npy"))))

    network[0].vit.patch_embed.register_forward_hook(count)
    summary = extract_features(request, Executor(), network)
    job = make_job(request, network, volume, None)
    assert summary["blocks"] == 16 and sum(tiles) == len(tile_corners(job.padded, job.tile, job.overlap, job.stride))
    assert tiles[:-1] == [request.batch_size] * (len(tiles) - 1)
    assert max(kept) > 0 and not (output / "_work").exists()
    assert any(later < earlier for earlier, later in zip(kept, kept[1:]))   # released while the run goes on
    whole = dense_features(network[0], volume.normalize(volume.read((slice(0, 2), slice(0, 64), slice(0, 64)))),
                           stride=4)
    np.testing.assert_allclose(zarr.open_array(str(output / "0"), mode="r")[...].astype(np.float32), whole,
                               atol=2e-2, rtol=1e-2)


def test_a_worker_keeps_its_run_encoder_and_a_new_run_loads_the_rewritten_checkpoint(
        synth_zarr: Path, vit_checkpoint: Path, tmp_path: Path) -> None:
    """As `emfm predict`'s workers: one encoder per run and process, the checkpoint checked when it is loaded."""
    checkpoint = tmp_path / "last.ckpt"
    shutil.copy(vit_checkpoint, checkpoint)
    request = FeatureRequest(str(checkpoint), str(synth_zarr), str(tmp_path / "f.zarr"))

    def job_now() -> FeatureJob:
        return make_job(request, load_network(str(checkpoint)), Volume(synth_zarr), None)

    job = job_now()
    first = job_network(job)
    state = torch.load(checkpoint, weights_only=True)
    state["state_dict"] = {k: v + 0.05 if v.is_floating_point() else v for k, v in state["state_dict"].items()}
    torch.save(state, checkpoint)
    later(checkpoint)
    assert job_network(job) is first                                    # the running job keeps its weights

    again = job_network(job_now())                                      # the next run
    moved = [not torch.equal(a, b) for a, b in zip(again[0].state_dict().values(), first[0].state_dict().values())
             if a.is_floating_point()]
    assert moved and all(moved)
    blockwise_job._LOADED.clear()                                       # a new worker process of the first run
    with pytest.raises(EmfmError, match="rewritten since this run started"):
        job_network(job)


def test_a_restore_checkpoint_gives_its_decoder_features_at_full_resolution(synth_zarr: Path, restore_checkpoint: Path,
                                                                            tmp_path: Path) -> None:
    summary = features(tmp_path, restore_checkpoint, synth_zarr, tmp_path / "f.zarr", "roi=[2:5,5:90,0:61]",
                       "block_shape=[2,40,32]")
    encoder, decoder = load_network(restore_checkpoint)
    store = zarr.open_group(str(tmp_path / "f.zarr"), mode="r")
    data = store["0"][...].astype(np.float32)
    assert decoder is not None and data.shape == (decoder.width, 3, 85, 61) and data.std() > 0
    assert summary["stride"] == [1, 1, 1] and summary["blocks"] == 12
    assert store.attrs["emfm"]["features"]["layer"] == "decoder"                     # the default of this checkpoint
    volume = Volume(synth_zarr)
    whole = dense_features(encoder, volume.normalize(volume.read((slice(2, 5), slice(5, 90), slice(0, 61)))),
                           decoder=decoder)
    np.testing.assert_allclose(data, whole, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("layer, stages", [(1, None), ("decoder", None), ("hypercolumn", None),
                                           ("hypercolumn", [0, 2])])
def test_each_layer_has_its_channels_and_grid(restore_checkpoint: Path, layer: int | str,
                                              stages: list[int] | None) -> None:
    encoder, decoder = load_network(restore_checkpoint)
    assert decoder is not None
    image = make_synthetic_em((2, 64, 80), seed=1).raw.astype(np.float32) / 255
    feats = dense_features(encoder, image, layer=layer, decoder=decoder, stages=stages)
    maps = list(range(len(encoder.feature_channels))) if stages is None else stages
    channels, stride = {1: (encoder.feature_channels[1], encoder.feature_strides[1]),
                        "decoder": (decoder.width, (1, 1)),
                        "hypercolumn": (sum(encoder.feature_channels[i] for i in maps), (1, 1))}[layer]
    assert feats.shape == (channels, 2, -(-64 // stride[0]), -(-80 // stride[1]))
    if layer == "hypercolumn":      # the maps upsampled to full resolution, one after the other
        parts = [dense_features(encoder, image, layer=i, stride=1) for i in maps]
        np.testing.assert_array_equal(feats, np.concatenate(parts))


def test_a_hypercolumn_store_equals_the_whole_region(synth_zarr: Path, restore_checkpoint: Path,
                                                     tmp_path: Path) -> None:
    summary = features(tmp_path, restore_checkpoint, synth_zarr, tmp_path / "f.zarr", "roi=[0:2,0:70,0:36]",
                       "layer=hypercolumn", "stages=[0,2]", "stride=2", "block_shape=[1,16,18]")
    encoder, decoder = load_network(restore_checkpoint)
    data = zarr.open_array(str(tmp_path / "f.zarr/0"), mode="r")[...].astype(np.float32)
    assert data.shape == (encoder.feature_channels[0] + encoder.feature_channels[2], 2, 35, 18)
    assert summary["blocks"] == 6 and summary["stride"] == [1, 2, 2]
    volume = Volume(synth_zarr)
    whole = dense_features(encoder, volume.normalize(volume.read((slice(0, 2), slice(0, 70), slice(0, 36)))),
                           layer="hypercolumn", stages=[0, 2], stride=2)
    np.testing.assert_allclose(data, whole, atol=2e-2, rtol=1e-2)


def test_a_fine_tuned_decoder_is_there_when_asked(synth_zarr: Path, two_step_finetuned: Callable[[str], Path],
                                                  tmp_path: Path) -> None:
    """The decoder is the default of a whole-network pretraining only; a fine-tuned one (UNETR) gives it when asked."""
    checkpoint, region = two_step_finetuned("vit2d"), "roi=[0:1,0:40,0:32]"
    default = features(tmp_path, checkpoint, synth_zarr, tmp_path / "a.zarr", region)
    asked = features(tmp_path, checkpoint, synth_zarr, tmp_path / "b.zarr", region, "layer=decoder")
    _, decoder = load_network(checkpoint)
    assert zarr.open_group(str(tmp_path / "a.zarr"), mode="r").attrs["emfm"]["features"]["layer"] == 3
    assert default["stride"] == [1, 8, 8] and decoder is not None
    assert asked["stride"] == [1, 1, 1]
    assert zarr.open_array(str(tmp_path / "b.zarr/0")).shape == (decoder.width, 1, 40, 32)


def test_bad_layers_are_named(synth_zarr: Path, vit_checkpoint: Path, tmp_path: Path) -> None:
    cases = {"layer=decoder: the checkpoint holds no decoder": ["layer=decoder"],          # an MAE: an encoder alone
             r"stages=\[0\]: the maps of layer=hypercolumn, not of layer=1": ["layer=1", "stages=[0]"],
             r"stages=\[0, 9\]: the encoder has 4 feature maps": ["layer=hypercolumn", "stages=[0,9]"],
             "layer=middle: expected an encoder map": ["layer=middle"]}
    for i, (message, extra) in enumerate(cases.items()):
        with pytest.raises(EmfmError, match=message):
            features(tmp_path, vit_checkpoint, synth_zarr, tmp_path / f"{i}.zarr", *extra)
        assert not (tmp_path / f"{i}.zarr").exists()


def filters(tmp_path: Path, volume: Path, output: Path, *extra: str) -> dict:
    return compose_run("features", ["source=filters", f"input={volume}", f"output={output}",
                                    f"paths.output_dir={tmp_path / 'run'}", "progress=false", *extra])


@pytest.mark.parametrize("anisotropy", [1.0, 5.0])
def test_filter_store_equals_the_bank_on_the_whole_region(tmp_path: Path, anisotropy: float) -> None:
    """Blocks read with the bank's halo equal the bank on the whole region; thick z voxels (the volume's metadata)
    are filtered slice by slice."""
    path = save_synthetic(make_synthetic_em((4, 70, 60), anisotropy=anisotropy, seed=2), tmp_path / "v.zarr")
    summary = filters(tmp_path, path, tmp_path / "f.zarr", "roi=[1:4,3:70,0:55]", "block_shape=[2,24,32]",
                      "filters.sigmas=[1.0,3.5]")
    volume, region = Volume(path), (slice(1, 4), slice(3, 70), slice(0, 55))
    bank = FilterBank((1.0, 3.5), per_slice=anisotropy > 2)
    whole = bank(volume.normalize(volume.read(region)))
    store = zarr.open_group(str(tmp_path / "f.zarr"), mode="r")
    data = store["0"][...].astype(np.float32)
    assert data.shape == whole.shape == (16 if anisotropy > 2 else 20, 3, 67, 55) and summary["blocks"] == 12
    assert store.attrs["emfm"]["features"]["bank"]["per_slice"] == (anisotropy > 2)
    scale = store.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale == [1.0, *volume.voxel_size] and summary["stride"] == [1, 1, 1]
    np.testing.assert_allclose(data, whole, rtol=1e-3, atol=1e-3)        # float16 as stored


def test_an_unfinished_filter_store_is_continued(synth_zarr: Path, tmp_path: Path) -> None:
    common = ["roi=[0:2,0:64,0:64]", "block_shape=[1,32,32]", "filters.sigmas=[1.0]"]
    done = filters(tmp_path, synth_zarr, tmp_path / "f.zarr", *common)
    reference = zarr.open_array(str(tmp_path / "f.zarr/0"), mode="r")[...]
    root = zarr.open_group(str(tmp_path / "f.zarr"), mode="r+")             # a run that died after its first blocks
    root.attrs["emfm"] = {**root.attrs["emfm"], "complete": False}
    progress = root.create_array("_progress/features", shape=(2, 2, 2), chunks=(1, 1, 1), dtype=bool, fill_value=False)
    progress[0] = True
    root["0"][:, 1:] = 0
    resumed = filters(tmp_path, synth_zarr, tmp_path / "f.zarr", *common)
    assert done["computed"] == 8 and resumed["computed"] == 4
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "f.zarr/0"), mode="r")[...], reference)
    assert filters(tmp_path, synth_zarr, tmp_path / "f.zarr", *common)["computed"] == 0
    with pytest.raises(EmfmError, match="already holds a different, complete feature store"):
        filters(tmp_path, synth_zarr, tmp_path / "f.zarr", *common[:2], "filters.sigmas=[2.0]")


def test_bad_source_settings_are_named(synth_zarr: Path, vit_checkpoint: Path, tmp_path: Path) -> None:
    cases = {"checkpoint: required with source=encoder": ["source=encoder"],
             "source=pixels: expected one of encoder, filters": ["source=pixels"],
             f"checkpoint={vit_checkpoint}: source=filters computes the filter bank, which takes no checkpoint":
                 [f"checkpoint={vit_checkpoint}"],
             "layer=decoder: source=filters": ["layer=decoder"],
             "stride=4: the filter bank gives features per voxel": ["stride=4"],
             r"filters.sigmas=\[0.0\]: expected at least one sigma, all positive": ["filters.sigmas=[0]"],
             r"filters.sigmas=\['a'\]: expected a list of positive numbers": ["filters.sigmas=[a]"]}
    for i, (message, extra) in enumerate(cases.items()):
        with pytest.raises(EmfmError, match=message):
            filters(tmp_path, synth_zarr, tmp_path / f"{i}.zarr", *extra)
        assert not (tmp_path / f"{i}.zarr").exists()
