"""emfm cluster / seeds: matching and scores on hand-made cases, exact cluster maps, a real run on synthetic EM."""

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from sklearn.metrics import adjusted_rand_score
from sklearn.metrics.cluster import contingency_matrix

import emfm.checkpoints
from emfm.blockwise.grid import BlockGrid
from emfm.data.ingest import write_ome_zarr
from emfm.data.volume import Volume
from emfm.errors import EmfmError
from emfm.explore.clusterer import Clusterer, assign_clusters, upsample_linear
from emfm.explore.pictures import umap_embedding
from emfm.explore.seeds import clusters_to_labels
from emfm.metrics import adjusted_rand_index, matched_iou, merged_iou
from tests.conftest import TINY_FINETUNE, CommandLine, compose_run, file_hashes, refusal

LABELS = "{{membranes:{v}/labels/membranes,mitochondria:{v}/labels/mitochondria}}"


def test_hungarian_matching_on_a_constructed_case() -> None:
    # Greedy (best cluster per class, in class order) would give cluster 0 to both classes 0 and 1;
    # the one-to-one matching must give class 0 cluster 1 and class 1 cluster 0.
    table = np.array([[40, 50, 0],     # cluster 0
                      [60, 0, 0],      # cluster 1
                      [0, 10, 30],     # cluster 2
                      [5, 0, 5]])      # cluster 3 (left over)
    iou, matched = matched_iou(table)
    assert matched.tolist() == [1, 0, 2]
    np.testing.assert_allclose(iou, [60 / (60 + 105 - 60), 50 / (90 + 60 - 50), 30 / (40 + 35 - 30)])
    merged, joined = merged_iou(table)           # clusters 1 and 3 (tie -> class 0) join class 0
    assert joined.tolist() == [1, 0, 2, 0]
    np.testing.assert_allclose(merged, [65 / (70 + 105 - 65), 50 / (90 + 60 - 50), 30 / (40 + 35 - 30)])
    few, unmatched = matched_iou(table[:2])      # two clusters, three classes: one class stays unmatched
    assert unmatched.tolist() == [1, 0, -1] and few[2] == 0


def test_adjusted_rand_index_agrees_with_sklearn() -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, 5000)
    clusters = np.where(rng.random(5000) < 0.7, truth, rng.integers(0, 6, 5000))
    table = contingency_matrix(clusters, truth)
    assert adjusted_rand_index(table) == pytest.approx(adjusted_rand_score(truth, clusters), abs=1e-12)
    assert adjusted_rand_index(contingency_matrix(truth, truth)) == pytest.approx(1.0)


def test_cluster_map_is_kmeans_of_interpolated_features_and_blockwise_exact() -> None:
    rng = np.random.default_rng(1)
    cells = rng.normal(size=(6, 5, 7)).astype(np.float32)           # (F, Yc, Xc)
    clusterer = Clusterer("kmeans", 4, "sklearn").fit(cells.reshape(6, -1).T)
    stride, voxels = (4, 4), (18, 27)                                  # the last cells cover a partial edge
    scores = clusterer.scores(cells.reshape(6, -1).T).T.reshape(4, 5, 7)
    whole = upsample_linear(scores, (slice(0, 5), slice(0, 7)), (slice(0, 18), slice(0, 27)), stride, (5, 7))
    dense = torch.nn.functional.interpolate(torch.from_numpy(cells)[None], scale_factor=4, mode="bilinear",
                                            align_corners=False)[0, :, :18, :27].numpy()
    direct = clusterer.predict(dense.reshape(6, -1).T).reshape(voxels)
    assert (whole.argmax(0) == direct).mean() > 0.999                   # exact up to float ties
    grid = BlockGrid((5, 7), (2, 3))
    stitched = np.zeros(voxels, dtype=int)
    for index in grid:
        region = grid.region(index)
        vox = tuple(slice(c.start * k, min(c.stop * k, n)) for c, k, n in zip(region, stride, voxels))
        margin = tuple(slice(max(0, c.start - 1), min(n, c.stop + 1)) for c, n in zip(region, (5, 7)))
        stitched[vox] = assign_clusters(scores[(slice(None), *margin)], margin, vox, stride, (5, 7))
    assert (stitched == whole.argmax(0)).all()


