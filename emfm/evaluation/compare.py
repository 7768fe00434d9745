"""``emfm compare``: does pretraining pay on my data? A recipe against supervised training from scratch.

The command's plan (flags checked, the recipe's configs composed once, every refusal a one-line parser error
before any work), then the runs (:mod:`emfm.evaluation.arms`), then REPORT.json, the curve and the pictures
(:mod:`emfm.evaluation.comparison`). What it does, for the user, is its ``--help`` (DESCRIPTION, EPILOG).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from emfm import run
from emfm.data.labeled import LabeledVolume, parse_slices
from emfm.errors import EmfmError
from emfm.evaluation import peers
from emfm.evaluation.arms import Finetuner, Plan, compose_config, run_arms, sweep_lrs, tag
from emfm.evaluation.comparison import paired_differences, plot_curve
from emfm.evaluation.evaluate import THRESHOLDS
from emfm.instances import SEEDING

DESCRIPTION = """\
Does the unlabeled data pay? A recipe against supervised training from scratch on the same few slices.

A recipe is a pretraining experiment configs/experiment/<recipe>/pretrain.yaml and a fine-tuning one
<recipe>/finetune.yaml (which may set semi=; --semi NAME sets or replaces it). emfm compare pretrains once
on the --unlabeled volumes and the raw volume (its labels unused; --encoder skips this), then fine-tunes
these arms, which differ only in their start and their semi-supervised loss:

  scratch           random weights, supervised only: the baseline
  pretrained        from the pretraining checkpoint, supervised only
  scratch+semi      random weights, with the recipe's semi-supervised loss
  pretrained+semi   the recipe's full arm (without semi in the recipe, pretrained is)
  torch-em          only when asked (--arms scratch,torch-em): torch-em's 2-D U-Net and trainer with
                    their own defaults, on the same slices, patches, batch, steps and seeds
                    (pip install 'emfm[peers]')

Every arm runs for each --labeled-slices set and --seeds seed with the recipe's steps and augmentation,
and is scored on --eval-slices: IoU / Dice of the target; V_rand, V_info and VI of the instances (ISBI
2012 convention; cells made as `emfm predict` makes them, at the threshold each run scores best on
--val-slices). Tuned with equal effort: scratch and pretrained each fine-tune with every --lrs value on
the first slice set and seed, scored on --val-slices; each takes the learning rate with the highest val
IoU (to 3 decimals; then the highest V_rand), and its +semi arm uses the same."""

EPILOG = """\
example:
  emfm compare --raw stack1.zarr --labels stack1_membranes.zarr --unlabeled stack2.zarr \\
      --target membrane --labeled-slices 0 --labeled-slices 0,1 --val-slices 10-11 \\
      --eval-slices 15-19 --seeds 0,1,2 --lrs 1e-3,3e-3 --out le/membranes.json

