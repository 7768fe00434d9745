"""Shared fixtures: a synthetic OME-Zarr volume made by emfm itself, and the real configs composed."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf

from emfm import threads
from emfm.data.ingest import write_ome_zarr
from emfm.data.synthetic import make_synthetic_em, save_synthetic
from emfm.data.volume import Volume

# A shell starts a background job (`make test &`, nohup) with SIGINT ignored, and commands started from it inherit
# that: the tests that press Ctrl-C on a command need it as a terminal gives it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Tests run the real configs with a tiny encoder (configs/model/tiny/) and configs/debug/tiny.yaml (small batches,
# no workers, no progress bar); these are the few keys left that belong to one command or objective.
TINY_OBJECTIVES = {
    "mae": ["objective.methods.mae.decoder_dim=32", "objective.methods.mae.decoder_depth=1",
            "objective.methods.mae.decoder_heads=2"],
    "mim": ["objective.methods.mim.decoder_dim=16"],
    "mocov3": ["objective.methods.mocov3.proj_dim=16", "objective.methods.mocov3.hidden_dim=32"],
    "simclr": ["objective.methods.simclr.proj_dim=16", "objective.methods.simclr.hidden_dim=32"],
    "densecl": ["objective.methods.densecl.proj_dim=16", "objective.methods.densecl.hidden_dim=32"],
    "restore": ["++head.channels=8", "objective.methods.restore.mask_patch=8"],
    "hybrid": ["objective.methods.masked.decoder_dim=32", "objective.methods.mocov3.proj_dim=16",
               "objective.methods.mocov3.hidden_dim=32"],
}


def tiny(model: str = "vit2d", objective: str = "mae", debug: str = "tiny") -> list[str]:
    """Overrides for a seconds-long pretraining of ``model=tiny/MODEL objective=OBJECTIVE`` (debug=fdr: one batch)."""
    return [f"model=tiny/{model}", f"objective={objective}", *TINY_OBJECTIVES[objective], f"debug={debug}",
            "objective.warmup_steps=2", "data.val_patches=4"]


# The tiny ViT MAE of the session's pretrained encoder (vit_checkpoint), at 8 patches a batch.
TINY_PRETRAIN = [*tiny(), "data.batch_size=8", "data.val_patches=8"]
# A seconds-long fine-tuning, with model=tiny/...
TINY_FINETUNE = ["debug=tiny", "module.warmup_steps=2"]


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``-n N``) the N workers share the cores: each gets its share of torch threads and OpenMP
    threads sleep while they wait, or N spinning thread teams slow each other down many times over (see
    docs/benchmarks.md). Set in the controller before it starts the workers, which inherit it; a setting of the
    user's stands."""
    workers = getattr(config.option, "numprocesses", None)
    if isinstance(workers, int) and workers > 1 and "PYTEST_XDIST_WORKER" not in os.environ:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, threads.cores() // workers)))
        if not any(key in os.environ for key in threads.WAIT_SETTINGS):
            os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


@functools.cache
def tiny_encoder(model: str) -> dict[str, Any]:
    """The model config of ``model=tiny/MODEL``, for tests that build an encoder or module directly."""
    with initialize_config_module("emfm.configs", version_base="1.3"):
        cfg = compose("pretrain", [f"model=tiny/{model}", "data.volumes=[v.zarr]"])
    return OmegaConf.to_container(cfg.model, resolve=True)


