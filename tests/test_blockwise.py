"""The blockwise engine's job: one model per process and job, loaded from the checkpoint the run started with."""

from dataclasses import replace
from pathlib import Path

import torch

from emfm.blockwise.job import BlockJob, cached
from emfm.checkpoints import checkpoint_stamp, load_encoder
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
