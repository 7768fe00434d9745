"""The blockwise engine's job: one model per process and job, loaded from the checkpoint the run started with."""

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from emfm import checkpoints
from emfm.blockwise.grid import BlockGrid
from emfm.blockwise.job import BlockJob, cached
from emfm.blockwise.tiles import SharedTiles, TileOrder
from emfm.checkpoints import SETTLED_NS, checkpoint_digest, checkpoint_stamp, load_encoder
from emfm.inference import covering_tiles, tile_corners
from emfm.models.encoders import Encoder


def test_a_process_loads_the_model_once_per_job_and_again_for_another_job(vit_checkpoint: Path,
                                                                          synth_zarr: Path) -> None:
    loads: list[str] = []

    def load(path: str) -> Encoder:
        loads.append(path)
        return load_encoder(path, as_timm=False)

    job = BlockJob(checkpoint=str(vit_checkpoint), checkpoint_stamp=checkpoint_stamp(vit_checkpoint),
                   input=str(synth_zarr), output="out.zarr", level=0, roi=((0, 16), (0, 96), (0, 96)),
                   tile=(1, 32, 32), block=(4, 64, 64), overlap=0.25, blend="linear", batch_size=2)
    first = cached(job, load)
    assert cached(job, load) is first and cached(replace(job), load) is first     # an equal job: no second load
    assert loads == [str(vit_checkpoint)]

    other = cached(replace(job, overlap=0.5), load)          # a run of other settings gets its own model
    assert other is not first and len(loads) == 2
    assert cached(job, load) is not first and len(loads) == 3  # only the job served last is kept

    given = load_encoder(vit_checkpoint, as_timm=False)      # loaded already by the process that runs the job
    assert cached(job, load, given) is given and cached(job, load) is given and len(loads) == 3

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        cached(replace(job, threads=2), load)                # a Dask worker's share of the cores
        assert torch.get_num_threads() == 2 and len(loads) == 4
    finally:
        torch.set_num_threads(before)


def test_a_checkpoint_is_hashed_once_until_its_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every blockwise command fingerprints its output with the checkpoint's sha256 (a copy is the same checkpoint),
    which read all 78 MB of a ViT-Ti checkpoint at every start. The digest is kept by the file's identity: read from
    the cache while the file is as it was, computed again once it is rewritten, never cached for a file changed
    so recently that a rewrite in the same tick of the file system's clock would keep its identity."""
    monkeypatch.setenv("EMFM_CACHE_DIR", str(tmp_path / "cache"))
    checkpoint, cache = tmp_path / "last.ckpt", tmp_path / "cache" / "checkpoints"
    checkpoint.write_bytes(b"first" * 1000)
    assert checkpoint_digest(checkpoint) == hashlib.sha256(b"first" * 1000).hexdigest()
    assert not cache.exists()                                   # just written: hashed, not cached
    time.sleep(max(0.0, (checkpoint.stat().st_ctime_ns + SETTLED_NS - time.time_ns()) / 1e9) + 0.01)
    assert checkpoint_digest(checkpoint) == hashlib.sha256(b"first" * 1000).hexdigest()
    [entry] = cache.iterdir()
    entry.write_text(json.dumps({"sha256": "cached"}))          # what the cache holds is what is used...
    assert checkpoint_digest(checkpoint) == "cached"
    checkpoint.write_bytes(b"other" * 1000)                     # ...until the file is rewritten (the same size)
    assert checkpoint_digest(checkpoint) == hashlib.sha256(b"other" * 1000).hexdigest()
    copy = Path(shutil.copy(checkpoint, tmp_path / "copy.ckpt"))
    assert checkpoint_digest(copy) == checkpoint_digest(checkpoint)
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("EMFM_CACHE_DIR", str(tmp_path / "file" / "cache"))       # a cache that cannot be made...
    monkeypatch.setattr(checkpoints, "SETTLED_NS", 0)                             # ...written to at once
    assert checkpoint_digest(copy) == hashlib.sha256(b"other" * 1000).hexdigest()
    assert not (tmp_path / "file").is_dir()


@pytest.mark.parametrize("size, tile, block, stride", [((8, 100, 90), (1, 32, 32), (3, 40, 40), None),
                                                       ((16, 96, 120), (8, 32, 32), (8, 40, 56), None),
                                                       ((8, 64, 64), (1, 32, 32), (1, 4, 4), (1, 8, 8))])
def test_tiles_are_numbered_by_their_first_block_then_corner(size: tuple[int, ...], tile: tuple[int, ...],
                                                             block: tuple[int, ...],
                                                             stride: tuple[int, ...] | None) -> None:
    """Batches are runs of this order: numbers and corners map one to one, and the order is the grid's tiles sorted
    by the first block each touches (raster order), then by corner."""
    cells = tuple(-(-n // k) for n, k in zip(size, stride or (1, 1, 1)))
    order = TileOrder.of(size, tile, 0.25, BlockGrid(cells, block), stride)
    corners = tile_corners(size, tile, 0.25, stride)
    assert len(order) == len(corners)
    assert sorted(order.number(c) for c in corners) == list(range(len(corners)))
    assert all(order.corner(order.number(c)) == c for c in corners)
    listed = [order.corner(n) for n in range(len(order))]
    first_block = [tuple(a for a, _ in order.footprint(c)) for c in listed]
    assert list(zip(first_block, listed)) == sorted(zip(first_block, listed))
    assert len(set(first_block)) > 1


def test_a_run_continued_with_another_batch_size_reads_none_of_the_first_runs_batches(tmp_path: Path) -> None:
    """``batch_size`` is not among a store's settings, so an unfinished run may be continued with another: its
    batches hold other tiles, so it computes them rather than read the first run's kept under the same numbers."""
    size, tile, block = (1, 64, 64), (1, 32, 32), (0, 0, 0)
    grid = BlockGrid(size, (1, 32, 32))
    image = torch.rand(1, *size)
    span, corners = covering_tiles(grid.region(block), size, tile, 0.25)
    tiles = SharedTiles.of_block(tmp_path, TileOrder.of(size, tile, 0.25, grid), block, span,
                                 lambda s: image[(slice(None), *s)])

    def model(value: float) -> Callable[[torch.Tensor], torch.Tensor]:     # each run's model answers its own value
        return lambda x: torch.full((len(x), 1, *tile), value)

    first = dict(tiles.run(model(1.0), image[(slice(None), *span)], corners, tile, 3))
    assert len(first) == len(corners) == 4 and list((tmp_path / "_work" / "tiles").glob("*.npy"))
    second = dict(tiles.run(model(2.0), image[(slice(None), *span)], corners, tile, 2))
    assert sorted(second) == sorted(first) and all(bool((out == 2.0).all()) for out in second.values())