def test_cluster_ids_are_the_first_best_interpolated_score_in_3d_blocks() -> None:
    """``assign_clusters`` (what `emfm cluster` writes) interpolates the last axis one cluster at a time: it must
    equal the argmax of the whole interpolated scores, ties going to the first cluster, block by block too."""
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(6, 3, 5, 7)).astype(np.float32)         # (k, Zc, Yc, Xc)
    scores[4] = scores[1]                                              # a tie everywhere: cluster 1 wins it
    stride, voxels, grid = (1, 4, 4), (3, 18, 27), (3, 5, 7)           # a 2-D encoder's stride over a stack
    whole = upsample_linear(scores, tuple(slice(0, n) for n in grid), tuple(slice(0, n) for n in voxels), stride,
                            grid).argmax(0)
    assert 4 not in whole and set(np.unique(whole)) > {1}
    cells = BlockGrid(grid, (2, 2, 3))
    stitched = np.full(voxels, 255, dtype=np.uint8)
    for index in cells:
        region = cells.region(index)
        vox = tuple(slice(c.start * k, min(c.stop * k, n)) for c, k, n in zip(region, stride, voxels))
        margin = tuple(slice(max(0, c.start - 1), min(n, c.stop + 1)) for c, n in zip(region, grid))
        stitched[vox] = assign_clusters(scores[(slice(None), *margin)], margin, vox, stride, grid)
    assert (stitched == whole).all()


def test_backends_and_gmm_find_the_same_blobs() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 6, (3, 8))
    truth = rng.integers(0, 3, 3000)
    x = (centres[truth] + rng.normal(size=(3000, 8))).astype(np.float32)
    for method, backend in (("kmeans", "sklearn"), ("kmeans", "minibatch"), ("kmeans", "faiss"), ("gmm", "sklearn")):
        labels = Clusterer(method, 3, backend).fit(x).predict(x)
        assert adjusted_rand_score(truth, labels) > 0.99, (method, backend)


def cluster(tmp_path: Path, checkpoint: Path, volume: Path, *extra: str) -> dict:
    return compose_run("cluster", [f"checkpoint={checkpoint}", f"input={volume}", f"output={tmp_path / 'c.zarr'}",
                                   f"paths.output_dir={tmp_path / 'run'}", "progress=false", *extra])


def test_umap_keeps_groups_apart_and_each_point_near_its_own() -> None:
    rng = np.random.default_rng(0)
    groups = np.repeat([0, 1, 2], 60)
    vectors = (rng.normal(size=(180, 16)) + 6 * np.eye(16)[groups]).astype(np.float32)
    embedding = umap_embedding(vectors)
    assert embedding.shape == (180, 2) and np.isfinite(embedding).all()
    distances = np.linalg.norm(embedding[:, None] - embedding[None], axis=-1)
    np.fill_diagonal(distances, np.inf)
    assert (groups[distances.argmin(1)] == groups).all()


def test_clusters_of_pretrained_features_score_above_a_floor(synth_zarr: Path, vit_checkpoint: Path,
                                                             tmp_path: Path) -> None:
    report = cluster(tmp_path, vit_checkpoint, synth_zarr, "k=4", "sample=4000",
                     f"labels={LABELS.format(v=synth_zarr)}",
                     f"report={tmp_path / 'report.json'}")
    assert json.loads((tmp_path / "report.json").read_text()) == report
    for arm in ("learned", "intensity_baseline"):
        assert set(report[arm]["iou"]) == {"background", "membranes", "mitochondria"}
        assert report[arm]["ari"] > 0.05 and report[arm]["voxels"] == 16 * 96 * 96     # both well above chance
    # A 60-step tiny MAE: membranes and cytoplasm separate, well above chance (floors are half the measured values).
    assert report["learned"]["iou"]["membranes"] > 0.15 and report["learned"]["iou"]["background"] > 0.3
    assert report["learned"]["ari"] > 0.05
    out = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")
    assert out["0"].shape == (16, 96, 96) and out["0"].dtype == np.uint8 and out["0"][...].max() == 3
    assert out.attrs["ome"]["multiscales"][0]["axes"][0]["name"] == "z" and out.attrs["emfm"]["complete"]
    # The features are stored whole and projected as the map reads them (one pass over the store, not two).
    assert "pca" not in out["features"] and report["array"] == "0" and report["pca"]["components"] == 32
    for name in ("cluster_maps.png", "umap.png", "gallery.png"):
        assert (tmp_path / "run" / "pictures" / name).stat().st_size > 10_000
    fractions = np.bincount(out["0"][...].ravel(), minlength=4) / out["0"].size
    np.testing.assert_allclose(fractions, report["cluster_fraction"], atol=1e-4)