def fixed_batch_losses(module: torch.nn.Module, images: torch.Tensor, steps: int, lr: float) -> list[float]:
    """An objective's loss over ``steps`` AdamW steps on one batch, the same mask every step."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = module.compute_loss(images, torch.Generator().manual_seed(0))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def compose_run(name: str, overrides: list[str]) -> Any:
    """Run the command ``name`` on its real composed config, as ``emfm NAME`` does."""
    from emfm import run

    with initialize_config_module("emfm.configs", version_base="1.3"):
        cfg = compose(name, overrides)
    return getattr(run, name)(cfg)


def finetuned(root: Path, volume: Path, model: str, steps: int, *extra: str) -> Path:
    """The last checkpoint of a real ``emfm finetune`` run on the membranes of the synthetic ``volume``."""
    compose_run("finetune", [f"model=tiny/{model}", *TINY_FINETUNE, "module.lr=3e-3", f"data.raw={volume}",
                             f"data.labels={volume}/labels/membranes", "data.labeled_slices=[0,1,2,3]",
                             "data.val_slices=null", "+trainer.limit_val_batches=0", "logger=none",
                             "callbacks.model_checkpoint.monitor=null", f"trainer.max_steps={steps}",
                             f"paths.output_dir={root}", *extra])
    return root / "checkpoints" / "last.ckpt"


# `emfm ARGV` for each case in a process of its own, forked from one interpreter that imported emfm's commands
# (torch, Lightning, Hydra: seconds) once for the whole session: the real command line, at the cost of the command
# alone. Cases arrive one per line on stdin, with the environment and working directory of the test that asks, and
# their exit status and output go back one line each on stdout. A case may cap the size of the files it writes
# (RLIMIT_FSIZE), which makes writing fail as on a full disk; its output goes through pipes, which the cap does not
# touch.
CLI_SERVER = """
import json, os, resource, signal, sys, traceback
from concurrent.futures import ThreadPoolExecutor
import emfm.cli, emfm.run

def command(argv, max_file_size):
    if max_file_size is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_size, max_file_size))
    try:
        emfm.cli.main(argv)
    except SystemExit as exit:
        if isinstance(exit.code, str):
            print(exit.code, file=sys.stderr)
        return exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
    except BaseException:
        traceback.print_exc()
        return 1
    return 0

replies = os.fdopen(os.dup(1), "w")
for request in sys.stdin:
    argv, max_file_size, environ, cwd = json.loads(request)
    pipes = [os.pipe(), os.pipe()]
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)      # the requests are not the command's input
        for (read, write), fd in zip(pipes, (1, 2)):
            os.dup2(write, fd)
            os.close(read)
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)
        code = command(argv, max_file_size)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    for _, write in pipes:
        os.close(write)
    with ThreadPoolExecutor(2) as pool:      # drained together, however much the command writes
        stdout, stderr = pool.map(lambda fd: os.fdopen(fd, errors="replace").read(), [read for read, _ in pipes])
    replies.write(json.dumps([os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), stdout, stderr]) + "\\n")
    replies.flush()
"""


class CommandLine:
    """``emfm ARGV`` of ``(argv, max_file_size)`` cases, each in its own process forked from one server (CLI_SERVER)
    started at the session's first case; their exit status and output, as ``subprocess.run`` gives them."""

    def __init__(self) -> None:
        self.server: subprocess.Popen | None = None

    def __call__(self, cases: Sequence[tuple[Sequence[str], int | None]]) -> list[subprocess.CompletedProcess]:
        if self.server is None:
            self.server = subprocess.Popen([sys.executable, "-c", CLI_SERVER], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True)
        assert self.server.stdin is not None and self.server.stdout is not None
        done = []
        for argv, max_file_size in cases:
            self.server.stdin.write(json.dumps([list(argv), max_file_size, dict(os.environ), os.getcwd()]) + "\n")
            self.server.stdin.flush()
            reply = self.server.stdout.readline()
            assert reply, f"the emfm command server exited with status {self.server.wait()}"
            code, stdout, stderr = json.loads(reply)
            done.append(subprocess.CompletedProcess(list(argv), code, stdout, stderr))
        return done

    def close(self) -> None:
        if self.server is not None:
            assert self.server.stdin is not None and self.server.stdout is not None
            self.server.stdin.close()        # end of the requests: the server exits
            self.server.wait(timeout=60)
            self.server.stdout.close()


@pytest.fixture(scope="session")
def run_cli() -> Iterator[CommandLine]:
    """Runs ``emfm`` command lines in processes of their own at the cost of the command alone (CommandLine)."""
    cli = CommandLine()
    yield cli
    cli.close()


def later(path: Path, seconds: int = 2) -> None:
    """Move ``path``'s modification time ``seconds`` on, as a save that much later would: a rewrite within one
    tick of a coarse file-system clock keeps the time (and, with tensors of the same shapes, the size)."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + seconds * 10**9))


def file_hashes(path: Path) -> dict[str, str]:
    """sha256 of the file ``path``, or of every file under the folder ``path``: equal before and after = untouched."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def refusal(out: subprocess.CompletedProcess) -> str:
    """The message of a command refused as bad input should be: exit status 2, no traceback, and one line
    ``emfm VERB: error: MESSAGE``, the last of its output."""
    verb = out.args[0]
    errors = [line for line in out.stderr.splitlines() if line.startswith(f"emfm {verb}: error: ")]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert len(errors) == 1 and errors[0] == out.stderr.strip().splitlines()[-1], out.stderr[-3000:]
    return errors[0].removeprefix(f"emfm {verb}: error: ")


