import pytest
import torch

from emfm.models.layers import sincos_pos_embed


@pytest.mark.parametrize("grid,dim", [((4, 6), 64), ((2, 4, 4), 96), ((3, 5), 30)])
def test_sincos_positions_are_distinct_and_local(grid: tuple, dim: int) -> None:
    embed = sincos_pos_embed(grid, dim)
    assert embed.shape == (torch.tensor(grid).prod().item(), dim)
    assert torch.cdist(embed, embed).add(torch.eye(len(embed)) * 1e9).min() > 1e-3  # no two alike
    # Along the last axis, a neighbour is closer than a token three steps away.
    assert (embed[0] - embed[1]).norm() < (embed[0] - embed[3]).norm()
