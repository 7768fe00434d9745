"""Two choices in emfm's inference path, each against what it replaced, paired in one process.

- Normalisation: ``emfm.models.layers.InstanceNorm`` (group norm, a group per channel) against torch's
  ``F.instance_norm`` on the maps a ViT-Ti/16 UNETR decoder normalises (batch 8, 128x128 tiles): ms per call, and the
  whole model's forward pass with each (the model built from emfm's fine-tuning config, seeded random weights).
- Grad mode: a forward pass of the same model under ``torch.inference_mode`` (what ``sliding_window`` uses) against
  ``torch.no_grad``.
- Precision: a forward pass under bfloat16 autocast (``precision=bf16``, what ``auto`` means on a CPU with AMX)
  against float32, for the UNETR and the restore_unet recipe's two U-Nets (ResNet-18 and the full-resolution
  ``unet2d``), and the largest difference of their probabilities (sigmoid of the first channel).

Arms alternate within each round; the table gives the median over rounds and the ratio of medians.

    python -m benchmarks.inference_ops                 # docs/benchmarks.md, "Issue 29, second pass" and "bf16 on ..."
    python -m benchmarks.inference_ops --rounds 1 --calls 1
"""

from __future__ import annotations

import copy
import functools
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.harness import command_line
from benchmarks.workloads import MODEL, seeded_segmenter
from emfm.inference import in_precision
from emfm.models.layers import InstanceNorm


def timed(fn: Callable[[], object], calls: int) -> float:
    """Seconds per call of ``fn``."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def paired(arms: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, float]:
    """Median seconds per call of each arm, the arms alternating within each round (after one warm-up call)."""
    times: dict[str, list[float]] = {name: [] for name in arms}
    for fn in arms.values():
        fn()
    for _ in range(rounds):
        for name, fn in arms.items():
            times[name].append(timed(fn, calls))
    return {name: statistics.median(t) for name, t in times.items()}


def under(mode: Callable[[], object], fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run under a grad mode (``torch.inference_mode``, ``torch.no_grad``)."""
    def run() -> object:
        with mode():  # type: ignore[attr-defined]
            return fn()
    return run


def with_torch_instance_norm(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with each of emfm's instance norms replaced by torch's, weights kept."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, InstanceNorm):
                torchs = torch.nn.InstanceNorm2d(child.num_channels, affine=True)
                torchs.load_state_dict(child.state_dict())
                setattr(module, name, torchs)
    return model


NETWORKS = {"ViT-Ti/16 UNETR": MODEL, "ResNet-18 U-Net (restore_unet)": ["experiment=restore_unet/finetune"],
            "unet2d (restore_unet, model=unet2d)": ["experiment=restore_unet/finetune", "model=unet2d", "~model.name"]}


def main() -> None:
    parser = command_line("inference_ops", __doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=4, help="calls per arm and round")
    args = parser.parse_args()
    model = seeded_segmenter(MODEL).model
    tiles = torch.randn(8, 1, 128, 128)

    shapes: dict[tuple[int, ...], int] = {}
    hooks = [m.register_forward_hook(lambda _, a, __: shapes.update({tuple(a[0].shape): 1 + shapes.get(
        tuple(a[0].shape), 0)})) for m in model.modules() if isinstance(m, InstanceNorm)]
    with torch.inference_mode():
        model(tiles)
    for hook in hooks:
        hook.remove()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds x {args.calls} calls\n")
    print("| what | arms | ms per call | ratio (the replaced one's time / emfm's) |\n|---|---|---|---|")
    for shape, count in shapes.items():
        x, w, b = torch.randn(shape), torch.randn(shape[1]), torch.randn(shape[1])
        t = paired({"emfm": under(torch.inference_mode, functools.partial(F.group_norm, x, shape[1], w, b)),
                    "torch": under(torch.inference_mode, functools.partial(F.instance_norm, x, weight=w, bias=b))},
                   args.rounds, args.calls * 5)
        print(f"| norm {list(shape)} (x{count} a pass) | emfm / torch's | {t['emfm'] * 1e3:.3f} / "
              f"{t['torch'] * 1e3:.3f} | {t['torch'] / t['emfm']:.2f} |")
    torchs = with_torch_instance_norm(model)
    t = paired({"emfm": under(torch.inference_mode, lambda: model(tiles)),
                "torch": under(torch.inference_mode, lambda: torchs(tiles))}, args.rounds, args.calls)
    print(f"| UNETR forward, batch 8 | instance norm: emfm / torch's | {t['emfm'] * 1e3:.1f} / "
          f"{t['torch'] * 1e3:.1f} | {t['torch'] / t['emfm']:.3f} |")
    t = paired({"emfm": under(torch.inference_mode, lambda: model(tiles)),
                "torch": under(torch.no_grad, lambda: model(tiles))}, args.rounds, args.calls)
    print(f"| UNETR forward, batch 8 | inference_mode / no_grad | {t['emfm'] * 1e3:.1f} / {t['torch'] * 1e3:.1f} | "
          f"{t['torch'] / t['emfm']:.3f} |")
    for name, overrides in NETWORKS.items():
        net = seeded_segmenter(overrides).model
        half = in_precision(net, "bf16")
        t = paired({"emfm": under(torch.inference_mode, functools.partial(half, tiles)),
                    "torch": under(torch.inference_mode, functools.partial(net, tiles))}, args.rounds, args.calls)
        with torch.inference_mode():
            apart = (half(tiles)[:, 0].float().sigmoid() - net(tiles)[:, 0].sigmoid()).abs().max()
        print(f"| {name} forward, batch 8 | bf16 autocast / float32 (probabilities apart by {float(apart):.3f} at "
              f"most) | {t['emfm'] * 1e3:.1f} / {t['torch'] * 1e3:.1f} | {t['torch'] / t['emfm']:.3f} |")


if __name__ == "__main__":
    main()

