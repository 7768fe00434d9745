"""Sliding-window prediction: blended tiles reproduce a whole-image computation exactly."""

import pytest
import torch

from emfm.errors import EmfmError
from emfm.inference import blend_weights, in_precision, inference_precision, sliding_window, tile_starts


def test_tiles_cover_the_image_and_end_at_its_border() -> None:
    assert tile_starts(100, 32, 0.25) == [0, 24, 48, 68]
    assert tile_starts(32, 32, 0.25) == [0] and tile_starts(20, 32, 0.5) == [0]
    weights = blend_weights((4, 6))
    assert weights.shape == (4, 6) and weights.min() > 0 and weights[1:3, 2:4].eq(weights.max()).all()
    gaussian = blend_weights((64, 64, 64), kind="gaussian")
    assert gaussian.min() == pytest.approx(1e-3 * float(gaussian.max()))   # the corners: floored as a whole map
    assert gaussian[31, 31, 31] == gaussian.max() and gaussian[16, 31, 31] > 100 * gaussian.min()


@pytest.mark.parametrize("shape, patch", [((1, 70, 90), (32, 32)), ((1, 11, 40, 37), (4, 16, 16)),
                                          ((1, 20, 24), (32, 32))])
def test_a_pointwise_model_gives_the_whole_image_result_without_seams(shape: tuple, patch: tuple) -> None:
    image = torch.rand(shape)
    out = sliding_window(lambda x: torch.cat([2 * x + 1, x.square()], 1), image, patch, overlap=0.3, batch_size=3)
    assert out.shape == (2, *shape[1:])
    torch.testing.assert_close(out, torch.cat([2 * image + 1, image.square()]))


def test_precision_resolves_and_bf16_runs_the_model_under_autocast() -> None:
    assert inference_precision(32) == inference_precision("32") == "32" and inference_precision("bf16") == "bf16"
    assert inference_precision("auto") == ("bf16" if torch.cpu._is_amx_tile_supported() else "32")
    with pytest.raises(EmfmError, match="precision=fp16: expected one of auto, 32, bf16"):
        inference_precision("fp16")
    torch.manual_seed(0)
    linear, x = torch.nn.Linear(16, 4), torch.randn(5, 16)
    assert in_precision(linear, "32") is linear
    out = in_precision(linear, "bf16")(x)
    assert out.dtype == torch.bfloat16                          # the product ran in bf16 ...
    torch.testing.assert_close(out.float(), linear(x), atol=0.05, rtol=0.02)    # ... to bf16's precision
