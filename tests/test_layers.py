import pytest
import torch

from emfm.models.layers import InstanceNorm, sincos_pos_embed


@pytest.mark.parametrize("grid,dim", [((4, 6), 64), ((2, 4, 4), 96), ((3, 5), 30)])
def test_sincos_positions_are_distinct_and_local(grid: tuple, dim: int) -> None:
    embed = sincos_pos_embed(grid, dim)
    assert embed.shape == (torch.tensor(grid).prod().item(), dim)
    assert torch.cdist(embed, embed).add(torch.eye(len(embed)) * 1e9).min() > 1e-3  # no two alike
    # Along the last axis, a neighbour is closer than a token three steps away.
    assert (embed[0] - embed[1]).norm() < (embed[0] - embed[3]).norm()


@pytest.mark.parametrize("dims", [2, 3])
def test_instance_norm_equals_torchs_and_loads_its_weights(dims: int) -> None:
    """emfm's instance norm (group norm, a group per channel: faster on a CPU) is torch's, parameters included, so
    checkpoints saved with ``nn.InstanceNorm2d/3d`` load into it."""
    torchs = (torch.nn.InstanceNorm2d if dims == 2 else torch.nn.InstanceNorm3d)(6, affine=True)
    torch.nn.init.normal_(torchs.weight)
    torch.nn.init.normal_(torchs.bias)
    ours = InstanceNorm(6)
    ours.load_state_dict(torchs.state_dict())
    x = torch.randn(3, 6, *([9] * dims)) * 5 + 2
    torch.testing.assert_close(ours(x), torchs(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours(x), x)
