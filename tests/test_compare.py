"""`emfm compare` end to end: the restore_unet recipe shrunk to seconds, every arm, the lr sweep, the
report's statistics checked against its own per-seed rows, and the one-line refusals."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from emfm import cli, threads
from emfm.checkpoints import read_checkpoint
from emfm.data.labeled import LabeledVolume
from emfm.evaluation.arms import Finetuner
from emfm.evaluation.compare import make_plan
from emfm.pictures import LINE
from tests.conftest import CommandLine, refusal

SHRINK = ["model.name=test_resnet", "data.patch_shape=[64,64]", "head.channels=8", "data.batch_size=2",
          "data.num_workers=0", "trainer.max_steps=2", "trainer.accelerator=cpu"]
PRETRAIN = [*SHRINK, "data.val_patches=2", "objective.warmup_steps=1", "callbacks.reconstructions=null"]
FINETUNE = [*SHRINK, "module.warmup_steps=1"]
ARMS = ["scratch", "pretrained", "scratch+semi", "pretrained+semi"]


def compare_args(volume: Path, out: Path, *extra: str) -> list[str]:
    overrides = [a for o in PRETRAIN for a in ("--pretrain-override", o)]
    overrides += [a for o in FINETUNE for a in ("--finetune-override", o)]
    return ["compare", "--raw", str(volume), "--labels", str(volume / "labels" / "membranes"), "--out", str(out),
            *overrides, *extra]


def compare(run_cli: CommandLine, volume: Path, out: Path, *extra: str) -> tuple[dict, subprocess.CompletedProcess]:
    """``emfm compare`` on the command line: its REPORT.json and its output."""
    done, = run_cli([(compare_args(volume, out, *extra), None)])
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done


def test_every_arm_with_its_own_lr_and_paired_differences(synth_zarr: Path, tmp_path: Path,
                                                          run_cli: CommandLine) -> None:
    out = tmp_path / "le" / "report.json"
    report, done = compare(
        run_cli, synth_zarr, out, "--unlabeled", str(synth_zarr), "--labeled-slices", "0", "--labeled-slices", "0,1",
        "--val-slices", "10", "--eval-slices", "13", "--seeds", "0,1", "--lrs", "1e-3,3e-3",
        "--semi", "restore")   # the recipe has no semi: this adds the +semi arms
    sets = ["0", "0,1"]

    assert list(report["arms"]) == ARMS and report["recipe_arm"] == "pretrained+semi"
    for arm, info in report["arms"].items():
        assert list(info["slice_sets"]) == sets and info["semi"] == ("restore" if "semi" in arm else None)
        for summary in info["slice_sets"].values():
            rows = summary["seeds"]
            assert [r["seed"] for r in rows] == [0, 1] and all(0 <= r[k] <= 1 for r in rows for k in ("iou", "vrand"))
            assert all(Path(r["checkpoint"]).is_file() and arm.replace("+", "_") in r["checkpoint"] for r in rows)
            assert summary["iou"] == pytest.approx(np.mean([r["iou"] for r in rows]))
            assert summary["std"]["vrand"] == pytest.approx(np.std([r["vrand"] for r in rows], ddof=1))
    assert report["pretrained"] == report["arms"]["pretrained+semi"]["slice_sets"]["0"]
    assert report["scratch"] == report["arms"]["scratch"]["slice_sets"]["0"]

    for s in sets:   # every paired difference is the difference of the two arms' rows of the same seed
        pairs = report["differences"][s]
        assert list(pairs) == ["pretrained+semi - scratch", "pretrained - scratch", "pretrained+semi - scratch+semi",
                               "scratch+semi - scratch"]
        for name, metrics in pairs.items():
            a, b = (report["arms"][arm]["slice_sets"][s]["seeds"] for arm in name.split(" - "))
            for metric in ("iou", "dice", "vrand", "vinfo", "vi"):
                values = [x[metric] - y[metric] for x, y in zip(a, b)]
                assert metrics[metric]["values"] == pytest.approx(values)
                assert metrics[metric]["mean"] == pytest.approx(np.mean(values))
                assert metrics[metric]["all_positive"] == all(v > 0 for v in values)

    sweep = report["lr_sweep"]   # both base arms swept alike; +semi arms inherit their base arm's choice
    assert [(r["arm"], r["lr"]) for r in sweep["runs"]] == [(a, lr) for a in ARMS[:2] for lr in (1e-3, 3e-3)]
    for base in ARMS[:2]:
        rows = [r for r in sweep["runs"] if r["arm"] == base]
        assert sweep["chosen"][base] == max(rows, key=lambda r: (round(r["iou"], 3), r["vrand"]))["lr"]
        assert report["arms"][base]["lr"] == report["arms"][f"{base}+semi"]["lr"] == sweep["chosen"][base]
    # 4 sweep runs + 16 arm runs, the two sweep runs at the chosen rates reused
    assert len(list(out.with_suffix("").glob("slices*/checkpoints/last.ckpt"))) == 18

    assert [p["labeled_slices"] for p in report["curve"]] == [[0], [0, 1]]
    with Image.open(report["curve_png"]) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1]
    for point in report["curve"]:
        with Image.open(point["picture"]) as image:       # raw | truth | four arms
            assert image.size == (6 * 96, 96 + 2 * LINE)     # under a heading and the panels' names
    config = report["config"]
    assert config["seeds"] == [0, 1] and config["semi"] == "restore" and config["eval_slices"] == [13]
    assert [config["composed"][phase]["trainer.max_steps"] for phase in ("pretrain", "finetune")] == [2, 2]
    scored = [row for arm in report["arms"].values() for runs in arm["slice_sets"].values() for row in runs["seeds"]]
    assert config["seeding"] == "components" and len(scored) == 16
    for row in scored:      # instances at the threshold chosen on the val slice, not on the eval slice
        assert row["threshold_chosen_on"] == "tune_slices [10]"
        assert list(row["per_threshold"]) == [str(row["threshold"])]
    seconds = report["seconds"]
    assert seconds["pretrain"] > 0 and seconds["lr_sweep"]["train"] > 0
    assert all(t["train"] > 0 and t["evaluate"] > 0 for arms in seconds["arms"].values() for t in arms.values())
    assert "pretrained+semi - scratch" in done.stdout and str(report["curve_png"]) in done.stdout


def test_one_arm_one_lr_needs_no_pretraining_and_no_sweep_and_reruns_reuse_it(synth_zarr: Path, tmp_path: Path,
                                                                              run_cli: CommandLine) -> None:
    args = [tmp_path / "r.json", "--labeled-slices", "0", "--eval-slices", "13", "--arms", "scratch", "--lrs", "2e-3"]
    report, _ = compare(run_cli, synth_zarr, *args)
    assert list(report["arms"]) == ["scratch"] and "pretrained" not in report and "pretrain" not in report["seconds"]
    assert report["lr_sweep"]["runs"] == [] and report["arms"]["scratch"]["lr"] == 2e-3
    assert report["differences"] == {"0": {}} and not (tmp_path / "r" / "pretrain").exists()
    assert report["seconds"]["reused"] == []
    assert report["scratch"]["seeds"][0]["threshold_chosen_on"] == "the scored slices (optimistic)"  # no val slices

    checkpoint = Path(report["scratch"]["seeds"][0]["checkpoint"])
    weights = {k: w.clone() for k, w in read_checkpoint(checkpoint)["state_dict"].items()}
    again, _ = compare(run_cli, synth_zarr, *args)    # the finished run is reused as it is, not trained further
    assert again["seconds"]["reused"] == [checkpoint.parents[1].name]
    assert read_checkpoint(checkpoint)["global_step"] == 2
    assert all(torch.equal(w, read_checkpoint(checkpoint)["state_dict"][k]) for k, w in weights.items())
    assert again["scratch"] == report["scratch"]


def test_runs_side_by_side_train_what_one_at_a_time_trains(synth_zarr: Path, tmp_path: Path, capsys) -> None:
    saved = torch.get_num_threads()

    def report(name: str, *extra: str) -> dict:      # in this process, whose torch threads the test sets
        cli.main(compare_args(synth_zarr, tmp_path / name, "--labeled-slices", "0", "--eval-slices", "13",
                              "--arms", "scratch", "--lrs", "2e-3", "--seeds", "0,1", *extra))
        return json.loads((tmp_path / name).read_text())
    try:
        torch.set_num_threads(2)
        side = report("side.json", "--jobs", "2")      # two spawned processes, one torch thread each
        printed = capsys.readouterr().out
        torch.set_num_threads(1)
        alone = report("alone.json")                   # one run after the other in this process, one thread
    finally:
        torch.set_num_threads(saved)

    assert (side["config"]["jobs"], side["config"]["finetune_threads"]) == (2, 1)
    assert side["seconds"]["arms"]["0"]["scratch"]["train"] > 0
    assert all(f"trained slices0_seed{seed}_scratch_lr0.002 in " in printed for seed in (0, 1))
    for a, b in zip(side["scratch"]["seeds"], alone["scratch"]["seeds"], strict=True):
        weights = read_checkpoint(Path(a["checkpoint"]))["state_dict"]
        assert "side" in a["checkpoint"] and a["seed"] == b["seed"] and a["iou"] == b["iou"]
        assert all(torch.equal(w, read_checkpoint(Path(b["checkpoint"]))["state_dict"][k]) for k, w in weights.items())


def test_runs_side_by_side_take_loader_workers_only_from_spare_cores(synth_zarr: Path, tmp_path: Path,
                                                                     monkeypatch) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)          # --jobs 2 shares two threads
    args = ["--raw", str(synth_zarr), "--labels", str(synth_zarr / "labels" / "membranes"), "--out",
            str(tmp_path / "r.json"), "--labeled-slices", "0", "--eval-slices", "13", "--lrs", "1e-3", "--jobs", "2"]
    plan, _ = make_plan(args)
    tuner = Finetuner(plan, None, None)

    def workers(cores: int) -> int:
        monkeypatch.setattr(threads, "cores", lambda: cores)
        return tuner.prepare("scratch", 1e-3, [0], 0)[1].data.num_workers
    assert (workers(2), workers(4), workers(16)) == (0, 1, 1)       # the recipe's 1 at most
    plan.finetune_overrides.append("data.num_workers=3")             # the user's choice stands
    assert workers(2) == 3


def test_torch_em_arm_trains_the_scratch_arm_s_slices_with_its_own_trainer_and_is_scored_alike(
        synth_zarr: Path, tmp_path: Path, run_cli: CommandLine) -> None:
    report, done = compare(run_cli, synth_zarr, tmp_path / "peer.json", "--labeled-slices", "0,1", "--val-slices",
                           "10", "--eval-slices", "13", "--seeds", "0,1", "--lrs", "2e-3", "--arms", "scratch,torch-em")
    peer, config = report["arms"]["torch-em"], report["config"]
    assert list(report["arms"]) == ["scratch", "torch-em"] and report["arms"]["scratch"]["trainer"] == "emfm"
    assert (peer["trainer"], peer["init"], peer["semi"], peer["lr"]) == ("torch-em", "scratch", None, 1e-3)
    settings, composed = config["torch_em"], config["composed"]["finetune"]     # torch-em's defaults, emfm's budget
    assert settings["model"] | {"class": None} == {"class": None, "in_channels": 1, "out_channels": 1,
                                                   "final_activation": "Sigmoid", "initial_features": 32, "depth": 4,
                                                   "gain": 2}
    assert settings["learning_rate"] == 1e-3 and settings["compile_model"] is False     # as the emfm arms (eager)
    assert (settings["iterations"], settings["batch_size"], settings["patch_shape"]) == (
        composed["trainer.max_steps"], composed["data.batch_size"], composed["data.patch_shape"]) == (2, 2, [64, 64])

    scratch, torch_em = (report["arms"][arm]["slice_sets"]["0,1"]["seeds"] for arm in ("scratch", "torch-em"))
    assert [r["seed"] for r in torch_em] == [r["seed"] for r in scratch] == [0, 1]
    volume = LabeledVolume(synth_zarr, synth_zarr / "labels" / "membranes")
    slices = [volume.read(slice(z, z + 1), [slice(0, 96)] * 2, [z])[0][0] for z in (0, 1)]
    weights = []
    for row in torch_em:    # scored by emfm's code: pixels and cells, the threshold chosen on the val slice
        assert all(0 <= row[m] <= 1 for m in ("iou", "vrand")) and row["vi"] >= 0
        assert row["threshold_chosen_on"] == "tune_slices [10]" and row["seeding"] == "components"
        saved = torch.load(row["checkpoint"], weights_only=False)    # torch-em's own record of what it trained
        assert saved["iteration"] == 2 and saved["init"]["train_loader_kwargs"]["batch_size"] == 2
        trained = saved["init"]["train_dataset"].raw_images        # the labelled slices, whole
        assert len(trained) == 2 and all(np.array_equal(a, b) for a, b in zip(trained, slices))
        weights.append(saved["model_state"])
    assert any(not torch.equal(w, weights[1][k]) for k, w in weights[0].items())    # the seed reached it

    pair = report["differences"]["0,1"]["scratch - torch-em"]
    for metric in ("iou", "vrand", "vi"):
        assert pair[metric]["values"] == pytest.approx([a[metric] - b[metric] for a, b in zip(scratch, torch_em)])
    with Image.open(report["curve"][0]["picture"]) as image:      # raw | truth | scratch | torch-em
        assert image.size == (4 * 96, 96 + 2 * LINE)
    assert "scratch - torch-em" in done.stdout


@pytest.mark.parametrize("extra, message", [
    (["--labeled-slices", "0", "--labeled-slices", "3-5", "--eval-slices", "5-7"],
     "--labeled-slices [3, 4, 5] overlap --eval-slices at [5]"),
    (["--labeled-slices", "0,1", "--val-slices", "1", "--eval-slices", "5"], "overlap --val-slices at [1]"),
    (["--labeled-slices", "0", "--val-slices", "4-5", "--eval-slices", "5"],
     "--val-slices overlap --eval-slices at [5]"),
    (["--labeled-slices", "0", "--eval-slices", "5"], "a learning-rate sweep needs --val-slices"),
    (["--labeled-slices", "0", "--eval-slices", "5", "--recipe", "nope"], "recipes: restore_unet"),
    (["--labeled-slices", "0", "--eval-slices", "5", "--lrs", "1e-3", "--arms", "scratch,teacher"],
     "--arms: teacher not among scratch, pretrained, torch-em (recipe restore_unet has no semi; see --semi)"),
    (["--labeled-slices", "0", "--eval-slices", "5", "--lrs", "1e-3", "--arms", "torch-em", "--target", "semantic"],
     "--arms torch-em trains one sigmoid channel: target semantic has 3 (softmax); use --target membrane or"),
    (["--labeled-slices", "0", "--eval-slices", "5", "--lrs", "1e-3", "--arms", "torch-em", "--finetune-override",
      "data.ignore_label=1"], "slice 0 has unlabelled pixels (data.ignore_label=1); torch-em's Dice loss has no mask"),
    (["--labeled-slices", "0", "--eval-slices", "5", "--finetune-override", "module.lr=1"],
     "the harness sets module.lr itself"),
    (["--labeled-slices", "0", "--eval-slices", "5", "--jobs", "0"], "--jobs 0: expected 1 to"),
    (["--labeled-slices", "0", "--eval-slices", "5", "--lrs", "1e-3", "--finetune-override", "model.nme=x"],
     "composing recipe restore_unet: Could not override 'model.nme'"),
])
def test_bad_requests_are_one_line_errors_before_any_work(synth_zarr: Path, tmp_path: Path, run_cli: CommandLine,
                                                          extra: list[str], message: str) -> None:
    done, = run_cli([(compare_args(synth_zarr, tmp_path / "r.json", *extra), None)])
    assert message in refusal(done)
    assert not (tmp_path / "r").exists()


def test_help_lists_the_command_and_shows_its_arms_flags_and_an_example(run_cli: CommandLine) -> None:
    listing, usage = run_cli([(["--help"], None), (["compare", "--help"], None)])
    assert listing.returncode == usage.returncode == 0
    assert "  compare   does pretraining pay on my data?" in listing.stdout
    assert usage.stdout.startswith("usage: emfm compare ")
    for shown in ("  scratch  ", "  pretrained+semi  ", "  torch-em  ", "--finetune-override KEY=VALUE",
                  "\n  emfm compare --raw stack1.zarr "):
        assert shown in usage.stdout
