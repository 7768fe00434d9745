"""Every encoder family with every objective that fits it, through the real configs and Trainer."""

import os
import socket
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from emfm import run
from emfm.errors import EmfmError
from emfm.models.encoders import create_encoder
from emfm.models.masking import tube_masking
from emfm.pretrain.base import PretrainModule
from emfm.pretrain.contrastive import info_nce, nt_xent
from emfm.pretrain.densecl import DenseCL, dense_info_nce, match_cells
from emfm.pretrain.mim import MIM
from emfm.pretrain.mocov3 import MoCoV3
from emfm.restoration import Corruption
from tests.conftest import fixed_batch_losses, tiny, tiny_encoder

MASKED = {"vit2d": "mae", "vit3d": "mae", "cnn2d": "mim", "cnn3d": "mim"}
COMBINATIONS = [(model, objective) for model in MASKED
                for objective in (MASKED[model], "mocov3", "simclr", "densecl", "restore", "hybrid")]
COMBINATIONS += [("vit2d_p4", "mae"), ("vit3d_p8", "mae")]  # fine token grids: MAE's targets and decoder


@pytest.mark.parametrize("model,objective", COMBINATIONS)
def test_a_few_steps_train_the_encoder(compose_config, synth_zarr: Path, model: str, objective: str) -> None:
    cfg = compose_config("pretrain", [
        *tiny(model, objective), f"data.volumes=[{synth_zarr}]", "trainer.max_steps=3",
        "trainer.val_check_interval=3", "trainer.log_every_n_steps=1", "logger=none",
        "callbacks.model_checkpoint=null",
    ])
    datamodule, module, trainer, _ = run.prepare(cfg, cfg.objective)
    before = {k: v.clone() for k, v in module.encoder.state_dict().items()}
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 3
    assert trainer.callback_metrics["train/loss"] > 0 and trainer.callback_metrics["val/loss"] > 0
    changed = [k for k, v in module.encoder.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, before[k])]
    weights = [k for k, v in before.items() if v.is_floating_point() and k.endswith("weight")]
    assert set(weights) <= set(changed), f"not trained: {sorted(set(weights) - set(changed))[:5]}"


def test_hybrid_sums_weighted_losses_and_picks_the_masked_method() -> None:
    module = PretrainModule(tiny_encoder("vit2d"), {"masked": {"weight": 2.0, "decoder_dim": 32},
                                                    "simclr": {"weight": 0.5, "proj_dim": 8, "hidden_dim": 16}})
    assert list(module.methods) == ["mae", "simclr"]
    out = module.compute_loss(torch.rand(4, 1, 32, 32), torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["loss"], 2.0 * out["mae/loss"] + 0.5 * out["simclr/loss"])
    cnn = tiny_encoder("cnn2d")
    assert list(PretrainModule(cnn, {"masked": {}}).methods) == ["mim"]


def test_objectives_that_do_not_fit_are_refused() -> None:
    cnn = tiny_encoder("cnn2d")
    with pytest.raises(EmfmError, match="objective=mae drops tokens and needs a ViT encoder"):
        PretrainModule(cnn, {"mae": {}})
    with pytest.raises(EmfmError, match="objective.methods.byol: unknown method"):
        PretrainModule(cnn, {"byol": {}})
    with pytest.raises(EmfmError, match="objective.methods.mim: .*unexpected keyword argument 'mask_ration'"):
        PretrainModule(cnn, {"mim": {"mask_ration": 0.5}})
    with pytest.raises(EmfmError, match="mask_patch \\[5, 5\\] must have 2 entries dividing the patch shape"):
        PretrainModule(cnn, {"mim": {"mask_patch": 5}})
    with pytest.raises(EmfmError, match="leaves a single mask cell"):
        PretrainModule({**cnn, "input_shape": [32, 32]}, {"mim": {}})
    with pytest.raises(EmfmError, match="densecl.feature_map=5: model.family=cnn2d has 5 feature maps"):
        PretrainModule(cnn, {"densecl": {"feature_map": 5}})
    with pytest.raises(EmfmError, match="densecl.dense_weight must be in"):
        PretrainModule(cnn, {"densecl": {"dense_weight": 1.5}})
    with pytest.raises(EmfmError, match="densecl.radius must be > 0"):
        PretrainModule(cnn, {"densecl": {"radius": 0}})
    with pytest.raises(EmfmError, match="restore.head.name=linear has no decoder"):
        PretrainModule(cnn, {"restore": {"head": {"name": "linear"}}})
    with pytest.raises(EmfmError, match=r"restore.mask_patch \[5, 5\] must have 2 entries dividing"):
        PretrainModule(cnn, {"restore": {"mask_patch": 5}})
    with pytest.raises(EmfmError, match="restore: mask_ratio 0 needs noise_std above 0"):
        PretrainModule(cnn, {"restore": {"mask_ratio": 0}})


