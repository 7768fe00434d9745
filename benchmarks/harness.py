"""How the benchmarks measure: timed steps, fresh processes, peak RSS, repeats and their ratios, FLOPs and the
machine's peak FLOP/s.

Every benchmark times its arms with these, so that two figures in docs/benchmarks.md taken by different
benchmarks mean the same thing (what a step's time holds, which process's memory, how a ratio pairs runs).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

WARMUP = 3  # steps not timed: worker start-up, first allocations, the step-1 reconstruction image
PRELOAD = ["torch", "timm", "lightning.pytorch", "hydra", "emfm.run"]   # what every arm imports: the slow part
T = TypeVar("T")


def command_line(name: str, doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's flags, its docstring (what it measures, its commands) as their help, named as it is run."""
    return argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def config(overrides: list[str], command: str = "pretrain") -> DictConfig:
    """The command's real composed config, as ``emfm COMMAND`` composes it."""
    with initialize_config_module("emfm.configs", version_base="1.3"):
        return compose(command, overrides=overrides)


def machine() -> str:
    """What a table's figures depend on besides the code: torch, its threads and how they wait."""
    return (f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")


# --- timing -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One timed run, per timed step where not said otherwise.

    ``between``: wall seconds outside the step (ours: waiting for the next batch, Lightning's
    bookkeeping and logger writes between batches). ``cpu``: CPU seconds of the training process
    (all its threads). ``loader_cpu``: CPU seconds of the DataLoader workers per batch over the
    whole run, start-up included. ``first``: wall seconds of the first step (not timed otherwise).
    """

    rate: float
    between: float
    cpu: float
    loader_cpu: float
    rss_mib: float
    threads: int
    first: float


@dataclass(frozen=True)
class Result:
    """One arm's run: throughput, peak RSS, what it computed (``facts``) and arm-specific numbers."""

    rate: float
    rss_mib: float
    facts: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class Clock:
    """Wall time at the start and end of every step, CPU time at the end."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.cpu: list[float] = []

    def start(self) -> None:
        self.starts.append(time.perf_counter())

    def end(self) -> None:
        self.ends.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def run(self, batch: int, timed_steps: int) -> Run:
        """The first ``timed_steps`` after the warm-up: from the end of step WARMUP to the end of the last."""
        first, last = WARMUP - 1, WARMUP - 1 + timed_steps
        gaps = [s - e for s, e in zip(self.starts[first + 1 : last + 1], self.ends[first:last])]
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return Run(
            rate=timed_steps * batch / (self.ends[last] - self.ends[first]),
            between=statistics.mean(gaps),
            cpu=(self.cpu[last] - self.cpu[first]) / timed_steps,
            loader_cpu=(children.ru_utime + children.ru_stime) / len(self.ends),
            rss_mib=peak_rss_mib(),
            threads=torch.get_num_threads(),
            first=self.ends[0] - self.starts[0],
        )


# --- FLOPs and the machine's peak -------------------------------------------------------------------------------


def attention(query: torch.Size, key: torch.Size, value: torch.Size, *args: Any, **kwargs: Any) -> int:
    return int(sdpa_flop_count(query, key, value))


def attention_backward(grad: torch.Size, query: torch.Size, key: torch.Size, value: torch.Size, *args: Any,
                       **kwargs: Any) -> int:
    return int(sdpa_backward_flop_count(grad, query, key, value))


# torch's counter knows the CUDA attention kernels only; on a CPU scaled_dot_product_attention runs these
CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: attention,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: attention_backward}


def flops(work: Callable[[], object]) -> int:
    """The FLOPs ``work()`` runs as torch's ``FlopCounterMode`` counts them: matrix products, convolutions and
    attention (2 per multiply-add), forward and backward. Everything else counts 0: elementwise operations,
    normalisation, softmax, pooling, interpolation, optimizer updates."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        work()
    return counter.get_total_flops()


def peak(work: Callable[[], object], repeats: int = 5) -> float:
    """FLOP/s of ``work()`` in its fastest of ``repeats`` timed runs (after the counting run, which warms up)."""
    count = flops(work)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - start)
    return count / min(seconds)


def matmul_peak(n: int = 4096, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of an n x n @ n x n product (float32, or bfloat16: AMX tiles where the CPU has them): the most a CPU's
    BLAS gets out of this process's threads."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return peak(lambda: a @ b, repeats)


def conv_peak(batch: int = 8, channels: int = 64, size: int = 256, channels_last: bool = False,
              repeats: int = 5) -> float:
    """FLOP/s of a float32 3x3 2-D convolution's forward (channels -> channels on batch x size x size), a CNN layer
    of realistic size; in channels-last memory if asked (oneDNN's fast layout on CPUs)."""
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    images = torch.randn(batch, channels, size, size)
    if channels_last:
        conv, images = conv.to(memory_format=torch.channels_last), images.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        return peak(lambda: conv(images), repeats)


# --- repeats and ratios -----------------------------------------------------------------------------------------


@dataclass
class Arm:
    """The runs of one arm; for ours also each run's rate over the mean of the reference runs around it."""

    runs: list[Run] = field(default_factory=list)
    paired: list[float] = field(default_factory=list)

    def mean(self, key: str = "rate") -> float:
        return statistics.mean(getattr(r, key) for r in self.runs)

    def summary(self) -> str:
        rates = [r.rate for r in self.runs]
        return f"{self.mean():6.2f} ({min(rates):.2f}-{max(rates):.2f})"


def paired(run: Run, before: Run, after: Run) -> float:
    """``run``'s rate over the mean of the reference runs right before and after it: arms alternate, and the
    ratio cancels slow drifts of the machine's load."""
    return 2 * run.rate / (before.rate + after.rate)


# --- processes and memory ---------------------------------------------------------------------------------------


def peak_rss_mib() -> float:
    """This process's peak resident memory, MiB: Linux's VmHWM where there is one. Not ``ru_maxrss``: a process
    started by fork + exec (spawn, subprocess) carries there the resident memory of the process that started it."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_fresh_process(arm: Callable[..., T], *args: Any, memory_gib: float | None = None,
                     method: str = "spawn") -> T:
    """``arm(*args)`` in a new process whose DataLoader workers start as they would in ours.

    ``method="spawn"``: a new interpreter, as a user's command starts (~8 s of imports here).
    ``"forkserver"``: forked from a server that imported ``PRELOAD`` once, so a benchmark pays those
    imports once, not once per arm; the server runs nothing else, so no arm's heap and no torch
    thread pool exist before the fork. Its peak RSS leaves out the library pages touched only while
    importing (~0.5 GiB with torch's CUDA build here): compare such figures only with each other.
    Either way the process would start its own workers by its own method (re-importing torch and
    emfm in every epoch's workers) instead of forking as `emfm pretrain` does on Linux: it is set back.
    ``memory_gib``: the process's address-space limit (RLIMIT_AS); past it allocations fail there.
    """
    context = multiprocessing.get_context(method)
    if method == "forkserver":   # heeded when the server starts (the first call). The arm's own module is
        context.set_forkserver_preload(PRELOAD)   # imported by each process: the 3.11 server ignores sys.path
    with ProcessPoolExecutor(1, mp_context=context, initializer=start_process,
                             initargs=(multiprocessing.get_start_method(), memory_gib)) as pool:
        return pool.submit(arm, *args).result()


def start_process(method: str, memory_gib: float | None = None) -> None:
    multiprocessing.set_start_method(method, force=True)
    if memory_gib is not None:
        limit = int(memory_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
