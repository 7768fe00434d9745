"""emfm finetune / evaluate with the real configs and Trainer on a synthetic zarr volume."""

import csv
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from emfm import run
from emfm.checkpoints import load_segmenter
from emfm.data.ingest import write_ome_zarr
from emfm.data.labeled import (
    IGNORE,
    HeldOutSlices,
    LabeledDataModule,
    LabeledVolume,
    parse_slices,
)
from emfm.data.volume import Volume
from emfm.errors import EmfmError
from emfm.export import export_encoder
from emfm.finetune.callbacks import panels
from tests.conftest import TINY_FINETUNE, CommandLine, overflowing, pretrained, tiny

LABELS = {"membrane": "membranes", "boundary": "instances", "affinity": "instances", "semantic": "membranes",
          "foreground": "instances"}


def finetune_args(volume: Path, model: str = "vit2d", target: str = "membrane", steps: int = 3) -> list[str]:
    extra = ["target.offsets=[[-1,0,0],[0,-1,0],[0,0,-1]]"] if target == "affinity" else []
    extra += ["target.classes=[1]"] if target == "semantic" else []
    return [f"model=tiny/{model}", f"target={target}", *extra, f"data.raw={volume}",
            f"data.labels={volume}/labels/{LABELS[target]}", "data.labeled_slices=[0,1]", "data.val_slices=[12]",
            f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", *TINY_FINETUNE]


def metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return [{k: v for k, v in row.items() if v} for row in csv.DictReader(f)]


@pytest.mark.parametrize("model, target", [("vit2d", "membrane"), ("cnn2d", "semantic"), ("vit3d", "boundary"),
                                           ("cnn3d", "affinity"), ("vit2d_p4", "membrane")])
def test_every_family_fine_tunes_and_validates_on_held_out_slices(
        compose_config, synth_zarr: Path, tmp_path: Path, model: str, target: str) -> None:
    out = run.finetune(compose_config("finetune", finetune_args(synth_zarr, model, target)))
    assert out["train/loss"] > 0 and 0 < out["val/iou"] <= out["val/dice"]     # validated, and it finds structure
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    shown = {"membrane": 1, "semantic": 1, "boundary": 2, "affinity": 3}[target]
    with Image.open(tmp_path / "predictions" / f"step_{3:07d}.png") as picture:   # raw | truth | probs
        width = picture.size[0]
    slice_width = Volume(synth_zarr).shape[-1]
    assert width == (1 + 2 * shown) * (slice_width + 4) + 4


def test_prediction_panels_show_truth_with_unknown_pixels_grey() -> None:
    image = torch.arange(4.0).view(1, 2, 2)
    truth = torch.tensor([[0, 2], [IGNORE, 1]])
    probs = torch.tensor([[[0.7, 0.1], [0.5, 0.2]], [[0.2, 0.1], [0.5, 0.3]], [[0.1, 0.8], [0.0, 0.5]]])
    sheet, titles = panels(image, truth, probs, softmax=True)
    assert sheet.shape == (5, 1, 2, 2)                       # raw, truth of classes 1 and 2, their probabilities
    assert titles == ["raw", "truth class 1", "truth class 2", "probability class 1", "probability class 2"]
    assert torch.equal(sheet[1, 0], torch.tensor([[0.0, 0.0], [0.5, 1.0]]))
    assert torch.equal(sheet[2, 0], torch.tensor([[0.0, 1.0], [0.5, 0.0]]))
    assert torch.equal(sheet[3:, 0], probs[1:])
    assert sheet[0].min() == 0 and sheet[0].max() == 1


def test_fine_tuning_learns_membranes(compose_config, synth_zarr: Path, tmp_path: Path) -> None:
    cfg = compose_config("finetune", [*finetune_args(synth_zarr, steps=80), "trainer.val_check_interval=40",
                                      "trainer.log_every_n_steps=5", "module.lr=3e-3"])
    run.finetune(cfg)
    rows = metrics(tmp_path)
    losses = [float(r["train/loss"]) for r in rows if "train/loss" in r]
    ious = [float(r["val/iou"]) for r in rows if "val/iou" in r]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
    assert ious[-1] > 0.4, ious


@pytest.fixture(scope="module")
def vit_mae(two_step_pretrained: Callable[[str], Path]) -> Path:
    """A two-step MAE pretraining checkpoint of the tiny ViT."""
    return two_step_pretrained("vit2d")


def test_init_from_a_checkpoint_or_an_export_copies_the_encoder(
        compose_config, synth_zarr: Path, tmp_path: Path, vit_mae: Path) -> None:
    from emfm.pretrain.base import PretrainModule

    source = PretrainModule.load_from_checkpoint(vit_mae, weights_only=True).encoder.state_dict()
    export = export_encoder(vit_mae, tmp_path / "export")
    for init in (vit_mae, export):
        cfg = compose_config("finetune", [*finetune_args(synth_zarr), f"init={init}"])
        module = run.build(cfg.module)
        for key, value in module.model.encoder.state_dict().items():
            assert torch.equal(value, source[key]), key
    scratch = run.build(compose_config("finetune", finetune_args(synth_zarr)).module)
    assert not torch.equal(scratch.model.encoder.state_dict()["vit.blocks.0.attn.qkv.weight"],
                           source["vit.blocks.0.attn.qkv.weight"])


def test_init_from_whole_network_pretraining_copies_encoder_and_decoder(
        compose_config, synth_zarr: Path, tmp_path: Path) -> None:
    """objective=restore pretrains the head fine-tuning uses: all of it but the output layer carries over (unless
    module.init_decoder=false: the encoder only)."""
    checkpoint = pretrained(tmp_path / "pt", synth_zarr, 2, [*tiny("cnn2d", "restore"), "head=unet"])
    weights = torch.load(checkpoint, weights_only=True)["state_dict"]
    args = [*finetune_args(synth_zarr, "cnn2d"), f"init={checkpoint}", "head=unet", "head.channels=8"]
    model = run.build(compose_config("finetune", args).module).model
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, weights[f"encoder.{key}"]), key
    decoder = model.head.state_dict()
    assert {k for k in decoder if not k.startswith("out.")} and all(
        torch.equal(v, weights[f"methods.restore.head.{k}"]) for k, v in decoder.items() if not k.startswith("out."))
    assert not torch.equal(decoder["out.weight"], weights["methods.restore.head.out.weight"])
    alone = run.build(compose_config("finetune", [*args, "module.init_decoder=false"]).module).model   # encoder only
    assert all(torch.equal(v, weights[f"encoder.{k}"]) for k, v in alone.encoder.state_dict().items())
    assert not any(torch.equal(v, weights[f"methods.restore.head.{k}"]) for k, v in alone.head.state_dict().items()
                   if v.ndim > 1 and not k.startswith("out."))     # its convolutions start fresh
    other = "its decoder is head .*'channels': 8.* but this run builds head .*'channels': 16"
    with pytest.raises(EmfmError, match=other):
        run.build(compose_config("finetune", [*args, "head.channels=16"]).module)