def test_clusters_of_the_filter_bank_need_no_checkpoint(synth_zarr: Path, tmp_path: Path) -> None:
    report = compose_run("cluster", ["source=filters", f"input={synth_zarr}", f"output={tmp_path / 'c.zarr'}", "k=3",
                                     "sample=4000", "pca=8", "filters.sigmas=[1.0,3.5]", "pictures=null",
                                     f"labels={LABELS.format(v=synth_zarr)}", "progress=false",
                                     f"paths.output_dir={tmp_path / 'run'}"])
    assert "learned" not in report and report["stride"] == [1, 1, 1]
    # Measured: membranes 0.70 (the intensity baseline 0.55), ARI 0.31; the floors are half of that.
    assert report["filters"]["iou"]["membranes"] > 0.35 and report["filters"]["ari"] > 0.15
    out = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")
    assert out["0"].shape == (16, 96, 96) and out["features/0"].shape == (20, 16, 96, 96)      # 10 channels a sigma
    assert out["features"].attrs["emfm"]["features"]["bank"]["sigmas"] == [1.0, 3.5]


def test_chosen_clusters_become_sparse_labels_that_finetune_trains_on(synth_zarr: Path, vit_checkpoint: Path,
                                                                     tmp_path: Path) -> None:
    cluster(tmp_path, vit_checkpoint, synth_zarr, "k=3", "sample=2000", "pictures=null", "roi=[0:16,8:88,0:96]")
    seeds = clusters_to_labels(tmp_path / "c.zarr", {0: 1, 2: 2}, tmp_path / "seeds.zarr", slices=[0, 1, 2, 3])
    labels, clusters = Volume(seeds).read(), zarr.open_array(str(tmp_path / "c.zarr/0"))[...]
    assert labels.shape == (16, 96, 96)                                # the raw grid, not the ROI
    inside = labels[:4, 8:88]
    np.testing.assert_array_equal(inside == 1, clusters[:4] == 0)
    np.testing.assert_array_equal(inside == 2, clusters[:4] == 2)
    assert (inside[clusters[:4] == 1] == 255).all() and (labels[4:] == 255).all() and (labels[:, :8] == 255).all()
    compose_run("finetune", ["model=tiny/vit2d", *TINY_FINETUNE, f"data.raw={synth_zarr}", f"data.labels={seeds}",
                             "data.ignore_label=255", "data.labeled_slices=[0,1,2,3]", "data.val_slices=null",
                             "target=semantic", "target.classes=[1,2]", "trainer.max_steps=3", "data.batch_size=2",
                             "logger=none", "+trainer.limit_val_batches=0", "callbacks.model_checkpoint.monitor=null",
                             f"paths.output_dir={tmp_path / 'ft'}"])
    assert (tmp_path / "ft" / "checkpoints" / "last.ckpt").is_file()
    with pytest.raises(EmfmError, match=r"clusters \[7\] do not exist in .* \(clusters 0..2\)"):
        clusters_to_labels(tmp_path / "c.zarr", {7: 1}, tmp_path / "s.zarr")
    before = file_hashes(tmp_path / "c.zarr")
    with pytest.raises(EmfmError, match=r"output=\S+/c.zarr is the cluster map \S+/c.zarr"):
        clusters_to_labels(tmp_path / "c.zarr", {0: 1}, tmp_path / "c.zarr", overwrite=True)
    assert file_hashes(tmp_path / "c.zarr") == before


