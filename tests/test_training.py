"""Trainer pieces shared by the training commands: metrics that survive resumes, the projected time on a CPU,
compiled training steps, channels-last convolutions."""

import copy
import csv
import logging
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch._dynamo.utils import counters

from emfm import run
from emfm.checkpoints import load_segmenter
from emfm.data.volume import Volume
from emfm.errors import EmfmError
from emfm.pretrain.base import PretrainModule
from emfm.training import CONVOLUTIONS, AppendingCSVLogger, StopOnNonFinite, duration, to_channels_last
from tests.conftest import TINY_PRETRAIN, compose_run, finetuned, pretrained, tiny


def test_metrics_are_appended_across_runs_and_a_new_key_widens_the_header(tmp_path: Path) -> None:
    path = tmp_path / "csv" / "metrics.csv"
    first = AppendingCSVLogger(tmp_path, name="csv", version="")
    first.log_metrics({"train/loss": 1.0}, step=0)
    first.save()
    with path.open("a") as f:
        f.write("0.9")                 # a row cut short by a kill -9 (no newline): dropped, never glued to the next
    second = AppendingCSVLogger(tmp_path, name="csv", version="")    # the resumed run
    second.log_metrics({"train/loss": 0.5}, step=1)
    second.log_metrics({"val/loss": 0.7}, step=1)
    second.save()
    second.log_metrics({"train/loss": 0.25}, step=2)
    second.finalize("success")
    with path.open(newline="") as f:
        assert list(csv.reader(f)) == [["step", "train/loss", "val/loss"], ["0", "1.0", ""], ["1", "0.5", ""],
                                       ["1", "", "0.7"], ["2", "0.25", ""]]
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.csv"]     # no temporary file left


@pytest.mark.parametrize("hint_over_hours, hinted", [(0.0, True), (100.0, False)])
def test_a_cpu_run_says_its_seconds_per_step_and_projected_time(synth_zarr: Path, tmp_path: Path, caplog,
                                                                 hint_over_hours: float, hinted: bool) -> None:
    with caplog.at_level(logging.INFO):
        pretrained(tmp_path, synth_zarr, 6, [*tiny(), "callbacks.projected_time.after_steps=3",
                                             f"callbacks.projected_time.hint_over_hours={hint_over_hours}"])
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("on a CPU:")]
    assert len(said) == 1, said     # once, after steps 2-4 (the first step is not timed)
    match = re.fullmatch(r"on a CPU: ([\d.]+) s/step \(steps 2-4\); the 2 steps left of trainer.max_steps=6 take "
                         r"about (\d+) s(; for a CPU-sized run: data.patch_shape=\[128,128\] data.batch_size=8 "
                         r"\(or fewer trainer.max_steps\))?", said[0])
    assert match and float(match[1]) > 0 and abs(int(match[2]) - 2 * float(match[1])) <= 1
    assert bool(match[3]) == hinted


def test_durations_read_as_precisely_as_a_projection_deserves() -> None:
    assert [duration(s) for s in (42, 119, 1020, 12600, 181440)] == ["42 s", "119 s", "17 min", "3.5 h", "2.1 days"]


SMALLEST = ["+model.depth=2"]     # of model=tiny/vit2d's 6 blocks


@pytest.fixture(scope="module")
def compiled_pretraining(synth_zarr: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int]]:
    """One tiny MAE pretraining (validation in between), eager and with trainer.compile=true: each arm's last
    checkpoint and the graphs torch.compile built during it. Two blocks: compiling is most of the test's time."""
    args, arms = [*TINY_PRETRAIN, *SMALLEST, "trainer.val_check_interval=3"], {}
    for arm, extra in (("eager", []), ("compiled", ["trainer.compile=true"])):
        graphs = counters["stats"]["unique_graphs"]
        checkpoint = pretrained(tmp_path_factory.mktemp(arm), synth_zarr, 6, [*args, *extra])
        arms[arm] = checkpoint, counters["stats"]["unique_graphs"] - graphs
    return arms


def test_a_compiled_pretraining_trains_as_the_eager_one_and_saves_uncompiled_weights(
        compiled_pretraining: dict[str, tuple[Path, int]]) -> None:
    (eager_path, eager_graphs), (compiled_path, compiled_graphs) = compiled_pretraining.values()
    assert eager_graphs == 0 and compiled_graphs > 0
    eager, compiled = (torch.load(path, weights_only=True) for path in (eager_path, compiled_path))
    assert list(compiled["state_dict"]) == list(eager["state_dict"])      # no "_orig_mod." in a name
    # The same masks and noise (random numbers drawn as eager), six AdamW steps: the same weights up to rounding.
    for key, value in eager["state_dict"].items():
        torch.testing.assert_close(compiled["state_dict"][key], value, rtol=1e-3, atol=1e-5, msg=key)
    module = PretrainModule.load_from_checkpoint(compiled_path, weights_only=True)
    assert module.compiled_loss is None                                    # loads into an uncompiled module


