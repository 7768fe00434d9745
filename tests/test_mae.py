import pytest
import torch

from emfm.errors import EmfmError
from emfm.models.encoders import create_encoder
from emfm.models.masking import masked_mse, patchify, random_masking, unpatchify
from emfm.pretrain.base import PretrainModule
from emfm.pretrain.mae import MAE
from tests.conftest import fixed_batch_losses, tiny_encoder


@pytest.mark.parametrize("ratio", [0.25, 0.6, 0.75])
def test_random_masking_hides_the_requested_fraction(ratio: float) -> None:
    keep, mask = random_masking(5, 64, ratio, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (5, 64)
    assert (mask.sum(1) == round(ratio * 64)).all()
    assert keep.shape == (5, 64 - round(ratio * 64))
    assert (keep.diff(dim=1) > 0).all()  # sorted, no repeats
    assert not mask.gather(1, keep).any()  # kept tokens are exactly the visible ones
    assert not torch.equal(mask[0], mask[1])  # a different mask per sample


@pytest.mark.parametrize("shape,patch", [((2, 1, 16, 24), (8, 8)), ((2, 3, 8, 16, 16), (4, 8, 8))])
def test_patchify_round_trips(shape: tuple, patch: tuple) -> None:
    x = torch.randn(shape)
    grid = tuple(s // p for s, p in zip(shape[2:], patch))
    patches = patchify(x, patch)
    assert patches.shape == (shape[0], torch.tensor(grid).prod().item(), torch.tensor(patch).prod().item() * shape[1])
    torch.testing.assert_close(patches[0, 1], x[0, :, :8, 8:16].permute(1, 2, 0).flatten() if len(patch) == 2
                               else x[0, :, :4, :8, 8:16].permute(1, 2, 3, 0).flatten())
    torch.testing.assert_close(unpatchify(patches, patch, grid), x)


def test_loss_only_counts_hidden_patches() -> None:
    target = torch.randn(2, 6, 10)
    mask = torch.tensor([[True, False, True, False, False, False]] * 2)
    pred = target.clone()
    pred[~mask] += 100.0  # wrong everywhere the encoder could see: no effect on the loss
    assert masked_mse(pred, target, mask) == 0
    pred[mask] += 1.0
    torch.testing.assert_close(masked_mse(pred, target, mask), torch.tensor(1.0))


def test_mae_step_reduces_loss_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    module = PretrainModule(tiny_encoder("vit2d"), {"mae": {"mask_ratio": 0.75, "decoder_dim": 32, "decoder_depth": 1,
                                                            "decoder_heads": 2}})
    images = torch.randn(4, 1, 32, 32).cumsum(-1) / 8  # smooth-ish structure to learn
    losses = fixed_batch_losses(module, images, steps=60, lr=2e-3)
    assert losses[-1] < 0.5 * losses[0]


def test_visualize_keeps_visible_patches() -> None:
    encoder = create_encoder(**tiny_encoder("vit2d"))
    mae = MAE(encoder, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    images = torch.rand(2, 1, 32, 32)
    panels = mae.visualize(encoder, images)
    assert list(panels) == ["input", "masked", "reconstruction"]
    _, mask = random_masking(2, 16, 0.75, generator=torch.Generator().manual_seed(0))  # visualize's mask
    hidden = unpatchify(mask[..., None].float().expand(-1, -1, 64), (8, 8), (4, 4)).bool()
    torch.testing.assert_close(panels["masked"][~hidden], images[~hidden])
    torch.testing.assert_close(panels["reconstruction"][~hidden], images[~hidden])
    assert (panels["masked"][hidden] == images.min()).all()
    assert not torch.allclose(panels["reconstruction"][hidden], images[hidden])


def test_mae_refuses_a_cnn() -> None:
    with pytest.raises(EmfmError, match="needs a ViT encoder"):
        MAE(create_encoder("cnn2d", name="test_resnet", input_shape=[64, 64]))