def test_init_from_another_architecture_or_a_missing_file_is_refused(
        compose_config, synth_zarr: Path, vit_mae: Path) -> None:
    cfg = compose_config("finetune", [*finetune_args(synth_zarr, "cnn2d"), f"init={vit_mae}"])
    with pytest.raises(EmfmError, match="encoder has family='vit2d' but this run builds model.family='cnn2d'"):
        run.build(cfg.module)
    cfg = compose_config("finetune", [*finetune_args(synth_zarr), "init=/nowhere/x.ckpt"])
    with pytest.raises(EmfmError, match="no such checkpoint or export directory"):
        run.build(cfg.module)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")    # normalising the sentinels: the point
def test_a_loss_that_stops_being_finite_stops_fine_tuning_before_anything_is_saved(
        compose_config, synth_zarr: Path, tmp_path: Path) -> None:
    extreme = overflowing(synth_zarr, tmp_path / "extreme.zarr")
    cfg = compose_config("finetune", [*finetune_args(extreme), f"data.labels={synth_zarr}/labels/membranes"])
    with pytest.raises(EmfmError, match=r"^train/loss is not finite at step 0 \(train/loss nan\); stopped"):
        run.finetune(cfg)
    assert not list(tmp_path.glob("checkpoints/*.ckpt"))