def test_fine_tuning_compiled_from_a_compiled_pretraining_gives_a_segmenter(
        compiled_pretraining: dict[str, tuple[Path, int]], synth_zarr: Path, tmp_path: Path) -> None:
    graphs = counters["stats"]["unique_graphs"]
    checkpoint = finetuned(tmp_path, synth_zarr, "vit2d", 4, f"init={compiled_pretraining['compiled'][0]}",
                           *SMALLEST, "head=linear", "trainer.compile=true")
    assert counters["stats"]["unique_graphs"] > graphs
    state = torch.load(checkpoint, weights_only=True)
    assert torch.isfinite(torch.stack([v.float().sum() for v in state["state_dict"].values()])).all()
    segmenter = load_segmenter(checkpoint)
    assert segmenter.predict_region(torch.rand(1, 32, 32)).shape[1:] == (32, 32)


def test_without_a_cpp_compiler_training_stays_eager_and_says_so(compose_config, monkeypatch, caplog) -> None:
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, "no-such-compiler++"))
    module = run.build(compose_config("pretrain", [*tiny(), "data.volumes=[v.zarr]"]).objective, isotropic=False)
    with caplog.at_level(logging.WARNING):
        run.compile_training(module, "cpu")
    assert module.compiled_loss is None
    assert "trainer.compile=true: torch.compile builds C++ kernels on a CPU and found no C++ compiler" in caplog.text


def test_every_logger_gets_the_whole_config_so_runs_compare_by_any_setting(synth_zarr: Path, tmp_path: Path) -> None:
    compose_run("pretrain", [*tiny(), f"data.volumes=[{synth_zarr}]", f"paths.output_dir={tmp_path}",
                             "trainer.max_steps=2", "data.batch_size=3"])
    logged = yaml.safe_load((tmp_path / "csv" / "hparams.yaml").read_text())
    assert logged["data"]["batch_size"] == 3 and logged["data"]["patch_shape"] == [32, 32]
    assert "mae" in logged["objective"]["methods"] and logged["trainer"]["max_steps"] == 2
    assert logged["model"]["family"] == "vit2d"
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and b"data/batch_size" in b"".join(e.read_bytes() for e in events)


