"""SegmentationLoss: values by hand, ignored pixels inert (zero gradient), class weights, topology terms, and it
trains."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from emfm.data.targets import make_target
from emfm.errors import EmfmError
from emfm.finetune.losses import SegmentationLoss, soft_skeleton, tubed_skeleton

TOPOLOGY = {"skeleton_recall_weight": 1.0, "cldice_weight": 1.0}


def test_perfect_softmax_prediction_has_no_loss() -> None:
    target = torch.tensor([[[0, 1, 2], [2, 1, -1]]])
    logits = 30 * F.one_hot(target.clamp_min(0), 3).movedim(-1, 1).float()
    out = SegmentationLoss("softmax")(logits, target)
    assert set(out) == {"loss", "dice", "ce"}
    assert out["dice"].item() == pytest.approx(0, abs=1e-6)
    assert out["ce"].item() == pytest.approx(0, abs=1e-6)


def test_sigmoid_values_by_hand() -> None:
    # p = 0.5 everywhere: BCE = ln 2; Dice = 2 * 0.5 / (1 + 1) = 0.5 on the one positive pixel.
    target = torch.tensor([[[1.0, 0.0, -1.0]]])
    out = SegmentationLoss("sigmoid", dice_weight=2.0)(torch.zeros(1, 1, 3), target)
    assert out["ce"].item() == pytest.approx(math.log(2))
    assert out["dice"].item() == pytest.approx(0.5, abs=1e-4)
    assert out["loss"].item() == pytest.approx(1.0 + math.log(2), abs=1e-4)


def test_class_weights_and_ignore_match_cross_entropy() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 4, 4), torch.randint(-1, 3, (2, 4, 4))
    weights = [0.2, 1.0, 3.0]
    out = SegmentationLoss("softmax", class_weights=weights)(logits, target)
    expect = F.cross_entropy(logits, target, weight=torch.tensor(weights), ignore_index=-1)
    assert out["ce"].item() == pytest.approx(expect.item(), rel=1e-5)
    assert out["ce"].item() != pytest.approx(SegmentationLoss("softmax")(logits, target)["ce"].item(), rel=1e-3)


def test_sigmoid_weights_match_binary_cross_entropy() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(2, 2, 5), torch.randint(0, 2, (2, 2, 5)).float()
    pos, cls = torch.tensor([3.0, 0.5]), torch.tensor([1.0, 2.0])
    out = SegmentationLoss("sigmoid", class_weights=cls.tolist(), pos_weight=pos.tolist())(logits, target)
    each = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos[:, None], reduction="none")
    expect = (each * cls[:, None]).sum() / (cls[:, None] * torch.ones_like(target)).sum()
    assert out["ce"].item() == pytest.approx(expect.item(), rel=1e-5)


@pytest.mark.parametrize("options", [{}, TOPOLOGY], ids=["dice_ce", "topology"])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_ignored_pixels_get_exactly_zero_gradient(kind: str, options: dict) -> None:
    torch.manual_seed(0)
    if kind == "softmax":
        logits, target = torch.randn(2, 3, 6, 6), torch.randint(0, 3, (2, 6, 6))
        ignored = torch.rand(2, 6, 6) < 0.3
        target[ignored], ignored = -1, ignored[:, None].expand(-1, 3, -1, -1)
    else:
        logits, target = torch.randn(2, 3, 6, 6), torch.randint(0, 2, (2, 3, 6, 6)).float()
        ignored = torch.rand(2, 3, 6, 6) < 0.3
        target[ignored] = -1
    loss = SegmentationLoss(kind, class_weights=[1.0, 2.0, 0.5], **options)
    logits.requires_grad_(True)
    first = loss(logits, target)["loss"]
    first.backward()
    assert (logits.grad[ignored] == 0).all() and (logits.grad[~ignored] != 0).any()
    changed = torch.where(ignored, torch.randn_like(logits) * 10, logits.detach())
    assert loss(changed, target)["loss"].item() == pytest.approx(first.item(), rel=1e-6)


def test_mask_argument_skips_pixels_and_nothing_known_is_finite() -> None:
    logits, target = torch.randn(1, 2, 4), torch.ones(1, 2, 4)
    mask = torch.tensor([True, True, False, False])
    masked = SegmentationLoss("sigmoid")(logits, target, mask)
    inside = SegmentationLoss("sigmoid")(logits[..., :2], target[..., :2])
    assert masked["ce"].item() == pytest.approx(inside["ce"].item())
    none = SegmentationLoss("softmax")(torch.randn(1, 2, 3, 3), torch.full((1, 3, 3), -1))
    assert torch.isfinite(none["loss"]) and none["ce"].item() == 0


def line(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A 1-pixel line 24 pixels long (a membrane's skeleton) in a 16x32 image: its target, and logits that find its
    left half only."""
    mask = torch.zeros(1, 16, 32, dtype=torch.bool)
    mask[0, 8, 4:28] = True
    found = mask.clone()
    found[0, 8, 16:] = False
    if kind == "softmax":
        logits = torch.where(found, 30.0, -30.0)
        return torch.stack([-logits, logits], 1), mask.long()
    return torch.where(found, 30.0, -30.0)[:, None], mask.float()[:, None]


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_topology_terms_by_hand(kind: str) -> None:
    """Half of a line found: skeleton recall 1/2; clDice's precision 1, sensitivity 1/2: 1 - 2/3. All found: 0."""
    logits, target = line(kind)
    loss = SegmentationLoss(kind, dice_weight=0.0, ce_weight=0.0, skeleton_recall_weight=2.0, cldice_weight=1.0)
    out = loss(logits, target)
    assert set(out) == {"loss", "dice", "ce", "skeleton_recall", "cldice"}
    assert out["skeleton_recall"].item() == pytest.approx(0.5, abs=1e-4)
    assert out["cldice"].item() == pytest.approx(1 / 3, abs=1e-4)
    assert out["loss"].item() == pytest.approx(2 * 0.5 + 1 / 3, abs=1e-4)
    perfect = 60 * F.one_hot(target, 2).movedim(-1, 1).float() - 30 if kind == "softmax" else 60 * target - 30
    out = loss(perfect, target)
    assert out["skeleton_recall"].item() == pytest.approx(0, abs=1e-6)
    assert out["cldice"].item() == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_the_missed_half_of_a_line_does_not_count_where_it_is_unknown(kind: str) -> None:
    logits, target = line(kind)
    target[..., 16:] = -1
    out = SegmentationLoss(kind, **TOPOLOGY)(logits, target)
    assert out["skeleton_recall"].item() == pytest.approx(0, abs=1e-4)
    assert out["cldice"].item() == pytest.approx(0, abs=1e-4)