@pytest.mark.parametrize("semi", ["mean_teacher", "fixmatch", "restore"])
def test_semi_supervised_training_uses_unlabeled_patches(compose_config, synth_zarr: Path, tmp_path: Path,
                                                         semi: str) -> None:
    cfg = compose_config("finetune", [*finetune_args(synth_zarr), f"semi={semi}", "semi.rampup_steps=1",
                                      "semi.unlabeled_batch_size=2", "trainer.log_every_n_steps=1"])
    run.finetune(cfg)
    rows = [r for r in metrics(tmp_path) if "train/semi/loss" in r]
    assert len(rows) == 3 and any(float(r["train/semi/loss"]) > 0 for r in rows)   # the unlabeled term trains


def test_mean_teacher_follows_the_model_by_its_momentum(compose_config, synth_zarr: Path) -> None:
    cfg = compose_config("finetune", [*finetune_args(synth_zarr), "semi=mean_teacher", "semi.momentum=0.9"])
    module = run.build(cfg.module)
    student = next(module.model.parameters())
    teacher = next(module.semi.teacher.parameters())
    with torch.no_grad():
        student.add_(1.0)
    before = teacher.clone()
    module.semi.before_step(module.model)
    assert torch.allclose(teacher, before + 0.1, atol=1e-6)
    assert not teacher.requires_grad


def test_lp_ft_recipe_is_the_restore_unet_fine_tuning_with_frozen_steps(compose_config) -> None:
    base = compose_config("finetune", ["experiment=restore_unet/finetune"])
    lp_ft = compose_config("finetune", ["experiment=restore_unet/lp_ft"])
    assert base.module.freeze_encoder_steps == base.module.freeze_decoder_steps == 0
    assert 0 < lp_ft.module.freeze_decoder_steps < lp_ft.module.freeze_encoder_steps < lp_ft.trainer.max_steps
    lp_ft.module.freeze_encoder_steps = lp_ft.module.freeze_decoder_steps = 0
    assert lp_ft == base


def test_layer_decay_and_frozen_encoder_and_decoder_in_the_learning_rates(compose_config, synth_zarr: Path) -> None:
    cfg = compose_config("finetune", [*finetune_args(synth_zarr), "module.layer_decay=0.5",
                                      "module.encoder_lr_ratio=0.1", "module.freeze_encoder_steps=5",
                                      "module.freeze_decoder_steps=3", "module.warmup_steps=1"])
    module = run.build(cfg.module)
    module.trainer = type("T", (), {"max_steps": 100})()  # configure_optimizers reads max_steps only
    setup = module.configure_optimizers()
    optimizer, scheduler = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    groups = len(module.model.encoder.layer_groups())
    output = {id(module.model.head.out.weight), id(module.model.head.out.bias)}
    decoder = next(g for g in optimizer.param_groups if id(g["params"][0]) in
                   {id(p) for n, p in module.model.head.named_parameters() if not n.startswith("out.")})
    head = optimizer.param_groups[-1]
    assert {id(p) for p in head["params"]} <= output  # the output layer in groups of its own
    patch_embedding = cfg.module.lr * 0.1 * 0.5 ** groups
    assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(patch_embedding)
    assert head["initial_lr"] == pytest.approx(cfg.module.lr)
    assert optimizer.param_groups[0]["lr"] == 0 and decoder["lr"] == 0 and head["lr"] > 0  # a linear probe first
    for step in range(5):
        optimizer.step()
        scheduler.step()
        assert (decoder["lr"] > 0) == (step >= 2) and (optimizer.param_groups[0]["lr"] > 0) == (step >= 4)