def test_restoration_hides_whole_cells_and_weighs_what_it_hides() -> None:
    corruption = Corruption((8, 32, 32), mask_ratio=0.25, mask_patch=(2, 8, 8), visible_weight=0.1)
    images = torch.rand(3, 1, 8, 32, 32)
    corrupted, weight = corruption(images, torch.Generator().manual_seed(0))
    hidden = weight == 1
    assert hidden.float().mean() == 0.25 and torch.all(weight[~hidden] == 0.1)
    cells = hidden.view(3, 1, 4, 2, 4, 8, 4, 8)  # each (2, 8, 8) cell hidden or visible as a whole
    assert torch.all(cells == cells[:, :, :, :1, :, :1, :, :1])
    assert torch.equal(corrupted[~hidden], images[~hidden])  # no noise asked for: visible voxels kept
    assert not torch.allclose(corrupted[hidden], images[hidden])
    noisy, weight = Corruption((32, 32), mask_ratio=0, noise_std=(0.5, 0.5), visible_weight=1)(
        images[:, :, 0], torch.Generator().manual_seed(0))
    assert torch.all(weight == 1) and (noisy - images[:, :, 0]).std() == pytest.approx(0.5, rel=0.05)


def test_restoration_trains_encoder_and_decoder_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    module = PretrainModule(tiny_encoder("cnn2d"),
                            {"restore": {"head": {"name": "unet", "channels": 8}, "noise_std": [0.1, 0.1],
                                         "visible_weight": 0.5}})
    images = torch.randn(4, 1, 64, 64).cumsum(-1).cumsum(-2) / 64  # smooth: hidden cells can be guessed
    losses = fixed_batch_losses(module, images, steps=20, lr=3e-3)
    assert losses[-1] < 0.3 * losses[0]
    panels = module.visualize(images)
    assert list(panels) == ["input", "corrupted", "restored"] and panels["restored"].shape == images.shape


def test_3d_encoder_on_2d_patches_is_refused(compose_config, synth_zarr: Path) -> None:
    cfg = compose_config("pretrain", [*tiny("vit3d", "mae"), f"data.volumes=[{synth_zarr}]",
                                      "data.patch_shape=[32,32]"])
    with pytest.raises(EmfmError, match="vit3d"):
        run.prepare(cfg, cfg.objective)


def test_tube_masking_hides_the_same_tokens_in_every_plane() -> None:
    keep, mask = tube_masking(3, (4, 2, 3), 0.5, generator=torch.Generator().manual_seed(0))
    planes = mask.view(3, 4, 6)
    assert (planes == planes[:, :1]).all() and (planes.sum(-1) == 3).all()
    assert keep.shape == (3, 12) and not mask.gather(1, keep).any()


def test_mim_hides_the_requested_cells_and_predicts_every_cell() -> None:
    encoder = create_encoder("cnn3d", name="test_resnet3d", input_shape=[8, 64, 64])
    mim = MIM(encoder, mask_ratio=0.5, decoder_dim=8)
    images = torch.rand(2, 1, 8, 64, 64)
    pred, mask = mim.predict(encoder, images, torch.Generator().manual_seed(0))
    assert pred.shape == (2, mask.shape[1], mim.mask_patch[0] * mim.mask_patch[1] * mim.mask_patch[2])
    assert mask.float().mean() == 0.5
    _, pixels = mim.mask(images, torch.Generator().manual_seed(0))
    assert pixels.shape == (2, 1, 8, 64, 64) and pixels.mean() == 0.5


