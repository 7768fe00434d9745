from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch

import emfm
from emfm import run
from emfm.errors import EmfmError
from emfm.models.encoders import ENCODERS, create_encoder
from emfm.pretrain.base import PretrainModule
from tests.conftest import TINY_FINETUNE, CommandLine, pretrained, tiny

# Each family at a tiny size, on an input shape of its dimensionality (3-D ones anisotropic).
CONFIGS = {
    "vit2d": ([64, 96], {"name": "test_vit", "patch_size": 8, "feature_depths": 3}),
    "vit3d": ([8, 32, 48], {"name": "test_vit", "patch_size": [4, 8, 8], "feature_depths": 3}),
    "cnn2d": ([64, 96], {"name": "test_resnet"}),
    "cnn3d": ([8, 32, 64], {"name": "test_resnet3d"}),
    "unet2d": ([64, 96], {"channels": 8, "depth": 3}),
    "unet3d": ([8, 32, 64], {"channels": 8, "depth": 3}),
}


def build(family: str):
    shape, cfg = CONFIGS[family]
    return create_encoder(family, input_shape=shape, **cfg), shape


def test_every_family_is_tested() -> None:
    assert sorted(CONFIGS) == sorted(ENCODERS)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_every_encoder_keeps_the_interface(family: str) -> None:
    encoder, shape = build(family)
    assert encoder.spatial_dims == len(shape) and encoder.input_shape == tuple(shape)
    x = torch.randn(2, 1, *shape)
    assert encoder(x).shape == (2, encoder.embed_dim)
    features = encoder.forward_features(x)
    assert len(features) == len(encoder.feature_channels) == len(encoder.feature_strides)
    for fmap, channels, stride in zip(features, encoder.feature_channels, encoder.feature_strides):
        assert len(stride) == len(shape)
        assert fmap.shape == (2, channels, *[s // st for s, st in zip(shape, stride)])


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_backward_reaches_every_parameter(family: str) -> None:
    """A parameter outside the graph breaks DDP (unless it searches for unused ones)."""
    encoder, shape = build(family)
    x = torch.randn(2, 1, *shape)
    loss = encoder(x).sum() + sum(fmap.mean() for fmap in encoder.forward_features(x))
    loss.backward()
    unused = [n for n, p in encoder.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused


def test_vit_features_come_from_evenly_spread_depths() -> None:
    encoder = create_encoder("vit2d", input_shape=[32, 32], name="test_vit", patch_size=8, feature_depths=3)
    assert encoder.feature_depths == [1, 3, 5]  # test_vit has 6 blocks
    assert encoder.grid_size == (4, 4) and encoder.patch_size == (8, 8)


def test_vit_tokens_and_maps_match_timm() -> None:
    encoder = create_encoder("vit2d", input_shape=[32, 32], name="test_vit", patch_size=8).eval()
    x = torch.randn(2, 1, 32, 32)
    ours = encoder.run_blocks(encoder.embed_tokens(x))
    torch.testing.assert_close(ours, encoder.vit.forward_features(x))
    timm_maps = encoder.vit.forward_intermediates(
        x, indices=encoder.feature_depths, norm=True, intermediates_only=True
    )
    torch.testing.assert_close(encoder.forward_features(x), timm_maps)


@pytest.mark.parametrize(
    "family,name,patch",
    [("cnn2d", "test_resnet", {}), ("cnn2d", "resnet18", {}), ("cnn2d", "test_convnext", {}),
     ("vit2d", "test_vit", {"patch_size": 8})],
)
def test_2d_encoders_are_plain_timm_models(family: str, name: str, patch: dict) -> None:
    """The weights reload into a stock timm model, which then gives the same embedding."""
    encoder = create_encoder(family, input_shape=[64, 64], name=name, **patch).eval()
    inner, size = (encoder.vit, {"img_size": [64, 64]}) if family == "vit2d" else (encoder.cnn, {})
    plain = timm.create_model(name, pretrained=False, num_classes=0, in_chans=1, **size, **patch)
    plain.load_state_dict(inner.state_dict(), strict=True)
    x = torch.randn(2, 1, 64, 64)
    torch.testing.assert_close(encoder(x), plain.eval()(x))
    if family == "cnn2d":
        maps = encoder.forward_features(x)
        assert [m.shape[1] for m in maps] == [f["num_chs"] for f in plain.feature_info]
        assert [m.shape[2:] for m in maps] == [(64 // f["reduction"],) * 2 for f in plain.feature_info]


@pytest.mark.parametrize(
    "name", ["test_vit", "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"]
)
def test_vit3d_has_the_2d_transformer_of_the_same_name(name: str) -> None:
    meta = {"name": name, "device": "meta"}  # structure only: no time spent on weights
    vit3d = create_encoder("vit3d", input_shape=[16, 64, 64], patch_size=[4, 16, 16], **meta).vit
    vit2d = create_encoder("vit2d", input_shape=[64, 64], **meta).vit

    def shapes(vit: torch.nn.Module) -> dict:
        return {k: v.shape for k, v in vit.state_dict().items() if not k.startswith(("patch_", "pos_"))}

    assert shapes(vit3d) == shapes(vit2d)  # blocks, norms, class/register tokens
    assert len(vit3d.blocks) == len(vit2d.blocks) and vit3d.embed_dim == vit2d.embed_dim
    assert vit3d.blocks[0].attn.num_heads == vit2d.blocks[0].attn.num_heads
    assert vit3d.patch_embed.proj.weight.shape[2:] == (4, 16, 16)


def test_vit3d_positions_follow_the_input_grid() -> None:
    """A larger input extends the token grid: a token keeps its position code."""
    encoder = create_encoder("vit3d", input_shape=[8, 32, 32], name="test_vit", patch_size=[4, 8, 8])
    encoder.eval()
    assert encoder.grid_size == (2, 4, 4)
    maps = encoder.forward_features(torch.randn(1, 1, 16, 32, 48))
    assert all(m.shape == (1, encoder.embed_dim, 4, 4, 6) for m in maps)
    assert encoder(torch.randn(1, 1, 16, 32, 48)).shape == (1, encoder.embed_dim)
    prefix = encoder.num_prefix_tokens
    built = encoder.embed_tokens(torch.zeros(1, 1, 8, 32, 32))[0, prefix:].reshape(2, 4, 4, -1)
    larger = encoder.embed_tokens(torch.zeros(1, 1, 16, 32, 48))[0, prefix:].reshape(4, 4, 6, -1)
    torch.testing.assert_close(larger[:2, :, :4], built)


def test_vit3d_takes_an_isotropic_patch_size() -> None:
    encoder = create_encoder("vit3d", input_shape=[16, 32, 32], name="test_vit", patch_size=8)
    assert encoder.patch_size == (8, 8, 8) and encoder.grid_size == (2, 4, 4)


def test_cnn3d_strides_and_sizes_can_be_overridden() -> None:
    encoder = create_encoder(
        "cnn3d", input_shape=[8, 32, 32], name="test_resnet3d", blocks=[1, 2, 1, 1],
        strides=[1, [2, 2, 2], [1, 2, 2], 2], stem_stride=[1, 1, 1],
    )
    assert encoder.feature_strides == [(1, 1, 1), (1, 1, 1), (2, 2, 2), (2, 4, 4), (4, 8, 8)]
    assert encoder.feature_channels == [8, 8, 16, 32, 64] and len(encoder.stages[1]) == 2
    assert encoder.forward_features(torch.randn(1, 1, 8, 32, 32))[-1].shape == (1, 64, 2, 4, 4)


@pytest.mark.parametrize(
    "family,shape,axes",
    [
        ("vit3d", [128, 128], "[Z, Y, X]"),
        ("cnn3d", [128, 128], "[Z, Y, X]"),
        ("vit2d", [8, 128, 128], "[Y, X]"),
        ("cnn2d", [8, 128, 128], "[Y, X]"),
    ],
)
def test_an_encoder_rejects_a_patch_shape_of_other_dims(family: str, shape: list, axes: str) -> None:
    dims, n = (3, 2) if len(shape) == 2 else (2, 3)
    expected = (
        f"model.family={family} is {dims}-D but the patch shape {shape} has {n} axes; "
        f"set data.patch_shape={axes}"
    )
    with pytest.raises(EmfmError) as err:
        create_encoder(family, input_shape=shape, name=CONFIGS[family][1]["name"])
    assert str(err.value) == expected


def test_bad_encoder_configs_raise() -> None:
    with pytest.raises(EmfmError, match=r"data.patch_shape \[40, 32\] .* by model.patch_size \[16, 16\]"):
        create_encoder("vit2d", input_shape=[40, 32], name="test_vit", patch_size=16)
    with pytest.raises(EmfmError, match=r"data.patch_shape \[6, 32, 32\] .* by model.patch_size \[4, 8, 8\]"):
        create_encoder("vit3d", input_shape=[6, 32, 32], name="test_vit", patch_size=[4, 8, 8])
    with pytest.raises(EmfmError, match=r"model.patch_size=\[8, 8\] needs 1 or 3 entries"):
        create_encoder("vit3d", input_shape=[8, 32, 32], name="test_vit", patch_size=[8, 8])
    with pytest.raises(EmfmError, match=r"\[40, 40\] is not divisible by the total stride of model.name"):
        create_encoder("cnn2d", input_shape=[40, 40], name="test_resnet")
    with pytest.raises(EmfmError, match=r"\[6, 32, 32\] is not divisible by the total stride"):
        create_encoder("cnn3d", input_shape=[6, 32, 32], name="test_resnet3d")
    with pytest.raises(EmfmError, match="unknown encoder family 'vit9d'"):
        create_encoder("vit9d")
    with pytest.raises(EmfmError, match="model.name: Unknown model"):
        create_encoder("cnn2d", input_shape=[64, 64], name="no_such_net")
    with pytest.raises(EmfmError, match="model.name: unknown 3-D ResNet 'resnet99_3d'"):
        create_encoder("cnn3d", input_shape=[8, 64, 64], name="resnet99_3d")
    with pytest.raises(EmfmError, match="model.name=test_resnet is not a timm VisionTransformer"):
        create_encoder("vit3d", input_shape=[8, 32, 32], name="test_resnet", patch_size=8)
    with pytest.raises(EmfmError, match="model.feature_depths"):
        create_encoder("vit2d", input_shape=[32, 32], name="test_vit", patch_size=8, feature_depths=[6])


@pytest.mark.parametrize("family,shape,strides", [
    ("unet2d", [32, 32], [(1, 1), (2, 2), (4, 4), (8, 8), (16, 16)]),
    ("unet3d", [8, 32, 32], [(1, 1, 1), (1, 2, 2), (1, 4, 4), (2, 8, 8), (4, 16, 16)]),
])
def test_unet_encoder_starts_at_full_resolution(family: str, shape: list, strides: list) -> None:
    """torch-em's U-Net: 32 channels at stride 1, doubling per pooling stage; 3-D keeps Z in the first half."""
    encoder = create_encoder(family, input_shape=shape)
    assert encoder.feature_strides == strides
    assert encoder.feature_channels == [32, 64, 128, 256, 512] and encoder.embed_dim == 512
    x = torch.randn(1, 1, *shape)
    maps = encoder.forward_features(x)
    assert [tuple(m.shape[2:]) for m in maps] == [tuple(s // t for s, t in zip(shape, st)) for st in strides]
    torch.testing.assert_close(encoder(x), maps[-1].mean(tuple(range(2, 2 + len(shape)))))  # the pooled deepest map
    assert [g[0].split(".")[1] for g in encoder.layer_groups()] == ["0", "1", "2", "3", "4"]


def test_unet_strides_can_be_overridden_and_bad_settings_are_named() -> None:
    encoder = create_encoder("unet3d", input_shape=[8, 32, 32], channels=4, depth=2, strides=[[2, 2, 2], [1, 2, 2]])
    assert encoder.feature_strides == [(1, 1, 1), (2, 2, 2), (2, 4, 4)] and encoder.feature_channels == [4, 8, 16]
    assert encoder.forward_features(torch.randn(1, 1, 8, 32, 32))[-1].shape == (1, 16, 4, 8, 8)
    with pytest.raises(EmfmError, match=r"^model.depth=0: a U-Net encoder needs at least 1 pooling stage$"):
        create_encoder("unet2d", input_shape=[32, 32], depth=0)
    with pytest.raises(EmfmError, match=r"^model.strides needs one entry per pooling stage \(model.depth=4\); got 2$"):
        create_encoder("unet2d", input_shape=[32, 32], strides=[2, 2])
    with pytest.raises(EmfmError, match=r"^data.patch_shape \[24, 32\] is not divisible by the total stride of "
                                        r"model.depth and model.strides \[16, 16\]$"):
        create_encoder("unet2d", input_shape=[24, 32])
    with pytest.raises(EmfmError, match=r"^model.strides\[1\]=\[2, 2\] needs 1 or 3 entries$"):
        create_encoder("unet3d", input_shape=[8, 32, 32], depth=2, strides=[2, [2, 2]])
    with pytest.raises(EmfmError, match=r"^model.name is not a setting of model.family=unet2d; expected one of "
                                        r"\['input_shape', 'in_chans', 'channels', 'depth', 'strides'\]$"):
        create_encoder("unet2d", input_shape=[32, 32], name="resnet18")   # what model=cnn2d's recipes set


@pytest.mark.parametrize("family", ["unet2d", "unet3d"])
def test_unet_pretrains_whole_by_restoration_then_fine_tunes_and_exports(
        compose_config, synth_zarr: Path, tmp_path: Path, run_cli: CommandLine, family: str) -> None:
    """objective=restore trains the encoder and the U-Net decoder; `emfm finetune init=` inherits both (a fresh output
    layer) and trains with the topology terms; `emfm export` writes the encoder, which emfm.load_encoder gives back
    bit for bit."""
    checkpoint = pretrained(tmp_path / "pt", synth_zarr, 2, [*tiny(family, "restore"), "head=unet"])
    weights = torch.load(checkpoint, weights_only=True)["state_dict"]
    args = [f"model=tiny/{family}", "target=membrane", f"data.raw={synth_zarr}",
            f"data.labels={synth_zarr}/labels/membranes", "data.labeled_slices=[0,1]", "data.val_slices=[12]",
            "trainer.max_steps=2", "trainer.val_check_interval=2", *TINY_FINETUNE,
            f"init={checkpoint}", "head=unet", "head.channels=8"]
    model = run.build(compose_config("finetune", args).module).model
    assert model.head.full is None                     # the encoder's first map is already at full resolution
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, weights[f"encoder.{key}"]), key
    decoder = {k: v for k, v in model.head.state_dict().items() if not k.startswith("out.")}
    assert decoder and all(torch.equal(v, weights[f"methods.restore.head.{k}"]) for k, v in decoder.items())
    topology = ["module.loss.skeleton_recall_weight=1.0", "module.loss.cldice_weight=0.5"]   # issue 26's pair
    out = run.finetune(compose_config("finetune", [*args, *topology]))
    assert out["train/loss"] > 0 and 0 < out["val/iou"] <= out["val/dice"]
    assert out["train/loss"] == pytest.approx(out["train/dice"] + out["train/ce"] + out["train/skeleton_recall"]
                                              + 0.5 * out["train/cldice"], rel=1e-5)

    [exported] = run_cli([(["export", str(checkpoint), str(tmp_path / "enc")], None)])
    assert exported.returncode == 0 and "Traceback" not in exported.stderr, exported.stderr[-2000:]
    original = PretrainModule.load_from_checkpoint(checkpoint, weights_only=True).encoder.eval()
    x = torch.rand(2, 1, *original.input_shape)
    with torch.no_grad():
        assert torch.equal(emfm.load_encoder(tmp_path / "enc")(x), original(x))


def test_a_fine_tuned_unet_exports_as_a_bioimage_io_package_citing_u_net(
        two_step_finetuned: Callable[[str], Path], tmp_path: Path, run_cli: CommandLine) -> None:
    [out] = run_cli([(["export", str(two_step_finetuned("unet2d")), str(tmp_path / "pkg"), "--author", "A. Tester"],
                      None)])
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "Ronneberger et al., U-Net" in (tmp_path / "pkg" / "rdf.yaml").read_text()