def test_evaluate_writes_json_and_csv_reports(compose_config, synth_zarr: Path, tmp_path: Path,
                                              vit_mae: Path) -> None:
    run.finetune(compose_config("finetune", finetune_args(synth_zarr, steps=2)))
    out = tmp_path / "eval"
    cfg = compose_config("evaluate", [f"checkpoint={tmp_path}/checkpoints/last.ckpt", f"raw={synth_zarr}",
                                      f"labels={synth_zarr}/labels/membranes", "slices=12-13", f"output_dir={out}",
                                      "thresholds=[0.4,0.6]"])
    report = run.evaluate(cfg)
    saved = json.loads((out / "report.json").read_text())
    assert saved["slices"] == [12, 13] and saved["threshold"] in (0.4, 0.6) and saved["instance_regions"] == "2 of 2"
    assert set(saved["per_threshold"]) == {"0.4", "0.6"} and saved["iou"] == report["iou"]
    best = saved["per_threshold"][str(saved["threshold"])]           # the threshold of the best mean V_rand
    assert saved["vrand"] == best["vrand"] == max(m["vrand"] for m in saved["per_threshold"].values())
    assert saved["vi"] == pytest.approx(saved["vi_split"] + saved["vi_merge"]) and saved["dice"] >= saved["iou"] > 0
    with (out / "report.csv").open() as f:
        rows = dict(csv.reader(f))
    assert float(rows["vrand"]) == pytest.approx(saved["vrand"])
    assert saved["seeding"] == "components" and saved["threshold_chosen_on"] == "the scored slices (optimistic)"
    assert saved["isbi2012"]["slices"] == 2 and 0 < saved["isbi2012"]["vrand"] <= 1      # the published protocol
    assert saved["isbi2012"]["threshold"] in [round(0.1 * i, 1) for i in range(11)]
    for metric in ("iou", "vrand", "vi"):                                  # resampled over the 2 eval slices
        low, high = saved["interval95"][metric]
        assert low <= saved[metric] + 1e-9 and saved[metric] - 1e-9 <= high
    with pytest.raises(EmfmError, match="no segmentation head"):
        load_segmenter(vit_mae)


def test_evaluate_chooses_the_threshold_on_tuning_slices(compose_config, synth_zarr: Path, tmp_path: Path,
                                                          model_2d: Path) -> None:
    args = [f"checkpoint={model_2d}", f"raw={synth_zarr}", f"labels={synth_zarr}/labels/membranes",
            "thresholds=[0.2,0.5,0.8]", "seeding=watershed"]
    tuned = run.evaluate(compose_config("evaluate", [*args, "slices=10-11", f"output_dir={tmp_path}/tune"]))
    scored = run.evaluate(compose_config("evaluate", [*args, "slices=12-13", "tune_slices=10-11",
                                                      f"output_dir={tmp_path}/eval"]))
    assert scored["threshold"] == tuned["threshold"] and list(scored["per_threshold"]) == [str(tuned["threshold"])]
    assert scored["threshold_chosen_on"] == "tune_slices [10, 11]" and scored["seeding"] == "watershed"
    every = run.evaluate(compose_config("evaluate", [*args, "tune_slices=10-11", f"output_dir={tmp_path}/all"]))
    assert every["slices"] == [z for z in range(16) if z not in (10, 11)]
    with pytest.raises(EmfmError, match=r"tune_slices \[11\] are also scored"):
        run.evaluate(compose_config("evaluate", [*args, "slices=11-13", "tune_slices=10-11"]))
    with pytest.raises(EmfmError, match="seeding='h-maxima': expected one of watershed, components"):
        run.evaluate(compose_config("evaluate", [*args, "slices=12", "seeding=h-maxima"]))


def test_labeled_patches_keep_labels_only_on_their_slices(synth_zarr: Path) -> None:
    data = LabeledDataModule(str(synth_zarr), f"{synth_zarr}/labels/membranes", [8, 32, 32], labeled_slices="3",
                             val_slices=[12, 13], batch_size=6, num_workers=0)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (6, 1, 8, 32, 32) and batch["labels"].dtype == torch.int64
    labeled_planes = (batch["labels"] != IGNORE).flatten(2).any(2)  # (N, Z): which z-planes carry labels
    assert (labeled_planes.sum(1) == 1).all()  # exactly slice 3 in each block
    region = next(iter(data.val_dataloader()))
    assert region["image"].shape == (1, 8, 96, 96)  # one slab over the held-out slices: z 8..15
    kept = (region["labels"][0] != IGNORE).flatten(1).any(1)
    assert kept.nonzero().flatten().tolist() == [4, 5]  # slices 12 and 13