def overflowing(volume: Path, out: Path) -> Path:
    """``volume`` as intensities in [0, 0.5] with a float32-max sentinel every 16 pixels: finite as stored (reading
    and normalising accept it) but infinite once normalised, so a run on it meets a non-finite loss at once."""
    raw = Volume(volume).read().astype(np.float32) / 510
    raw[..., ::16, ::16] = np.finfo(np.float32).max
    return write_ome_zarr(raw, out, levels=1)    # no pyramid: its means would overflow


@pytest.fixture(scope="session", autouse=True)
def emfm_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """emfm's cache folder (normalisations of inputs it never writes into) in the session's temporary folder, not
    the user's; commands run in subprocesses inherit it."""
    path, before = tmp_path_factory.mktemp("emfm-cache"), os.environ.get("EMFM_CACHE_DIR")
    os.environ["EMFM_CACHE_DIR"] = str(path)
    yield path
    if before is None:
        del os.environ["EMFM_CACHE_DIR"]
    else:
        os.environ["EMFM_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def synth_zarr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A (16, 96, 96) synthetic EM volume with labels, as OME-Zarr on disk."""
    volume = make_synthetic_em((16, 96, 96), seed=0)
    return save_synthetic(volume, tmp_path_factory.mktemp("data") / "synth.zarr")


def pretrained(root: Path, volume: Path, steps: int, overrides: list[str]) -> Path:
    """The last checkpoint of a real ``emfm pretrain`` run of ``steps`` steps on ``volume``."""
    compose_run("pretrain", [*overrides, f"data.volumes=[{volume}]", f"paths.output_dir={root}",
                             f"trainer.max_steps={steps}", "logger=none"])
    return root / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def vit_checkpoint(synth_zarr: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ViT (patch 8, 32x32 tiles) after a brief (60-step) MAE pretraining on the synthetic volume."""
    return pretrained(tmp_path_factory.mktemp("vit"), synth_zarr, 60, TINY_PRETRAIN)


# The objective of each tiny encoder family's two-step pretraining checkpoint (two_step_pretrained).
FAMILY_OBJECTIVES = {"vit2d": "mae", "cnn2d": "mim", "vit3d": "mae", "cnn3d": "mim"}


@pytest.fixture(scope="session")
def two_step_pretrained(synth_zarr: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The checkpoint of a two-step pretraining of ``model=tiny/FAMILY`` (FAMILY_OBJECTIVES), made at its first use
    and shared by every test that only reads it."""

    @functools.cache
    def checkpoint(family: str) -> Path:
        objective = FAMILY_OBJECTIVES[family]
        return pretrained(tmp_path_factory.mktemp(f"pre_{family}"), synth_zarr, 2, tiny(family, objective))

    return checkpoint


@pytest.fixture(scope="session")
def restore_checkpoint(synth_zarr: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny whole 2-D U-Net (test_resnet and a U-Net decoder) after two steps of objective=restore."""
    return pretrained(tmp_path_factory.mktemp("restore"), synth_zarr, 2, tiny("cnn2d", "restore"))


@pytest.fixture(scope="session")
def two_step_finetuned(synth_zarr: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The checkpoint of a two-step fine-tuning of ``model=tiny/MODEL`` on the synthetic membranes, made at its first
    use and shared by every test that only reads it."""

    @functools.cache
    def checkpoint(model: str) -> Path:
        return finetuned(tmp_path_factory.mktemp(f"ft_{model}"), synth_zarr, model, 2)

    return checkpoint


@pytest.fixture(scope="session")
def model_2d(synth_zarr: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ViT + UNETR fine-tuned for 40 steps on the synthetic membranes."""
    return finetuned(tmp_path_factory.mktemp("ft2d"), synth_zarr, "vit2d", 40)


@pytest.fixture
def compose_config(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose a command's real config, with the run directory in ``tmp_path``."""

    def _compose(name: str, overrides: list[str] = ()) -> DictConfig:
        with initialize_config_module("emfm.configs", version_base="1.3"):
            return compose(name, overrides=[f"paths.output_dir={tmp_path}", *overrides])

    return _compose