def test_info_nce_matches_a_hand_computed_case() -> None:
    q, k = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    loss, negatives = info_nce(q, k, temperature=1.0)
    # query 0: logits [1, 1], positive 0 -> log 2; query 1: logits [0, 0] -> log 2
    torch.testing.assert_close(loss, 2 * torch.log(torch.tensor(2.0)))
    assert negatives == 1


def test_nt_xent_is_zero_for_perfect_separated_pairs_and_counts_negatives() -> None:
    z = torch.eye(4)[:2] * 10
    loss, negatives = nt_xent(z, z, temperature=0.01)
    assert loss < 1e-3 and negatives == 2
    loss_mixed, _ = nt_xent(z, z.flip(0), temperature=0.5)
    assert loss_mixed > loss


def test_momentum_encoder_follows_the_online_encoder_slowly() -> None:
    encoder = create_encoder("cnn2d", name="test_resnet", input_shape=[64, 64])
    moco = MoCoV3(encoder, proj_dim=8, hidden_dim=16, momentum=0.9)
    param = next(encoder.parameters())
    start = next(moco.momentum_encoder.parameters()).clone()
    with torch.no_grad():
        param.add_(1.0)
    moco.before_step(encoder, progress=0.0)
    torch.testing.assert_close(next(moco.momentum_encoder.parameters()), start + 0.1)
    moco.before_step(encoder, progress=1.0)  # momentum 1 at the end: frozen
    torch.testing.assert_close(next(moco.momentum_encoder.parameters()), start + 0.1)


def test_dense_views_know_where_each_pixel_comes_from() -> None:
    """Flips and 90-degree turns permute pixels exactly, so each view equals the input at ``where``;
    without crops every cell has a match, and its negatives are every other cell of the batch."""
    encoder = create_encoder(**tiny_encoder("vit2d"))
    densecl = DenseCL(encoder, proj_dim=8, hidden_dim=16, augment={"flip": 0.5, "rot90": 0.5})
    images = torch.rand(3, 1, 32, 32)
    views, where = densecl.located_views(images, torch.Generator().manual_seed(0))
    assert views.shape == (6, 1, 32, 32) and where.shape == (6, 2, 32, 32)
    assert not torch.equal(views[:3], views[3:])
    torch.testing.assert_close(views[:, 0], torch.cat([images, images])[:, 0][
        torch.arange(6)[:, None, None], where[:, 0], where[:, 1]], rtol=0, atol=0)
    out = densecl(encoder, images, torch.Generator().manual_seed(0))
    assert out["matched"] == 1 and out["negatives"] == 3 * 16 - 1


def test_cells_match_the_nearest_cell_of_the_other_view_within_the_radius() -> None:
    first = torch.tensor([[[0.5, 0.5], [0.5, 1.5], [1.5, 0.5], [3.5, 3.5]]])  # (N, L, d), in cells
    second = torch.tensor([[[1.4, 0.6], [0.5, 1.2], [0.6, 0.5], [2.0, 2.0]]])
    index, valid = match_cells(first, second, radius=1.0)
    assert index.tolist() == [[2, 1, 0, 3]] and valid.tolist() == [[True, True, True, False]]