def test_slice_specs_and_bad_labeled_data_are_named(synth_zarr: Path, tmp_path: Path) -> None:
    assert parse_slices("0-2,7", 10, "k") == [0, 1, 2, 7] and parse_slices([3, 1], 10, "k") == [1, 3]
    with pytest.raises(EmfmError, match=r"data.labeled_slices=\[0, 40\]: slice indices must lie in \[0, 15\]"):
        LabeledDataModule(str(synth_zarr), f"{synth_zarr}/labels/membranes", [32, 32], labeled_slices=[0, 40]).setup()
    with pytest.raises(EmfmError, match=r"slices \[2\] are both in data.labeled_slices and data.val_slices"):
        LabeledDataModule(str(synth_zarr), f"{synth_zarr}/labels/membranes", [32, 32], labeled_slices=[1, 2],
                          val_slices=[2]).setup()
    other = write_ome_zarr(np.zeros((16, 96, 90), np.uint8), tmp_path / "other.zarr", is_label=True)
    with pytest.raises(EmfmError, match=r"other.zarr has shape \[16, 96, 90\], but the raw volume"):
        LabeledVolume(synth_zarr, other)
    floats = write_ome_zarr(np.zeros((16, 96, 96), np.float32), tmp_path / "float.zarr")
    with pytest.raises(EmfmError, match="labels must be integers, got float32"):
        LabeledVolume(synth_zarr, floats)
    with pytest.raises(EmfmError, match="larger than"):
        LabeledDataModule(str(synth_zarr), f"{synth_zarr}/labels/membranes", [128, 128], labeled_slices=[0]).setup()


def test_background_only_labeled_slices_are_warned_about(synth_zarr: Path, tmp_path: Path, caplog) -> None:
    labels = Volume(synth_zarr / "labels" / "membranes").read()
    labels[1] = 0                                         # e.g. a slice nobody annotated
    path = write_ome_zarr(labels, tmp_path / "sparse.zarr", is_label=True)
    data = LabeledDataModule(str(synth_zarr), str(path), [32, 32], labeled_slices=[0, 1, 2], num_workers=0)
    assert data.label_values() == [0, 1]
    assert "labeled slices [1] hold only background" in caplog.text


def test_held_out_2d_slices_are_whole(synth_zarr: Path) -> None:
    data = LabeledVolume(synth_zarr, synth_zarr / "labels" / "membranes")
    regions = HeldOutSlices(data, [5, 9], [32, 32])
    assert len(regions) == 2 and regions[1]["image"].shape == (1, 96, 96)
    assert (regions[1]["labels"] != IGNORE).all()


def test_label_values_the_target_cannot_represent_are_refused(compose_config, synth_zarr: Path) -> None:
    args = finetune_args(synth_zarr, "vit2d", "semantic")
    args[args.index(f"data.labels={synth_zarr}/labels/membranes")] = f"data.labels={synth_zarr}/labels/instances"
    with pytest.raises(EmfmError, match=r"labels/instances: label values \[2, 3, .* are not classes of target.classes"):
        run.finetune(compose_config("finetune", args))


@pytest.mark.parametrize("semi, option", [("mean_teacher", "semi.momentum=0.5"), ("fixmatch", "semi.threshold=0.5"),
                                          ("restore", "semi.mask_ratio=0.25")])
def test_the_unlabeled_loss_trains_the_student(compose_config, synth_zarr: Path, semi: str, option: str) -> None:
    module = run.build(compose_config("finetune", [*finetune_args(synth_zarr), f"semi={semi}", option]).module)
    with torch.no_grad():  # a teacher that differs from the student, as after some training
        module.model.head.apply(lambda m: m.weight.add_(0.1) if isinstance(m, torch.nn.Conv2d) else None)
    images = torch.rand(2, 1, 32, 32)
    loss = module.semi(module.model, images, module.loss, module.activate)["loss"]
    loss.backward()
    grads = [p.grad for p in module.model.parameters() if p.grad is not None]
    assert loss > 0 and grads and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in getattr(module.semi, "teacher", torch.nn.Identity()).parameters())


def test_joint_restoration_trains_its_own_output_layer_and_the_decoder(compose_config, synth_zarr: Path) -> None:
    module = run.build(compose_config("finetune", [*finetune_args(synth_zarr), "semi=restore"]).module)
    module.trainer = type("T", (), {"max_steps": 10})()  # configure_optimizers reads max_steps only
    optimised = {id(p) for group in module.configure_optimizers()["optimizer"].param_groups for p in group["params"]}
    assert id(module.semi.out.weight) in optimised
    loss = module.semi(module.model, torch.rand(2, 1, 32, 32), module.loss, module.activate)["loss"]
    loss.backward()
    assert module.semi.out.weight.grad.abs().sum() > 0
    assert module.model.head.out.weight.grad is None  # the segmentation output is not part of this task
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.model.head.blocks.parameters())


