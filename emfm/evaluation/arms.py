"""The runs of ``emfm compare``: each arm's fine-tuning overrides, training them (side by side), scoring them.

An arm is a start (random weights, the pretraining checkpoint, or a peer tool) and a semi-supervised loss
or none; every arm runs the recipe's fine-tuning with the same slices, steps, augmentation and seeds, so only
the start and the loss tell two runs apart. Training goes through :mod:`emfm.run`, as ``emfm finetune`` does;
scoring through ``emfm evaluate``'s :func:`~emfm.evaluation.evaluate.evaluate_slices`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from emfm import run
from emfm.checkpoints import load_segmenter
from emfm.data.labeled import LabeledVolume
from emfm.evaluation import peers
from emfm.evaluation.comparison import METRICS, side_by_side, summarize
from emfm.evaluation.evaluate import THRESHOLDS, Segments, evaluate_slices
from emfm.threads import default_workers

LR_RULE = "highest IoU on --val-slices (to 3 decimals), then highest V_rand; +semi arms use their base arm's"
LOGGING = ["logger=default", "~logger.tensorboard", "callbacks.progress_bar=null", "trainer.enable_model_summary=false"]


@dataclass
class Plan:
    """Everything a comparison does, checked before any training."""

    recipe: str
    raw: str
    labels: str
    unlabeled: list[str]
    target: str
    labeled_sets: list[list[int]]
    eval_slices: list[int]
    val_slices: list[int]
    seeds: list[int]
    lrs: list[float]
    encoder: str | None         # given: no pretraining
    pretrain_overrides: list[str]
    finetune_overrides: list[str]
    out: Path
    arms: tuple[str, ...] = ()
    semi_choice: str | None = None   # --semi: replaces the recipe's semi-supervised method
    jobs: int = 1                    # fine-tuning runs side by side
    semi: str | None = None     # the +semi arms' method, as composed

    @property
    def work(self) -> Path:
        return self.out.with_suffix("")

    @property
    def full_arm(self) -> str:
        return "pretrained+semi" if self.semi else "pretrained"

    @property
    def finetune_threads(self) -> int:
        return torch.get_num_threads() // self.jobs

    @property
    def pretrains(self) -> bool:
        return self.encoder is None and any(a.startswith("pretrained") for a in self.arms)

    def finetune(self, arm: str, lr: float, slices: Sequence[int], seed: int, run_dir: Path,
                 init: str = "scratch") -> list[str]:
        """Overrides of one fine-tuning run: only ``init`` and ``semi`` tell the arms apart."""
        semi = arm.endswith("+semi")
        user = [o for o in self.finetune_overrides if semi or not o.startswith("semi.")]
        return [f"experiment={self.recipe}/finetune", f"target={self.target}", f"init={init}", f"seed={seed}",
                *(["semi=none"] if not semi else [f"semi={self.semi_choice}"] if self.semi_choice else []),
                f"module.lr={lr}", f"data.raw={self.raw}",
                f"data.labels={self.labels}", f"data.labeled_slices=[{tag(slices)}]", "data.val_slices=null",
                f"data.unlabeled=[{','.join(str(Path(v).resolve()) for v in self.unlabeled)}]",
                "callbacks.model_checkpoint.monitor=null", "++trainer.limit_val_batches=0",
                f"paths.output_dir={run_dir}", "resume=auto", *LOGGING, *user]

    def pretrain(self) -> list[str]:
        volumes = ",".join(str(Path(v).resolve()) for v in [*self.unlabeled, self.raw])
        return [f"experiment={self.recipe}/pretrain", f"data.volumes=[{volumes}]",
                f"paths.output_dir={self.work / 'pretrain'}", "resume=auto", *LOGGING, *self.pretrain_overrides]


def compose_config(command: str, overrides: list[str]) -> DictConfig:
    with initialize_config_module("emfm.configs", version_base="1.3"):
        return compose(command, overrides)


def tag(slices: Sequence[int]) -> str:
    return ",".join(map(str, slices))


class Finetuner:
    """The fine-tuning runs of one comparison: each (arm, lr, slices, seed) is trained once.

    The learning-rate sweep's run at the chosen rate is the arm's first run; it is reused, not repeated.
    """

    def __init__(self, plan: Plan, encoder: str | None, ignore_label: int | None) -> None:
        self.plan, self.encoder = plan, encoder
        self.data = LabeledVolume(plan.raw, plan.labels, ignore_label)
        self.runs: dict[tuple[str, float, str, int], tuple[Path, float]] = {}
        self.reused: list[str] = []
        self.peers: dict[Path, peers.TorchEmRun] = {}     # by checkpoint: the peer runs, scored through their tool

    def train(self, arm: str, lr: float, slices: Sequence[int], seed: int) -> tuple[Path, float]:
        """(last checkpoint, training seconds) of this run."""
        self.train_all([(arm, lr, slices, seed)])
        return self.runs[(arm, lr, tag(slices), seed)]

    def train_all(self, runs: Iterable[tuple[str, float, Sequence[int], int]]) -> None:
        """Train the runs not trained yet, up to ``plan.jobs`` at a time in spawned processes that share the
        torch threads; a run's seconds are its wall time, its process's start included."""
        todo: dict[tuple[str, float, str, int], tuple[Path, Any, Callable[[Any], object]]] = {}
        for arm, lr, slices, seed in runs:
            if (key := (arm, lr, tag(slices), seed)) not in self.runs:
                todo[key] = self.prepare(arm, lr, slices, seed)
        if self.plan.jobs == 1:
            for key, (checkpoint, job, train) in todo.items():
                start = time.perf_counter()
                train(job)
                self.finished(key, checkpoint, start)
            return
        threads = (self.plan.finetune_threads,)
        with ProcessPoolExecutor(self.plan.jobs, get_context("spawn"), torch.set_num_threads, threads) as pool:
            queue = list(todo.items())
            running: dict[Future, tuple[tuple[str, float, str, int], Path, float]] = {}
            while queue or running:
                while queue and len(running) < self.plan.jobs:    # submitted only when a process is free
                    key, (checkpoint, job, train) = queue.pop(0)
                    running[pool.submit(train, job)] = (key, checkpoint, time.perf_counter())
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    key, checkpoint, start = running.pop(future)
                    future.result()                                # a run's error stops the comparison here
                    self.finished(key, checkpoint, start)

    def finished(self, key: tuple[str, float, str, int], checkpoint: Path, start: float) -> None:
        self.runs[key] = (checkpoint, time.perf_counter() - start)
        print(f"trained {self.run_dir(*key).name} in {self.runs[key][1]:.0f} s", flush=True)

    def run_dir(self, arm: str, lr: float, slices: str, seed: int) -> Path:
        return self.plan.work / f"slices{slices.replace(',', '-')}_seed{seed}_{arm.replace('+', '_')}_lr{lr:g}"

    def prepare(self, arm: str, lr: float, slices: Sequence[int],
                seed: int) -> tuple[Path, DictConfig | peers.TorchEmRun, Callable[[Any], object]]:
        """(last checkpoint, job, the function that trains it) of a run: emfm's fine-tuning of its composed
        config, or a peer's training of what the scratch arm's config composes (same slices, patches, batch,
        steps, seed). A run an earlier invocation finished is reused."""
        run_dir = self.run_dir(arm, lr, tag(slices), seed)
        init = self.encoder if arm.startswith("pretrained") and self.encoder else "scratch"
        cfg = compose_config("finetune", self.plan.finetune(arm, lr, slices, seed, run_dir, init))
        job: DictConfig | peers.TorchEmRun = cfg
        train: Callable[[Any], object] = run.finetune
        checkpoint = run_dir / "checkpoints" / "last.ckpt"
        if arm in peers.PEERS:      # the config composed for it is the scratch arm's (init=scratch, semi=none)
            peer = peers.TorchEmRun.from_config(cfg, run_dir)
            job, train, checkpoint = peer, peers.train_torch_em, peer.checkpoint
            self.peers[checkpoint] = peer
        chosen = {o.split("=")[0].lstrip("+~") for o in self.plan.finetune_overrides}
        if self.plan.jobs > 1 and "data.num_workers" not in chosen:
            share = default_workers(self.plan.jobs)     # runs side by side: loader processes only from spare cores
            cfg.data.num_workers = share if cfg.data.num_workers is None else min(cfg.data.num_workers, share)
        if checkpoint.is_file():
            self.reused.append(run_dir.name)
        return checkpoint, job, train

    def score(self, checkpoint: Path, slices: Sequence[int]) -> tuple[dict[str, Any], tuple, float]:
        """(scores, (raw, probs, labels) of the last slice, seconds) on ``slices``; the instance threshold
        is chosen on the val slices (on ``slices`` when they are the val slices or there are none)."""
        start = time.perf_counter()
        tune = [] if list(slices) == self.plan.val_slices else self.plan.val_slices
        model: Segments = peers.load_torch_em(self.peers[checkpoint]) if checkpoint in self.peers \
            else load_segmenter(checkpoint)
        scored = evaluate_slices(model, self.data, slices, tune, THRESHOLDS)
        return scored["report"], scored["example"], time.perf_counter() - start


def sweep_lrs(plan: Plan, tuner: Finetuner) -> dict[str, Any]:
    """Each base arm's learning rate, from the same sweep on the first slice set and seed."""
    bases = [b for b in ("scratch", "pretrained") if any(a.split("+")[0] == b for a in plan.arms)]
    table, chosen, seconds = [], {}, {"train": 0.0, "evaluate": 0.0}
    if len(plan.lrs) == 1:
        return {"lrs": plan.lrs, "rule": "one learning rate given: no sweep", "runs": [],
                "chosen": dict.fromkeys(bases, plan.lrs[0]), "seconds": seconds}
    tuner.train_all((base, lr, plan.labeled_sets[0], plan.seeds[0]) for base in bases for lr in plan.lrs)
    for base in bases:
        rows = []
        for lr in plan.lrs:
            checkpoint, train_seconds = tuner.train(base, lr, plan.labeled_sets[0], plan.seeds[0])
            scores, _, eval_seconds = tuner.score(checkpoint, plan.val_slices)
            rows.append({"arm": base, "lr": lr, **{m: scores[m] for m in METRICS if m in scores}})
            seconds["train"] += train_seconds
            seconds["evaluate"] += eval_seconds
        chosen[base] = max(rows, key=lambda r: (round(r["iou"], 3), r.get("vrand", 0.0)))["lr"]
        table += rows
    return {"lrs": plan.lrs, "rule": LR_RULE, "labeled_slices": plan.labeled_sets[0], "seed": plan.seeds[0],
            "val_slices": plan.val_slices, "runs": table, "chosen": chosen, "seconds": seconds}


