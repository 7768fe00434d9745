import pytest
import torch
import torch.nn.functional as F

from emfm.errors import EmfmError
from emfm.models.encoders import ENCODERS, create_encoder
from emfm.models.heads import (
    HEAD_NAMES,
    LinearHead,
    SegmentationModel,
    UNetHead,
    UNETRHead,
    create_head,
    upsampling_schedule,
)
from tests.conftest import tiny_encoder

# The tiny encoders of configs/model/tiny/ (3-D ones anisotropic), without their family.
TINY = {family: {k: v for k, v in tiny_encoder(family).items() if k != "family"} for family in ENCODERS}
SMALL = {"auto": {"channels": 4}, "unetr": {"channels": 4}, "unet": {"channels": 4}, "linear": {}}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions gain nothing from intra-op threads, and lose a lot on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model(family: str, head: str, out_channels: int = 2, **encoder_kw) -> SegmentationModel:
    encoder = create_encoder(family, **{**TINY[family], **encoder_kw})
    return SegmentationModel(encoder, create_head(head, encoder, out_channels, **SMALL[head]))


def test_every_family_is_tested() -> None:
    assert sorted(TINY) == sorted(ENCODERS)


@pytest.mark.parametrize("head", ["auto", "linear"])
@pytest.mark.parametrize("family", sorted(TINY))
def test_logits_at_full_resolution_and_every_parameter_trains(family: str, head: str) -> None:
    """A parameter outside the graph would break DDP, and a frozen-by-accident encoder fine-tuning."""
    torch.manual_seed(0)
    net = model(family, head, out_channels=3)
    x = torch.randn(2, 1, *TINY[family]["input_shape"])
    logits = net(x)
    assert logits.shape == (2, 3, *TINY[family]["input_shape"])
    logits.square().mean().backward()
    unused = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused
    assert any(p.grad.abs().sum() > 0 for p in net.encoder.parameters())
    assert all(p.grad.abs().sum() > 0 for n, p in net.head.named_parameters() if n.endswith("weight"))


@pytest.mark.parametrize("family", sorted(TINY))
def test_auto_picks_unetr_for_vits_and_unet_for_cnns(family: str) -> None:
    encoder = create_encoder(family, **TINY[family])
    head = create_head("auto", encoder, 1, channels=4)
    assert isinstance(head, UNETRHead if family.startswith("vit") else UNetHead)
    assert isinstance(create_head("linear", encoder, 1), LinearHead)


@pytest.mark.parametrize("family,head,cell", [("vit2d", "unetr", 4), ("cnn2d", "unet", 4), ("unet2d", "unet", 2),
                                              ("vit2d", "linear", 16)])
def test_head_fits_a_fixed_target(family: str, head: str, cell: int) -> None:
    """A checkerboard of ``cell`` pixels: finer than a token for the full decoders, coarser for
    the linear probe, whose bilinear upsampling cannot place an edge inside a token."""
    torch.manual_seed(0)
    encoder = create_encoder(family, **TINY[family])
    kw = {} if head == "linear" else {"channels": 8}
    net = SegmentationModel(encoder, create_head(head, encoder, 1, **kw))
    shape = TINY[family]["input_shape"]
    x = torch.randn(2, 1, *shape)
    yy, xx = torch.meshgrid(*[torch.arange(s) for s in shape], indexing="ij")
    target = ((yy // cell + xx // cell) % 2).float().expand(2, 1, *shape)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = F.binary_cross_entropy_with_logits(net(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("family", ["unet2d", "unet3d", "cnn2d", "cnn3d"])
def test_unet_head_adds_a_full_resolution_stage_only_over_a_strided_finest_map(family: str) -> None:
    """Over a U-Net encoder (first map at stride 1) the decoder ends on that map, one block per skip, as torch-em's
    U-Net; over a ResNet (stride 2) a last stage takes the raw image as its skip."""
    encoder = create_encoder(family, **TINY[family])
    head = create_head("auto", encoder, 1, channels=4)
    assert isinstance(head, UNetHead) and len(head.blocks) == len(encoder.feature_channels) - 1
    assert (head.full is None) == family.startswith("unet")


def test_unknown_head_and_option_are_one_line_errors() -> None:
    encoder = create_encoder("vit2d", **TINY["vit2d"])
    with pytest.raises(EmfmError, match=r"head.name='foo' is not one of \['auto', 'linear', 'unet', 'unetr'\]"):
        create_head("foo", encoder, 2)
    with pytest.raises(EmfmError, match="head.width is not an option of head.name=unetr"):
        create_head("auto", encoder, 2, width=8)
    with pytest.raises(EmfmError, match="head.norm='layer'"):
        create_head("unetr", encoder, 2, norm="layer")
    assert HEAD_NAMES == ["auto", "linear", "unet", "unetr"]


def test_unetr_refuses_multi_scale_maps() -> None:
    encoder = create_encoder("cnn2d", **TINY["cnn2d"])
    with pytest.raises(EmfmError, match="use head.name=unet"):
        create_head("unetr", encoder, 2)


@pytest.mark.parametrize("family,patch", [("vit2d", 4), ("vit3d", [2, 8, 8]), ("vit3d", [8, 4, 4]), ("vit3d", 4)])
def test_unetr_on_fine_and_anisotropic_patches(family: str, patch) -> None:
    """Fine grids (model=vit2d_p4, vit3d_p8) have fewer upsampling stages than skips."""
    net = model(family, "unetr", patch_size=patch, feature_depths=3)
    x = torch.randn(1, 1, *TINY[family]["input_shape"])
    assert net(x).shape == (1, 2, *TINY[family]["input_shape"])


def test_upsampling_schedule_does_z_first_and_odd_factors_at_once() -> None:
    assert upsampling_schedule((4, 16, 16)) == [(2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 2)]
    assert upsampling_schedule((2, 8, 8)) == [(2, 2, 2), (1, 2, 2), (1, 2, 2)]
    assert upsampling_schedule((14, 14)) == [(7, 7), (2, 2)]
    assert upsampling_schedule((12, 16)) == [(3, 2), (2, 2), (2, 2), (1, 2)]


@pytest.mark.parametrize("depths,levels", [(4, [1, 2]), (2, [2]), (3, [1, 2])])
def test_unetr_spreads_skips_over_the_stages(depths: int, levels: list) -> None:
    """Patch 8: three stages, two skip levels; shallow maps finest, surplus maps share a level."""
    encoder = create_encoder("vit2d", **{**TINY["vit2d"], "feature_depths": depths})
    head = create_head("unetr", encoder, 1, channels=4)
    assert sorted(set(head.skip_levels)) == levels
    assert head.skip_levels == sorted(head.skip_levels)


def test_linear_head_on_the_last_map_only() -> None:
    encoder = create_encoder("cnn2d", **TINY["cnn2d"])
    head = create_head("linear", encoder, 2, last_only=True)
    assert len(head.proj) == 1
    x = torch.randn(1, 1, 64, 64)
    assert head(x, encoder.forward_features(x)).shape == (1, 2, 64, 64)


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_other_norms(norm: str) -> None:
    encoder = create_encoder("cnn3d", **TINY["cnn3d"])
    net = SegmentationModel(encoder, create_head("unet", encoder, 1, channels=4, norm=norm))
    assert net(torch.randn(2, 1, 8, 64, 64)).shape == (2, 1, 8, 64, 64)
