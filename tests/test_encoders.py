import pytest
import torch

from emfm.errors import EmfmError
from emfm.models.encoders import ENCODERS, create_encoder

CONFIGS = {
    "vit2d": {"name": "test_vit", "img_size": [64, 96], "patch_size": 8, "feature_depths": 3},
    "cnn2d": {"name": "test_resnet"},
}


@pytest.mark.parametrize("family", sorted(ENCODERS))
def test_every_encoder_keeps_the_interface(family: str) -> None:
    encoder = create_encoder(family, **CONFIGS[family])
    x = torch.randn(2, 1, 64, 96)
    assert encoder(x).shape == (2, encoder.embed_dim)
    features = encoder.forward_features(x)
    assert len(features) == len(encoder.feature_channels) == len(encoder.feature_strides)
    for fmap, channels, stride in zip(features, encoder.feature_channels, encoder.feature_strides):
        assert fmap.shape == (2, channels, 64 // stride, 96 // stride)


def test_vit_features_come_from_evenly_spread_depths() -> None:
    encoder = create_encoder("vit2d", name="test_vit", img_size=32, patch_size=8, feature_depths=3)
    assert encoder.feature_depths == [1, 3, 5]  # test_vit has 6 blocks
    assert encoder.grid_size == (4, 4)


def test_vit_tokens_match_timm_forward() -> None:
    encoder = create_encoder("vit2d", name="test_vit", img_size=32, patch_size=8).eval()
    x = torch.randn(2, 1, 32, 32)
    ours = encoder.run_blocks(encoder.embed_tokens(x))
    torch.testing.assert_close(ours, encoder.vit.forward_features(x))


def test_bad_encoder_configs_raise() -> None:
    with pytest.raises(EmfmError, match="not divisible by the ViT patch size 16"):
        create_encoder("vit2d", name="test_vit", img_size=[40, 32], patch_size=16)
    with pytest.raises(EmfmError, match="unknown encoder family 'vit9d'"):
        create_encoder("vit9d")
    with pytest.raises(EmfmError, match="model.name: Unknown model"):
        create_encoder("cnn2d", name="no_such_net")
    with pytest.raises(EmfmError, match="needs a 2-D patch shape"):
        create_encoder("vit2d", name="test_vit", img_size=[8, 32, 32], patch_size=8)