def test_bad_cluster_inputs_are_named(synth_zarr: Path, vit_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(EmfmError, match="k=50 is larger than sample=40"):
        cluster(tmp_path, vit_checkpoint, synth_zarr, "k=50", "sample=40", "pca=null", "pictures=null")
    assert not (tmp_path / "c.zarr").exists()                    # refused before anything was created
    corner = ["roi=[0:1,0:16,0:16]", "pca=null", "pictures=null"]  # 2 x 2 feature cells: known only once computed
    with pytest.raises(EmfmError, match="k=5 is larger than the 4 sampled feature vectors"):
        cluster(tmp_path, vit_checkpoint, synth_zarr, "k=5", *corner)
    with pytest.raises(EmfmError, match="not a complete emfm cluster map"):
        clusters_to_labels(tmp_path / "c.zarr", {0: 1}, tmp_path / "s.zarr")        # the k=5 run never finished
    assert cluster(tmp_path, vit_checkpoint, synth_zarr, "k=3", *corner)["k"] == 3   # the corrected rerun takes over
    small = write_ome_zarr(np.zeros((16, 64, 64), np.uint8), tmp_path / "small.zarr", is_label=True)
    with pytest.raises(EmfmError, match=r"labels=.*small.zarr: shape \[16, 64, 64\], but the input has \[16, 96, 96\]"):
        cluster(tmp_path / "b", vit_checkpoint, synth_zarr, f"labels={small}", "pictures=null")
    other = write_ome_zarr(np.zeros((16, 64, 64), np.uint8), tmp_path / "other.zarr")
    wrong = r"features=.*computed on a volume of shape \[16, 96, 96\].*has shape \[16, 64, 64\]"
    with pytest.raises(EmfmError, match=wrong):
        cluster(tmp_path / "c", vit_checkpoint, other, f"features={tmp_path / 'c.zarr' / 'features'}", "pictures=null")


def test_a_local_run_reads_its_checkpoint_once(synth_zarr: Path, vit_checkpoint: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    reads = []
    read = emfm.checkpoints.read_checkpoint
    monkeypatch.setattr(emfm.checkpoints, "read_checkpoint", lambda *a, **kw: reads.append(a[0]) or read(*a, **kw))
    cluster(tmp_path, vit_checkpoint, synth_zarr, "k=2", "roi=[0:2,0:32,0:32]", "pca=null", "pictures=null")
    assert len(reads) == 1                          # the inputs' check and every feature block share one encoder


def test_seeds_that_would_label_nothing_are_refused(synth_zarr: Path, vit_checkpoint: Path, tmp_path: Path,
                                                    run_cli: CommandLine) -> None:
    """`emfm seeds --slices 30-40` on a 16-slice map wrote a store of the ignore label alone, on which fine-tuning
    "trained" at loss 0. Slices outside the map, and clusters without a voxel on the slices asked for, are refused
    before anything is written."""
    cluster(tmp_path, vit_checkpoint, synth_zarr, "k=3", "sample=2000", "pca=null", "pictures=null",
            "roi=[0:16,0:32,0:32]")
    clusters = tmp_path / "c.zarr"
    ids = zarr.open_array(str(clusters / "0"), mode="r+")
    ids[0] = np.where(ids[0] == 0, 1, ids[0])          # cluster 0 holds no voxel on slice 0
    seeds = ["seeds", str(clusters), "--map", "0=1", "--out"]
    outside, empty, fine = run_cli([([*seeds, str(tmp_path / "a.zarr"), "--slices", "30-40"], None),
                                    ([*seeds, str(tmp_path / "b.zarr"), "--slices", "0"], None),
                                    ([*seeds, str(tmp_path / "s.zarr"), "--slices", "0-1"], None)])
    assert refusal(outside) == (f"slices {list(range(30, 41))} lie outside the cluster map {clusters}, which covers "
                                f"slices 0-15")
    assert refusal(empty) == (f"{clusters}: clusters [0] hold no voxel on slices [0]: every seed label would be the "
                              f"ignore label 255, nothing to train on; choose other clusters")
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()
    assert fine.returncode == 0, fine.stderr[-2000:]
    labels, second = Volume(tmp_path / "s.zarr").read(), ids[1]
    assert (labels[0] == 255).all() and (labels[1, :32, :32] == np.where(second == 0, 1, 255)).all()


def test_features_of_another_checkpoint_are_refused(synth_zarr: Path, vit_checkpoint: Path,
                                                    two_step_pretrained: Callable[[str], Path], tmp_path: Path,
                                                    run_cli: CommandLine) -> None:
    """`emfm cluster features=` clustered a store computed with another checkpoint than the one given, without a
    word: both are named. A copy of the store's own checkpoint is the same checkpoint."""
    store, other = tmp_path / "f.zarr", two_step_pretrained("vit2d")
    copy = Path(shutil.copy(vit_checkpoint, tmp_path / "copy.ckpt"))
    region = [f"input={synth_zarr}", "roi=[0:2,0:32,0:32]", "progress=false", f"hydra.run.dir={tmp_path / 'run'}"]
    clusters = [*region, f"features={store}", "k=2", "pca=null", "pictures=null"]
    made, refused, reused = run_cli([
        (["features", f"checkpoint={vit_checkpoint}", f"output={store}", *region], None),
        (["cluster", f"checkpoint={other}", f"output={tmp_path / 'a.zarr'}", *clusters], None),
        (["cluster", f"checkpoint={copy}", f"output={tmp_path / 'b.zarr'}", *clusters], None)])
    assert made.returncode == 0, made.stderr[-2000:]
    assert refusal(refused) == (f"features={store}: computed with checkpoint {vit_checkpoint}, not with "
                                f"checkpoint={other} (their files differ); give that checkpoint, or leave out "
                                f"features= to compute this one's")
    assert not (tmp_path / "a.zarr").exists()
    assert reused.returncode == 0, reused.stderr[-2000:]