def test_densecl_loss_falls_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    augment = {"flip": 0.5, "rot90": 0.5, "crop": {"scale": [0.3, 1.0]}, "intensity": {"p": 0.8}}
    module = PretrainModule(tiny_encoder("vit2d"), {"densecl": {"proj_dim": 16, "hidden_dim": 32, "augment": augment}})
    images = torch.randn(4, 1, 32, 32).cumsum(-1) / 8
    optimizer = torch.optim.AdamW(module.parameters(), lr=2e-3)
    first = None
    for _ in range(20):
        out = module.compute_loss(images, torch.Generator().manual_seed(0))  # the same views every step
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        first = first or {k: v.item() for k, v in out.items()}
    assert 0 < out["densecl/matched"] < 1  # crops leave some cells without a counterpart
    assert out["densecl/dense"] < 0.7 * first["densecl/dense"] and out["loss"] < 0.5 * first["loss"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _on_two_ranks(rank: int, port: int, cases: dict[str, tuple[Callable, list[torch.Tensor]]], out: dict) -> None:
    """Rank ``rank`` of a gloo group: for each case, its loss on this rank's half of every input,
    then backward; out[case, rank] = (loss, negatives, gradients of the float inputs)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for name, (loss, inputs) in cases.items():
        mine = [x.chunk(2)[rank].clone().requires_grad_(x.is_floating_point()) for x in inputs]
        value, negatives = loss(*mine)
        value.backward()
        out[name, rank] = (value.detach(), negatives, [x.grad for x in mine if x.is_floating_point()])
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks() -> dict[str, tuple[list[torch.Tensor], list[tuple]]]:
    """Each loss on two gloo processes holding half of every input (rows in order): per case, the
    inputs and both ranks' results. One spawn for all cases: starting the processes is most of the time."""
    torch.manual_seed(0)
    cases = {
        "nt_xent": (partial(nt_xent, temperature=0.5), [torch.randn(4, 8), torch.randn(4, 8)]),
        "dense": (partial(dense_info_nce, temperature=0.5), [
            torch.randn(8, 6), torch.randn(8, 6),
            torch.tensor([2, 0, 3, 3, 1, 1, 0, 2]),  # each rank's rows index its own 4 keys
            torch.tensor([True, True, True, False, False, True, False, False]),  # valid: 3 on rank 0, 1 on rank 1
        ]),
    }
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_on_two_ranks, args=(_free_port(), cases, out), nprocs=2)
        results = dict(out)
    return {name: (inputs, [results[name, rank] for rank in range(2)]) for name, (_, inputs) in cases.items()}


def test_gathered_loss_sees_the_negatives_of_both_ranks(two_ranks) -> None:
    """Two gloo processes with half a batch each give the full batch's loss and gradients."""
    (z1, z2), ranks = two_ranks["nt_xent"]
    full_a, full_b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    # The full batch's loss is the mean over ranks' losses (equal shares of the 2N anchors).
    full = F.cross_entropy(*_nt_xent_logits(full_a, full_b, 0.5))
    full.backward()
    assert ranks[0][1] == ranks[1][1] == 2 * 4 - 2  # negatives from both ranks
    torch.testing.assert_close((ranks[0][0] + ranks[1][0]) / 2, full.detach())
    # Each rank's gradient sums what both ranks' losses say about its rows (the loss is a mean
    # over 2N local anchors, so the full-batch gradient is half of it).
    grads = torch.cat([ranks[0][2][0], ranks[1][2][0]])
    torch.testing.assert_close(grads / 2, full_a.grad)


def test_gathered_dense_loss_is_the_full_batch_loss_however_valid_cells_are_spread(two_ranks) -> None:
    """Three valid queries on rank 0, one on rank 1: still the full batch's mean, and its gradients."""
    (query, key, positive, valid), ranks = two_ranks["dense"]
    full_q, full_k = query.clone().requires_grad_(), key.clone().requires_grad_()
    in_full_batch = positive + torch.tensor([0] * 4 + [4] * 4)
    full, negatives = dense_info_nce(full_q, full_k, in_full_batch, valid, temperature=0.5)
    full.backward()
    logits = F.normalize(query, dim=1) @ F.normalize(key, dim=1).T / 0.5
    torch.testing.assert_close(full.detach(), F.cross_entropy(logits[valid], in_full_batch[valid]))
    assert ranks[0][1] == ranks[1][1] == negatives == 7  # every other cell of both ranks
    torch.testing.assert_close((ranks[0][0] + ranks[1][0]) / 2, full.detach())
    for i, full_grad in enumerate([full_q.grad, full_k.grad]):
        torch.testing.assert_close(torch.cat([ranks[0][2][i], ranks[1][2][i]]) / 2, full_grad)


def _nt_xent_logits(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference NT-Xent on one process: 2N anchors in rank-block order (rank 0 views, rank 1 views)."""
    blocks = [torch.cat([z1[0:2], z2[0:2]]), torch.cat([z1[2:4], z2[2:4]])]
    everyone = F.normalize(torch.cat(blocks), dim=1)
    logits = everyone @ everyone.T / temperature
    logits.fill_diagonal_(float("-inf"))
    n = 2
    rows = torch.arange(4)
    positives = torch.cat([(rows + n) % (2 * n), (rows + n) % (2 * n) + 4])
    return logits, positives