Writes REPORT.json (--out; layout in docs/benchmarks.md), <stem>_curve.png (IoU and V_rand against the
number of labeled slices, one line per arm, error bars one std over seeds), <stem>_slices<set>.png (raw |
truth | every arm's probabilities on one eval slice, first seed) and the runs under <stem>/. Every run
resumes: the same command after a stop, or after a change of scoring, continues the unfinished runs and
only scores the finished ones (the report lists every run an earlier invocation started under
seconds.reused; the time it trained then is not in this report). --jobs 2 trains two runs at a time,
each process on half the torch threads: on a CPU with few cores that is faster than one run on all of
them (docs/benchmarks.md)."""

ARMS = ("scratch", "pretrained", "scratch+semi", "pretrained+semi")
COMPARISONS = (("pretrained+semi", "scratch"), ("pretrained", "scratch"),   # the recipe; pretraining alone
               ("pretrained+semi", "scratch+semi"), ("scratch+semi", "scratch"),  # pretraining with semi; semi alone
               ("pretrained+semi", "torch-em"), ("pretrained", "torch-em"), ("scratch", "torch-em"))  # vs the peer
OWN_KEYS = {  # what the command sets itself; an override of these would make the arms differ
    "pretrain": ("experiment", "data.volumes", "paths.output_dir", "resume"),
    "finetune": ("experiment", "init", "seed", "semi", "module.lr", "target", "data.raw", "data.labels",
                 "data.labeled_slices", "data.val_slices", "data.unlabeled", "paths.output_dir", "resume"),
}
REPORTED = {  # composed settings recorded in the report
    "pretrain": ("model", "head", "objective", "data.patch_shape", "data.batch_size", "trainer.max_steps"),
    "finetune": ("model", "head", "semi", "data.patch_shape", "data.batch_size", "module.layer_decay",
                 "module.warmup_steps", "trainer.max_steps"),
}


def recipe_dir(name: str = "") -> Path:
    return Path(str(files("emfm.configs"))) / "experiment" / name


def composed(cfg: DictConfig, keys: Sequence[str]) -> dict[str, Any]:
    """Selected keys of a composed config, resolved, for the report."""
    picked = {k: OmegaConf.select(cfg, k) for k in keys}
    return {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v for k, v in picked.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emfm compare", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="restore_unet",
                        help="configs/experiment/<recipe>/{pretrain,finetune}.yaml (default restore_unet)")
    parser.add_argument("--raw", required=True, metavar="ZARR", help="raw volume with labels on some slices")
    parser.add_argument("--labels", required=True, metavar="ZARR", help="label volume of the same shape")
    parser.add_argument("--unlabeled", nargs="*", default=[], metavar="ZARR",
                        help="more volumes for pretraining and semi")
    parser.add_argument("--target", default="membrane", choices=["membrane", "foreground", "semantic"])
    parser.add_argument("--labeled-slices", action="append", required=True, metavar="SLICES",
                        help="training slices, e.g. 0,1; give it several times for a curve")
    parser.add_argument("--eval-slices", required=True, metavar="SLICES", help="held-out slices to score, e.g. 15-19")
    parser.add_argument("--val-slices", metavar="SLICES",
                        help="held-out slices that choose the learning rate (not scored)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2 (default 0)")
    parser.add_argument("--lrs", default="1e-3,3e-3", help="learning rates to sweep; one value: no sweep "
                                                           "(default 1e-3,3e-3)")
    parser.add_argument("--semi", metavar="METHOD",
                        help="semi-supervised method of the +semi arms (default: the recipe's), e.g. restore")
    parser.add_argument("--arms", help=f"comma-separated subset of {', '.join(ARMS + peers.PEERS)} (default: all "
                                       "that apply but the peer tools)")
    parser.add_argument("--encoder", metavar="CHECKPOINT",
                        help="skip pretraining: the checkpoint the pretrained arms start from")
    parser.add_argument("--pretrain-override", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override for pretraining (repeatable)")
    parser.add_argument("--finetune-override", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override for every fine-tuning run (repeatable; semi.* only for +semi arms)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="fine-tuning runs trained side by side, each on torch threads / JOBS (default 1)")
    parser.add_argument("--out", type=Path, required=True, metavar="REPORT.json",
                        help="the report; its runs go to the folder of the same name without .json")
    return parser


def make_plan(argv: Sequence[str] | None) -> tuple[Plan, dict[str, Any]]:
    """The checked plan and the composed configs' settings; every problem is a one-line parser error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (recipe_dir(args.recipe) / "finetune.yaml").is_file():
        known = sorted(p.name for p in recipe_dir().iterdir() if (p / "finetune.yaml").is_file())
        parser.error(f"--recipe {args.recipe}: no configs/experiment/{args.recipe}/finetune.yaml; "
                     f"recipes: {', '.join(known)}")
    for phase, overrides in (("pretrain", args.pretrain_override), ("finetune", args.finetune_override)):
        for override in overrides:
            if (key := override.split("=")[0].lstrip("+~")) in OWN_KEYS[phase]:
                parser.error(f"--{phase}-override {override}: the harness sets {key} itself")
    if args.out.suffix != ".json":
        parser.error(f"--out {args.out}: expected a .json file (its runs go to {args.out.with_suffix('')}/)")
    if args.encoder and not Path(args.encoder).exists():
        parser.error(f"--encoder {args.encoder}: no such checkpoint or export directory")
    try:
        depth = LabeledVolume(args.raw, args.labels).depth
        eval_slices = parse_slices(args.eval_slices, depth, "--eval-slices")
        val_slices = parse_slices(args.val_slices, depth, "--val-slices")
        labeled_sets = [parse_slices(spec, depth, "--labeled-slices") for spec in args.labeled_slices]
        seeds = list(dict.fromkeys(int(s) for s in args.seeds.split(",")))
        lrs = list(dict.fromkeys(float(v) for v in args.lrs.split(",")))
    except (EmfmError, ValueError) as err:
        parser.error(str(err))
    for labeled in labeled_sets:
        for name, held_out in (("--eval-slices", eval_slices), ("--val-slices", val_slices)):
            if overlap := sorted(set(labeled) & set(held_out)):
                parser.error(f"--labeled-slices {labeled} overlap {name} at {overlap}; use held-out slices")
    if overlap := sorted(set(val_slices) & set(eval_slices)):
        parser.error(f"--val-slices overlap --eval-slices at {overlap}; choose the learning rate on other slices")
    if not 1 <= args.jobs <= torch.get_num_threads():
        parser.error(f"--jobs {args.jobs}: expected 1 to {torch.get_num_threads()} (the torch threads to share)")
    if len(lrs) > 1 and not val_slices:
        parser.error(f"--lrs {args.lrs}: a learning-rate sweep needs --val-slices (or give one learning rate)")
    plan = Plan(recipe=args.recipe, raw=args.raw, labels=args.labels, unlabeled=args.unlabeled, target=args.target,
                labeled_sets=labeled_sets, eval_slices=eval_slices, val_slices=val_slices, seeds=seeds, lrs=lrs,
                encoder=args.encoder, pretrain_overrides=args.pretrain_override,
                finetune_overrides=args.finetune_override, out=args.out, semi_choice=args.semi, jobs=args.jobs)
    return plan, compose_recipe(parser, plan, args.arms)


def compose_recipe(parser: argparse.ArgumentParser, plan: Plan, arms: str | None) -> dict[str, Any]:
    """Compose the recipe's configs once (bad overrides fail here), learn its semi method, check the arms."""
    try:
        probe = compose_config("finetune", plan.finetune("scratch+semi", plan.lrs[0], plan.labeled_sets[0],
                                                         plan.seeds[0], plan.work))
        plan.semi = probe.semi.name
        own = [a for a in ARMS if plan.semi or not a.endswith("+semi")]
        plan.arms = tuple(dict.fromkeys(arms.split(","))) if arms else tuple(own)
        applicable = [*own, *peers.PEERS]
        if unknown := [a for a in plan.arms if a not in applicable]:
            why = f"semi={plan.semi}" if plan.semi else f"recipe {plan.recipe} has no semi; see --semi"
            parser.error(f"--arms: {', '.join(unknown)} not among {', '.join(applicable)} ({why})")
        if plan.pretrains and not (recipe_dir(plan.recipe) / "pretrain.yaml").is_file():
            parser.error(f"--recipe {plan.recipe} has no pretrain.yaml; pass --encoder CKPT")
        pretrain = compose_config("pretrain", plan.pretrain()) if plan.pretrains else None
    except (HydraException, OmegaConfBaseException) as err:
        parser.error(f"composing recipe {plan.recipe}: {str(err).splitlines()[0]}")
    return {"pretrain": pretrain and composed(pretrain, REPORTED["pretrain"]),
            "finetune": composed(probe, REPORTED["finetune"]),
            "ignore_label": probe.data.ignore_label,
            "torch_em": check_torch_em(parser, plan, probe) if "torch-em" in plan.arms else None}


def check_torch_em(parser: argparse.ArgumentParser, plan: Plan, probe: DictConfig) -> dict[str, Any]:
    """The torch-em arm's settings for the report, or its refusals before any work: torch-em missing, a
    target or patch it cannot train, unlabelled pixels on a labelled slice."""
    if importlib.util.find_spec("torch_em") is None:
        parser.error("--arms torch-em: torch-em is not installed; pip install 'emfm[peers]'")
    try:
        peer = peers.TorchEmRun.from_config(probe, plan.work)
        for slices in plan.labeled_sets:
            replace(peer, slices=tuple(slices)).training_data()
    except EmfmError as err:
        parser.error(str(err))
    return peers.torch_em_settings(peer)


def differences(plan: Plan, results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per slice set, every available paired comparison ``"a - b"`` (same seeds)."""
    pairs = [(a, b) for a, b in COMPARISONS if a in results and b in results]
    return {tag(s): {f"{a} - {b}": paired_differences(results[a][tag(s)]["seeds"], results[b][tag(s)]["seeds"])
                     for a, b in pairs} for s in plan.labeled_sets}


def print_summary(report: dict[str, Any], outputs: Sequence[Path]) -> None:
    def cell(summary: dict[str, Any], metric: str) -> str:
        return f"{summary[metric]:.3f} ± {summary['std'][metric]:.3f}" if metric in summary else "-"

    print(f"\n{'labeled':>10}  {'arm':<16} {'IoU':>13}  {'V_rand':>13}  lr")
    for point in report["curve"]:
        for arm, info in report["arms"].items():
            print(f"{tag(point['labeled_slices']):>10}  {arm:<16} {cell(point[arm], 'iou'):>13}  "
                  f"{cell(point[arm], 'vrand'):>13}  {info['lr']:g}")
    print("\npaired differences (same seed): mean ± std [all positive]")
    for slices, pairs in report["differences"].items():
        for name, metrics in pairs.items():
            shown = [f"{m} {d['mean']:+.3f} ± {d['std']:.3f} [{'yes' if d['all_positive'] else 'no'}]"
                     for m, d in metrics.items() if m in ("iou", "vrand")]
            print(f"{slices:>10}  {name:<32} {'   '.join(shown)}")
    print("\nwrote " + "\n      ".join(map(str, outputs)))


def build_report(plan: Plan, encoder: str | None, results: dict, sweep: dict, lrs: dict[str, float],
                 pictures: Sequence[Path], curve_png: Path, settings: dict, seconds: dict) -> dict[str, Any]:
    first = tag(plan.labeled_sets[0])
    return {
        "recipe": plan.recipe, "recipe_arm": plan.full_arm, "baseline_arm": "scratch",
        **{key: results[arm][first] for key, arm in (("pretrained", plan.full_arm), ("scratch", "scratch"))
           if arm in results},
        "arms": {arm: {"trainer": "torch-em" if arm in peers.PEERS else "emfm",
                       "init": encoder if arm.startswith("pretrained") else "scratch",
                       "semi": plan.semi if arm.endswith("+semi") else None, "lr": lrs[arm],
                       "slice_sets": results[arm]} for arm in plan.arms},
        "differences": differences(plan, results),
        "curve": [{"labeled_slices": s, "count": len(s), "picture": str(p),
                   **{arm: results[arm][tag(s)] for arm in plan.arms}} for s, p in zip(plan.labeled_sets, pictures)],
        "curve_png": str(curve_png),
        "lr_sweep": sweep,
        "config": {"recipe": plan.recipe, "raw": plan.raw, "labels": plan.labels, "unlabeled": plan.unlabeled,
                   "target": plan.target, "encoder": encoder, "pretrained_here": plan.pretrains,
                   "arms": list(plan.arms), "semi": plan.semi, "labeled_slices": plan.labeled_sets,
                   "eval_slices": plan.eval_slices, "val_slices": plan.val_slices, "seeds": plan.seeds,
                   "lrs": plan.lrs, "thresholds": list(THRESHOLDS), "seeding": SEEDING,
                   "pretrain_overrides": plan.pretrain_overrides, "finetune_overrides": plan.finetune_overrides,
                   "torch_threads": torch.get_num_threads(), "jobs": plan.jobs,
                   "finetune_threads": plan.finetune_threads,
                   "composed": {k: settings[k] for k in ("pretrain", "finetune")}, "torch_em": settings["torch_em"]},
        "seconds": seconds,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``emfm compare ARGV``: pretrain (unless given an encoder or no arm needs it), sweep, run every arm, report."""
    plan, settings = make_plan(argv)
    plan.work.mkdir(parents=True, exist_ok=True)
    started, seconds = time.perf_counter(), dict[str, Any]()
    encoder = plan.encoder
    reused = []
    if plan.pretrains:
        encoder = str(plan.work / "pretrain" / "checkpoints" / "last.ckpt")
        reused += ["pretrain"] if Path(encoder).is_file() else []
        run.pretrain(compose_config("pretrain", plan.pretrain()))
        seconds["pretrain"] = time.perf_counter() - started
    encoder = str(Path(encoder).resolve()) if encoder else None

    tuner = Finetuner(plan, encoder, settings["ignore_label"])
    sweep = sweep_lrs(plan, tuner)
    lrs = {arm: settings["torch_em"]["learning_rate"] if arm in peers.PEERS else sweep["chosen"][arm.split("+")[0]]
           for arm in plan.arms}
    results, seconds["arms"], pictures = run_arms(plan, tuner, lrs)
    seconds["lr_sweep"], seconds["total"] = sweep.pop("seconds"), time.perf_counter() - started
    seconds["reused"] = reused + tuner.reused

    curve_png = plan.out.with_name(f"{plan.out.stem}_curve.png")
    plot_curve(curve_png, [len(s) for s in plan.labeled_sets],
               {arm: [results[arm][tag(s)] for s in plan.labeled_sets] for arm in plan.arms},
               title=f"{plan.recipe} on {Path(plan.raw).name}, {len(plan.seeds)} seed(s)")
    report = build_report(plan, encoder, results, sweep, lrs, pictures, curve_png, settings, seconds)
    plan.out.write_text(json.dumps(report, indent=2) + "\n")
    print_summary(report, [plan.out, curve_png, *pictures, plan.work])
    return report