@pytest.mark.parametrize("term", ["skeleton_recall", "cldice"])
def test_a_topology_term_alone_pulls_the_missed_half_of_a_line_up(term: str) -> None:
    logits, target = line("sigmoid")
    logits = torch.where(target > 0, 0.0, -4.0).requires_grad_(True)    # unsure on the line, sure off it
    SegmentationLoss("sigmoid", dice_weight=0.0, ce_weight=0.0, **{f"{term}_weight": 1.0})(logits, target)[
        "loss"].backward()
    assert (logits.grad[target > 0] < 0).all()          # gradient descent raises every pixel of the line


def test_skeletons_are_taken_per_section_plane() -> None:
    """A 3-D target's skeletons are those of its (Y, X) planes: an erosion across thick sections would remove them."""
    torch.manual_seed(0)
    target = (torch.rand(2, 1, 3, 24, 24) < 0.5).float()
    probs = torch.rand(2, 1, 3, 24, 24)
    for z in range(3):
        assert torch.equal(tubed_skeleton(target)[:, :, z], tubed_skeleton(target[:, :, z]))
        assert torch.equal(soft_skeleton(probs, 3)[:, :, z], soft_skeleton(probs[:, :, z], 3))
    wide = torch.zeros(1, 1, 16, 32)
    wide[..., 5:11, :] = 1                               # a 6-pixel-wide membrane
    tube = tubed_skeleton(wide)[0, 0, :, 16]
    assert tube.tolist() == [0] * 6 + [1] * 3 + [0] * 7   # its midline, widened by a pixel, inside it


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny convolutions gain nothing from threads, and lose seconds to them when the CPUs are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("terms", [{}, TOPOLOGY], ids=["dice_ce", "topology"])
@pytest.mark.parametrize("kind", ["semantic", "boundary"])
def test_fitting_a_small_conv_lowers_the_loss(kind: str, terms: dict) -> None:
    torch.manual_seed(0)
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    labels[:, 2:8, 2:14], labels[:, 9:15, 3:12] = 1, 2
    options = {"classes": {1: 1, 2: 2}} if kind == "semantic" else {}
    target = make_target(kind, **options)
    image = (labels > 0).float()[:, None] + 0.1 * torch.randn(2, 1, 16, 16)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, target.channels, 3, padding=1))
    loss, parts = SegmentationLoss(target.loss, **terms), []
    for _ in range(40):  # plain gradient descent: torch.optim's first use costs seconds of imports
        out = loss(net(image), target(labels))
        net.zero_grad()
        out["loss"].backward()
        with torch.no_grad():
            for param in net.parameters():
                param -= 0.5 * param.grad
        parts.append({k: v.item() for k, v in out.items()})
    assert parts[-1]["loss"] < 0.6 * parts[0]["loss"]
    assert all(parts[-1][k] < parts[0][k] for k in ("skeleton_recall", "cldice") if k in parts[0]), parts[-1]


def test_errors() -> None:
    with pytest.raises(EmfmError, match="kind"):
        SegmentationLoss("focal")
    with pytest.raises(EmfmError, match="dice_weight"):
        SegmentationLoss("softmax", dice_weight=-1)
    with pytest.raises(EmfmError, match=r"^loss skeleton_recall_weight: expected a number >= 0, got -1$"):
        SegmentationLoss("sigmoid", skeleton_recall_weight=-1)
    with pytest.raises(EmfmError, match=r"^loss cldice_iterations: expected an int >= 1, got 0$"):
        SegmentationLoss("sigmoid", cldice_weight=1.0, cldice_iterations=0)
    with pytest.raises(EmfmError, match="pos_weight"):
        SegmentationLoss("softmax", pos_weight=[1.0])
    with pytest.raises(EmfmError, match="class_weights"):
        SegmentationLoss("softmax", class_weights=[1.0, "x"])
    with pytest.raises(EmfmError, match="class_weights: 2 values for 3"):
        SegmentationLoss("softmax", class_weights=[1.0, 2.0])(torch.zeros(1, 3, 2, 2),
                                                               torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(EmfmError, match="int target"):
        SegmentationLoss("softmax")(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2))
    with pytest.raises(EmfmError, match="shape"):
        SegmentationLoss("sigmoid")(torch.zeros(1, 3, 2, 2), torch.zeros(1, 1, 2, 2))
