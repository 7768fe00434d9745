"""CPU threads of the processes emfm runs side by side: loader workers, Dask workers, the OpenMP wait policy."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import IterableDataset

from emfm import threads
from emfm.blockwise.executor import Executor
from emfm.data.datamodule import PatchDataModule

WAITING = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS")


class WorkerThreads(IterableDataset):
    """Yields the torch threads and the OpenMP wait policy of the process that iterates it."""

    def __iter__(self):
        yield torch.get_num_threads(), os.environ.get("OMP_WAIT_POLICY")


def test_a_dataloader_worker_computes_on_one_thread(synth_zarr: Path, monkeypatch) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    before = torch.get_num_threads()
    torch.set_num_threads(2)        # the training process's team; its worker must not start another of that size
    try:
        loader = PatchDataModule([str(synth_zarr)], [32, 32], num_workers=1)._loader(WorkerThreads(), batch_size=None)
        assert list(loader) == [[1, "PASSIVE"]]      # (the loader makes the pair a list)
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def two_cores(monkeypatch) -> None:
    for key in WAITING:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(threads, "cores", lambda: 2)


def test_threads_wait_passively_only_where_processes_would_outnumber_the_cores(two_cores, monkeypatch) -> None:
    assert not threads.wait_passively(1) and "OMP_WAIT_POLICY" not in os.environ     # alone: spinning is fastest
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert not threads.wait_passively(2)                # one torch thread + one worker on two cores
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads.wait_passively(2) and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")     # the user's choice stands
    assert not threads.wait_passively(3) and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")       # so does a spin count
    assert not threads.wait_passively(3) and "OMP_WAIT_POLICY" not in os.environ


def test_loader_workers_leave_each_training_a_core(monkeypatch) -> None:
    for n, alone, two_side_by_side in ((1, 0, 0), (2, 1, 0), (4, 3, 1), (16, 4, 4)):
        monkeypatch.setattr(threads, "cores", lambda n=n: n)
        assert (threads.default_workers(), threads.default_workers(2)) == (alone, two_side_by_side)


def test_a_local_dask_cluster_gets_no_more_torch_threads_than_cores(two_cores) -> None:
    assert threads.task_threads(2, 1) == 1 and threads.task_threads(1, 2) == 1 and threads.task_threads(4, 2) == 1
    assert Executor("dask", n_workers=1, threads_per_worker=2).threads(None) == 1
    assert Executor("dask", "tcp://scheduler:8786", n_workers=1, threads_per_worker=2).threads(None) == 2  # not ours
    assert Executor("local").threads(3) == 3


# The `emfm` command in a fresh interpreter, noting the wait policy at the moment torch is first imported (when
# OpenMP reads it); a missing volume stops the command right after.
FIRST_IMPORT = """
import os, sys
seen = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("OMP_WAIT_POLICY"))
sys.meta_path.insert(0, Watch())
from emfm.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(seen)
"""


def test_the_command_sets_the_wait_policy_before_torch_loads(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in WAITING}
    done = subprocess.run([sys.executable, "-c", FIRST_IMPORT, "pretrain", f"data.volumes=[{tmp_path / 'no.zarr'}]",
                           "data.num_workers=1", f"hydra.run.dir={tmp_path}"], env=env, capture_output=True, text=True)
    assert done.stdout.splitlines()[-1] == "['PASSIVE']", done.stdout + done.stderr