def resnet_weights(name: str = "test_resnet", in_chans: int = 1) -> dict[str, torch.Tensor]:
    """A ResNet's weights with a classifier ``fc``, as MoCo's query encoder and SwAV's trunk hold them."""
    torch.manual_seed(1)
    return timm.create_model(name, pretrained=False, num_classes=8, in_chans=in_chans).state_dict()


def moco_v2(weights: dict[str, torch.Tensor]) -> dict:
    """CEM500K's MoCo v2 file: query and momentum encoders under module.*, the queue, the norms."""
    return {"epoch": 200, "arch": "resnet50", "norms": [0.58, 0.15], "state_dict": {
        **{f"module.encoder_q.{k}": v for k, v in weights.items()},
        **{f"module.encoder_k.{k}": v + 1 for k, v in weights.items()},
        "module.queue": torch.randn(8, 16), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}}


def swav(weights: dict[str, torch.Tensor]) -> dict:
    """CEM1.5M's SwAV file: the ResNet under module.*, beside its projection head and prototypes."""
    trunk = {k: v for k, v in weights.items() if not k.startswith("fc.")}
    return {"epoch": 200, "norms": [0.58, 0.15], "state_dict": {
        **{f"module.{k}": v for k, v in trunk.items()}, "module.projection_head.0.weight": torch.randn(16, 96),
        "module.projection_head.0.bias": torch.randn(16), "module.prototypes.weight": torch.randn(10, 16)}}


@pytest.mark.parametrize("layout", [moco_v2, swav])
def test_init_from_a_cem_resnet_checkpoint_loads_its_encoder_and_fine_tunes(
        compose_config, synth_zarr: Path, tmp_path: Path, layout) -> None:
    source = resnet_weights()
    torch.save(layout(source), tmp_path / "cem.pth.tar")
    args = [*finetune_args(synth_zarr, "cnn2d", steps=2), f"init={tmp_path / 'cem.pth.tar'}"]
    cnn = run.build(compose_config("finetune", args).module).model.encoder.cnn
    for key, value in cnn.state_dict().items():
        assert torch.equal(value, source[key]), key
    assert run.finetune(compose_config("finetune", args))["train/loss"] > 0


def test_a_torchvision_resnet50_in_the_moco_layout_fills_model_resnet50(
        compose_config, synth_zarr: Path, tmp_path: Path) -> None:
    """The key names of CEM500K's real file (a torchvision ResNet-50); its RGB first convolution summed to grey."""
    import torchvision

    source = torchvision.models.resnet50(weights=None).state_dict()
    torch.save(moco_v2(source), tmp_path / "cem500k_mocov2_resnet50_200ep.pth.tar")
    args = [*finetune_args(synth_zarr, "cnn2d"), "model.name=resnet50",
            f"init={tmp_path / 'cem500k_mocov2_resnet50_200ep.pth.tar'}"]
    cnn = run.build(compose_config("finetune", args).module).model.encoder.cnn
    loaded = cnn.state_dict()
    assert torch.allclose(loaded["conv1.weight"], source["conv1.weight"].sum(1, keepdim=True))
    for key in loaded.keys() - {"conv1.weight"}:
        assert torch.equal(loaded[key], source[key]), key


def test_init_from_timm_safetensors_fills_the_vit_and_fine_tunes(
        compose_config, synth_zarr: Path, tmp_path: Path) -> None:
    """A timm ViT saved as safetensors, with an RGB patch embedding, its classifier and another position grid."""
    from safetensors.torch import save_file

    source = timm.create_model("test_vit", pretrained=False, num_classes=10, in_chans=3, img_size=64,
                               patch_size=8).state_dict()
    save_file(source, tmp_path / "model.safetensors")
    args = [*finetune_args(synth_zarr, steps=2), f"init={tmp_path / 'model.safetensors'}"]
    vit = run.build(compose_config("finetune", args).module).model.encoder.vit
    loaded = vit.state_dict()
    assert torch.allclose(loaded["patch_embed.proj.weight"], source["patch_embed.proj.weight"].sum(1, keepdim=True))
    assert loaded["pos_embed"].shape == (1, 1 + 4 * 4, 64) != source["pos_embed"].shape    # resampled to 32x32 input
    for key in loaded.keys() - {"patch_embed.proj.weight", "pos_embed"}:
        assert torch.equal(loaded[key], source[key]), key
    assert run.finetune(compose_config("finetune", args))["train/loss"] > 0


