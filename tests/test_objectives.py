"""Every encoder family with every objective that fits it, through the real configs and Trainer."""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from emfm import run
from emfm.errors import EmfmError
from emfm.models.encoders import create_encoder
from emfm.pretrain.base import PretrainModule
from emfm.pretrain.contrastive import info_nce, nt_xent
from emfm.pretrain.masking import tube_masking
from emfm.pretrain.mim import MIM
from emfm.pretrain.mocov3 import MoCoV3
from tests.conftest import tiny

MASKED = {"vit2d": "mae", "vit3d": "mae", "cnn2d": "mim", "cnn3d": "mim"}
COMBINATIONS = [(model, objective) for model in MASKED for objective in (MASKED[model], "mocov3", "simclr", "hybrid")]
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
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    changed = [k for k, v in module.encoder.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    weights = [k for k, v in before.items() if v.is_floating_point() and k.endswith("weight")]
    assert set(weights) <= set(changed), f"not trained: {sorted(set(weights) - set(changed))[:5]}"


def test_hybrid_sums_weighted_losses_and_picks_the_masked_method() -> None:
    vit = {"family": "vit2d", "name": "test_vit", "input_shape": [32, 32], "patch_size": 8}
    module = PretrainModule(vit, {"masked": {"weight": 2.0, "decoder_dim": 32},
                                  "simclr": {"weight": 0.5, "proj_dim": 8, "hidden_dim": 16}})
    assert list(module.methods) == ["mae", "simclr"]
    out = module.compute_loss(torch.rand(4, 1, 32, 32), torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["loss"], 2.0 * out["mae/loss"] + 0.5 * out["simclr/loss"])
    cnn = {"family": "cnn2d", "name": "test_resnet", "input_shape": [64, 64]}
    assert list(PretrainModule(cnn, {"masked": {}}).methods) == ["mim"]


def test_objectives_that_do_not_fit_are_refused() -> None:
    cnn = {"family": "cnn2d", "name": "test_resnet", "input_shape": [64, 64]}
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_losses(rank: int, port: int, z1: torch.Tensor, z2: torch.Tensor, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mine = slice(2 * rank, 2 * rank + 2)
    a, b = z1[mine].clone().requires_grad_(), z2[mine].clone().requires_grad_()
    loss, negatives = nt_xent(a, b, temperature=0.5)
    loss.backward()
    out[rank] = (loss.detach(), negatives, a.grad, b.grad)
    dist.destroy_process_group()


def test_gathered_loss_sees_the_negatives_of_both_ranks() -> None:
    """Two gloo processes with half a batch each give the full batch's loss and gradients."""
    torch.manual_seed(0)
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_two_rank_losses, args=(_free_port(), z1, z2, out), nprocs=2)
        results = dict(out)
    full_a, full_b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    # The full batch's loss is the mean over ranks' losses (equal shares of the 2N anchors).
    full = F.cross_entropy(*_nt_xent_logits(full_a, full_b, 0.5))
    full.backward()
    assert results[0][1] == results[1][1] == 2 * 4 - 2  # negatives from both ranks
    torch.testing.assert_close((results[0][0] + results[1][0]) / 2, full.detach())
    # Each rank's gradient sums what both ranks' losses say about its rows (the loss is a mean
    # over 2N local anchors, so the full-batch gradient is half of it).
    grads = torch.cat([results[0][2], results[1][2]])
    torch.testing.assert_close(grads / 2, full_a.grad)


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
