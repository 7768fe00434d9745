"""The blockwise engine's job: one model per process and job, loaded from the checkpoint the run started with."""

import hashlib
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from emfm import checkpoints
from emfm.blockwise.job import BlockJob, cached
from emfm.checkpoints import SETTLED_NS, checkpoint_digest, checkpoint_stamp, load_encoder
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