def sam_image_encoder(prefix: str = "") -> dict[str, torch.Tensor]:
    """The keys of SAM ViT-B (12 blocks of width 768), tiny tensors but the patch embedding."""
    weights = {f"{prefix}image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16),
               f"{prefix}image_encoder.neck.0.weight": torch.zeros(1),
               f"{prefix}prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": torch.zeros(1),
               f"{prefix}mask_decoder.iou_token.weight": torch.zeros(1)}
    for block in range(12):
        for name in ("attn.rel_pos_h", "attn.qkv.weight", "mlp.lin1.weight"):
            weights[f"{prefix}image_encoder.blocks.{block}.{name}"] = torch.zeros(1)
    return weights


@pytest.mark.parametrize("name, content, message", [
    ("sam_vit_b.pth", sam_image_encoder(), r"a SAM / micro-sam image encoder \(image_encoder\.\*, ViT-B\); SAM's ViT "
                                           r"has windowed attention .* so it is not loaded"),
    ("micro_sam.pt", {"model_state": sam_image_encoder("sam.")}, "a SAM / micro-sam image encoder"),
    ("detectron.pth", {"model": {"backbone.bottom_up.stem.conv1.weight": torch.zeros(1)}},
     r"\(timm state dict\): none of its 1 weights \(backbone.bottom_up.stem.conv1.weight\) is named as in timm's "
     r"test_vit: a layout emfm does not know"),
    ("moco.pth.tar", moco_v2(resnet_weights()), r"a MoCo v2 layout \(.*\); it loads into model=cnn2d .* but this "
                                                r"run builds model.family='vit2d'"),
    ("optimizer.pt", {"lr": 0.1, "step": 3}, r"no weights \(a mapping of names to tensors\) in it.*keys: lr, step"),
])
def test_init_from_a_file_of_another_layout_is_refused_naming_it(
        compose_config, synth_zarr: Path, tmp_path: Path, name: str, content: dict, message: str) -> None:
    torch.save(content, tmp_path / name)
    cfg = compose_config("finetune", [*finetune_args(synth_zarr), f"init={tmp_path / name}"])
    with pytest.raises(EmfmError, match=message):
        run.build(cfg.module)


def test_init_names_the_keys_a_public_file_lacks_or_adds(compose_config, synth_zarr: Path, tmp_path: Path) -> None:
    weights = resnet_weights()
    weights["extra.weight"] = weights.pop("layer1.0.conv1.weight")
    torch.save(moco_v2(weights), tmp_path / "cem.pth.tar")
    cfg = compose_config("finetune", [*finetune_args(synth_zarr, "cnn2d"), f"init={tmp_path / 'cem.pth.tar'}"])
    with pytest.raises(EmfmError, match=r"\(MoCo v2 layout .*\): the weights do not fit the ResNet \(missing: "
                                        r"layer1.0.conv1.weight; unexpected: extra.weight\)"):
        run.build(cfg.module)


def test_evaluating_a_checkpoints_own_training_slices_warns(synth_zarr: Path, two_step_finetuned: Callable[[str], Path],
                                                           tmp_path: Path, run_cli: CommandLine) -> None:
    """`emfm evaluate` scored the slices a checkpoint was trained on as if they were held out: a one-line warning
    names them (the checkpoint records its data); held-out slices are scored without it."""
    checkpoint = two_step_finetuned("vit2d")                           # trained on slices 0-3
    evaluate = ["evaluate", f"checkpoint={checkpoint}", f"raw={synth_zarr}", f"labels={synth_zarr}/labels/membranes",
                "thresholds=[0.5]"]
    seen, held_out = run_cli([([*evaluate, "slices=2-5", f"hydra.run.dir={tmp_path / 'a'}"], None),
                              ([*evaluate, "slices=12-13", f"hydra.run.dir={tmp_path / 'b'}"], None)])
    assert seen.returncode == 0 and held_out.returncode == 0, (seen.stderr[-2000:], held_out.stderr[-2000:])
    said = [line for line in (seen.stdout + seen.stderr).splitlines() if "training slices" in line]
    assert said == [f"slices [2, 3] of {synth_zarr} are training slices of checkpoint={checkpoint} (its "
                    f"data.labeled_slices): their scores are optimistic; score held-out slices"]
    assert "training slices" not in held_out.stdout + held_out.stderr