def conv_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The convolution weights among named tensors: those of rank 4 (2-D) and 5 (3-D)."""
    return {name: value for name, value in tensors.items() if value.ndim in (4, 5)}


def channels_last(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous(memory_format=torch.channels_last if tensor.ndim == 4 else torch.channels_last_3d)


@pytest.mark.parametrize("model, objective, cnn", [("cnn2d", "mim", True), ("cnn3d", "mim", True),
                                                   ("unet2d", "restore", True), ("vit2d", "mae", False)])
def test_auto_puts_cnns_on_cuda_in_channels_last_with_the_same_loss_and_gradients(
        compose_config, monkeypatch: pytest.MonkeyPatch, model: str, objective: str, cnn: bool) -> None:
    """auto: channels-last for CNNs on a CUDA device only (slower on this CPU, docs/benchmarks.md), never for ViTs;
    converted, a CNN computes the same loss and gradients."""
    torch.manual_seed(0)
    module = run.build(compose_config("pretrain", [*tiny(model, objective), "data.volumes=[v.zarr]"]).objective,
                       isotropic=False)
    assert run.choose_channels_last("auto", module, "cpu") is False
    assert run.choose_channels_last(False, module, "cpu") is False
    assert run.choose_channels_last(True, module, "cpu") is True
    with monkeypatch.context() as cuda:                      # as on a machine with a CUDA device
        cuda.setattr(torch.cuda, "is_available", lambda: True)
        assert run.choose_channels_last("auto", module, "gpu") is cnn
        assert run.choose_channels_last("auto", module, "cpu") is False
    if not cnn:
        return
    converted = copy.deepcopy(module)
    to_channels_last(converted)
    weights = conv_weights(dict(converted.named_parameters())).values()
    assert all(channels_last(w) for w in weights) and not all(w.is_contiguous() for w in weights)
    images = torch.rand(2, 1, *module.encoder.input_shape, generator=torch.Generator().manual_seed(0))
    losses, grads = [], []
    for net in (module, converted):
        loss = net.compute_loss(images, torch.Generator().manual_seed(0))["loss"]
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    # Sums in another order: 0.3-4e-5 of the gradient here. Not per weight: where rounding moves a pre-activation
    # across 0 (a LeakyReLU's kink), the weights before it get another, equally valid gradient (up to 6 % over 60
    # seeds, none at this one).
    assert (grads[1] - grads[0]).norm() < 1e-3 * grads[0].norm()


def test_a_channels_last_setting_other_than_auto_true_or_false_is_refused(compose_config) -> None:
    module = run.build(compose_config("pretrain", [*tiny("cnn2d", "mim"), "data.volumes=[v.zarr]"]).objective,
                       isotropic=False)
    with pytest.raises(EmfmError, match=r"^trainer.channels_last='yes': expected auto, true or false$"):
        run.choose_channels_last("yes", module, "cpu")


@pytest.fixture(scope="module")
def channels_last_runs(synth_zarr: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[bool, dict[str, Any]]:
    """A tiny whole 2-D U-Net (test_resnet and a U-Net decoder) pretrained two steps by restoration with
    trainer.channels_last=false and true: each arm's checkpoint and last loss; the second also fine-tuned two
    steps from its checkpoint, channels-last."""
    runs: dict[bool, dict[str, Any]] = {}
    for on in (False, True):
        root, setting = tmp_path_factory.mktemp(f"channels_last_{on}"), f"trainer.channels_last={str(on).lower()}"
        metrics = compose_run("pretrain", [*tiny("cnn2d", "restore"), "head=unet", setting, "logger=none",
                                           f"data.volumes=[{synth_zarr}]", f"paths.output_dir={root / 'pt'}",
                                           "trainer.max_steps=2"])
        runs[on] = {"loss": metrics["train/loss"], "pretraining": root / "pt" / "checkpoints" / "last.ckpt"}
    runs[True]["finetuning"] = finetuned(root / "ft", synth_zarr, "cnn2d", 2, f"init={runs[True]['pretraining']}",
                                         "head=unet", "head.channels=8", "trainer.channels_last=true")
    return runs


def test_channels_last_pretrains_a_cnn_as_the_default_layout_and_saves_channels_last_weights(
        channels_last_runs: dict[bool, dict[str, Any]]) -> None:
    off, on = (torch.load(channels_last_runs[arm]["pretraining"], weights_only=True)["state_dict"]
               for arm in (False, True))
    assert conv_weights(on) and all(channels_last(w) for w in conv_weights(on).values())
    assert not all(w.is_contiguous() for w in conv_weights(on).values())
    assert all(w.is_contiguous() for w in conv_weights(off).values()) and list(on) == list(off)
    # The same batches and masks: the second step's loss, after the first step's update, the same up to rounding
    # (not each weight: AdamW steps a weight by about the learning rate whatever the sign of a ~0 gradient).
    assert channels_last_runs[True]["loss"] == pytest.approx(channels_last_runs[False]["loss"], rel=1e-5)


def test_a_channels_last_checkpoint_fine_tunes_and_predicts_as_a_default_one(
        channels_last_runs: dict[bool, dict[str, Any]], synth_zarr: Path) -> None:
    """``init=`` a channels-last pretraining, fine-tuned channels-last: its checkpoint holds channels-last weights,
    and its segmenter loads in the default layout (as ``emfm predict`` loads it) and predicts what it predicts in
    the layout it was trained in."""
    checkpoint = channels_last_runs[True]["finetuning"]
    saved = conv_weights(torch.load(checkpoint, weights_only=True)["state_dict"]).values()
    assert all(channels_last(w) for w in saved) and not all(w.is_contiguous() for w in saved)
    segmenter = load_segmenter(checkpoint)
    assert all(layer.weight.is_contiguous() for layer in segmenter.modules() if isinstance(layer, CONVOLUTIONS))
    image = torch.from_numpy(Volume(synth_zarr).read()[:1].astype("float32") / 255)      # (1, Y, X)
    default = segmenter.predict_region(image)
    to_channels_last(segmenter)
    torch.testing.assert_close(segmenter.predict_region(image), default, rtol=1e-4, atol=1e-5)
    assert default.std() > 0.01        # a prediction, not a constant map


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype, large", [(torch.float16, 6e4), (torch.float32, 3e38)])
def test_a_gradient_that_is_not_finite_stops_the_run_and_a_large_finite_one_does_not(
        bad: float, dtype: torch.dtype, large: float) -> None:
    """The check sums each gradient (NaN and Inf carry through a sum) and looks closer where a sum is not finite:
    gradients whose sum overflows their type (or float32) are finite, and pass."""
    layer = torch.nn.Linear(3, 2).to(dtype)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    stop, trainer = StopOnNonFinite(), pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    for p in layer.parameters():
        p.grad = torch.full_like(p, large)                    # near the type's largest: their sum overflows it
    stop.on_before_optimizer_step(trainer, layer, optimizer)
    layer.weight.grad[1, 2] = bad
    with pytest.raises(EmfmError, match=r"^a gradient is not finite at step 0 "):
        stop.on_before_optimizer_step(trainer, layer, optimizer)