def run_arms(plan: Plan, tuner: Finetuner, lrs: dict[str, float]) -> tuple[dict, dict, list[Path]]:
    """Every arm x slice set x seed: ({arm: {set: summary}}, {set: {arm: seconds}}, pictures)."""
    results: dict[str, dict[str, Any]] = {arm: {} for arm in plan.arms}
    seconds: dict[str, dict[str, dict[str, float]]] = {}
    pictures = []
    tuner.train_all((arm, lrs[arm], s, seed) for s in plan.labeled_sets for arm in plan.arms for seed in plan.seeds)
    for slices in plan.labeled_sets:
        examples: dict[str, tuple] = {}
        seconds[tag(slices)] = {}
        for arm in plan.arms:
            rows, spent = [], {"train": 0.0, "evaluate": 0.0}
            for seed in plan.seeds:
                checkpoint, training = tuner.train(arm, lrs[arm], slices, seed)
                scores, example, scoring = tuner.score(checkpoint, plan.eval_slices)
                rows.append({"seed": seed, "checkpoint": str(checkpoint), **scores})
                spent["train"], spent["evaluate"] = spent["train"] + training, spent["evaluate"] + scoring
                examples.setdefault(arm, example)
            results[arm][tag(slices)], seconds[tag(slices)][arm] = summarize(rows), spent
        raw, _, truth = next(iter(examples.values()))
        pictures.append(plan.out.with_name(f"{plan.out.stem}_slices{tag(slices).replace(',', '-')}.png"))
        side_by_side(pictures[-1], raw, truth, {arm: example[1] for arm, example in examples.items()},
                     f"the last eval slice; trained on slices {tag(slices)}, seed {plan.seeds[0]}")
    return results, seconds, pictures
