"""The tools a user would train instead of emfm, as arms of ``emfm compare``.

A peer arm trains another tool's supervised network with that tool's own trainer and defaults, on
the labelled slices, patch shape, batch size, steps and seed of the recipe's fine-tuning as
composed for the ``scratch`` arm; :class:`PeerSegmenter` then puts the network behind what
``emfm evaluate``'s ``evaluate_slices`` asks of a model, so it is scored by the same code as every
emfm arm. The tools are optional (``pip install 'emfm[peers]'``) and imported only in here.

``torch-em``: ``torch_em.model.UNet2d(in_channels=1, out_channels=1, final_activation="Sigmoid")``
(its default width and depth) trained by ``torch_em.default_segmentation_trainer`` (its Dice loss
and metric, AdamW at its default learning rate, ReduceLROnPlateau) on ``default_segmentation_loader``
patches (its standardisation per patch and its 2-D flips). It compiles the network when the emfm
arms compile theirs (``trainer.compile``, off by default; torch-em's own default compiles: that changes
the speed, not what is learned, and costs 1.5-2 min per process on a CPU). The target is emfm's own of
the composed ``target`` (``membrane`` / ``foreground``: label > 0), not torch-em's label transforms, so
that the comparison is of the trainer and the network. torch-em's trainer needs a validation loader: one batch
of patches of the labelled slices after every tenth of the steps (no held-out labels, as torch-em's CLI
splits the training data when given no other). The scored weights are the end of training
(``latest.pt``), as emfm's arms score their ``last.ckpt``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from emfm.data.labeled import LabeledVolume, parse_slices
from emfm.data.targets import IGNORE, Target, make_target
from emfm.errors import EmfmError
from emfm.inference import sliding_window

PEERS = ("torch-em",)
VALIDATIONS = 10             # torch-em validates (and steps its scheduler) once per epoch: this many epochs
UNET = {"in_channels": 1, "out_channels": 1, "final_activation": "Sigmoid"}   # besides UNet2d's own defaults


def training_target(target: Any) -> Target:
    """emfm's target of a ``target`` config, as fine-tuning makes it (``IGNORE`` marks unlabelled pixels)."""
    return make_target(**{**dict(target), "ignore_label": IGNORE})


@dataclass(frozen=True)
class TorchEmRun:
    """One torch-em training, read from the composed fine-tuning config of the ``scratch`` arm (primitives
    only: it is sent to a spawned process when runs train side by side)."""

    raw: str
    labels: str
    ignore_label: int | None
    slices: tuple[int, ...]
    target: dict[str, Any]
    patch_shape: tuple[int, ...]
    batch_size: int
    iterations: int
    seed: int
    overlap: float
    compile: bool
    out: Path

    @classmethod
    def from_config(cls, cfg: DictConfig, out: Path) -> TorchEmRun:
        data = cfg.data
        volume = LabeledVolume(data.raw, data.labels, data.ignore_label)
        run = cls(raw=str(data.raw), labels=str(data.labels), ignore_label=data.ignore_label,
                  slices=tuple(parse_slices(data.labeled_slices, volume.depth, "data.labeled_slices")),
                  target=OmegaConf.to_container(cfg.target, resolve=True),   # type: ignore[arg-type]
                  patch_shape=tuple(int(p) for p in data.patch_shape), batch_size=int(data.batch_size),
                  iterations=int(cfg.trainer.max_steps), seed=int(cfg.seed), overlap=float(cfg.module.overlap),
                  compile=bool(cfg.trainer.compile), out=out)
        if len(run.patch_shape) != 2:
            raise EmfmError(f"--arms torch-em trains torch-em's 2-D U-Net: data.patch_shape {list(run.patch_shape)} "
                            "is not 2-D")
        target = training_target(run.target)
        if target.channels != 1 or target.loss != "sigmoid":
            raise EmfmError(f"--arms torch-em trains one sigmoid channel: target {run.target['kind']} has "
                            f"{target.channels} ({target.loss}); use --target membrane or foreground")
        return run

    @property
    def checkpoint(self) -> Path:
        return self.out / "checkpoints" / "torch_em" / "latest.pt"

    @property
    def epoch(self) -> int:
        """Iterations per torch-em epoch."""
        return max(1, self.iterations // VALIDATIONS)

    def training_data(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The labelled slices, normalised (Y, X), and emfm's target of each, 0 / 1 float32 (Y, X)."""
        data = LabeledVolume(self.raw, self.labels, self.ignore_label)
        whole = [slice(0, s) for s in data.raw.shape[-2:]]
        target = training_target(self.target)
        images, targets = [], []
        for z in self.slices:
            image, labels = data.read(slice(z, z + 1), whole, self.slices)
            made = target(labels)[0, 0].numpy()         # (Y, X)
            if (made == IGNORE).any():
                raise EmfmError(f"{self.labels}: slice {z} has unlabelled pixels (data.ignore_label="
                                f"{self.ignore_label}); torch-em's Dice loss has no mask: use fully labelled slices")
            images.append(image[0])
            targets.append(made.astype(np.float32))
        return images, targets


def torch_em_unet() -> torch.nn.Module:
    from torch_em.model import UNet2d

    return UNet2d(**UNET)


def train_torch_em(run: TorchEmRun) -> None:
    """Train torch-em's 2-D U-Net with its own loader and trainer. A finished run (``latest.pt`` at
    ``run.iterations``) is left as it is; an unfinished one trains anew."""
    import torch_em

    images, targets = run.training_data()
    pl.seed_everything(run.seed, verbose=False)   # numpy: torch-em's patch positions; torch: weights, flips

    def loader(batches: int) -> torch.utils.data.DataLoader:
        return torch_em.default_segmentation_loader(
            images, None, targets, None, batch_size=run.batch_size, patch_shape=run.patch_shape,
            n_samples=batches * run.batch_size, pin_memory=torch.cuda.is_available())   # pinned only for a GPU

    trainer = torch_em.default_segmentation_trainer("torch_em", torch_em_unet(), loader(run.epoch), loader(1),
                                                    save_root=str(run.out), compile_model=run.compile)
    trainer.fit(iterations=run.iterations, overwrite_training=False)


def torch_em_settings(run: TorchEmRun) -> dict[str, Any]:
    """What the torch-em arm ran, its defaults read from the installed torch-em, for the report."""
    import torch_em
    from torch_em.model import UNet2d

    trainer = inspect.signature(torch_em.default_segmentation_trainer).parameters
    unet = inspect.signature(UNet2d).parameters
    return {
        "version": torch_em.__version__,
        "model": {"class": "torch_em.model.UNet2d", **UNET,
                  **{k: unet[k].default for k in ("initial_features", "depth", "gain")}},
        "trainer": "torch_em.default_segmentation_trainer (DiceLoss loss and metric, AdamW with torch's defaults)",
        "learning_rate": trainer["learning_rate"].default,
        "compile_model": run.compile,       # as the emfm arms' trainer.compile (torch-em's default None compiles)
        "scheduler": {"ReduceLROnPlateau": trainer["scheduler_kwargs"].default, "steps": "once per epoch"},
        "patch_shape": list(run.patch_shape), "batch_size": run.batch_size, "iterations": run.iterations,
        "iterations_per_epoch": run.epoch,
        "validation": "one batch of patches of the labelled slices per epoch",
        "data": "default_segmentation_loader: standardize per patch, 2-D flips",
        "target": f"emfm's target {run.target['kind']} (label > 0)",
        "scored": "latest.pt (the end of training)",
        "prediction": f"emfm's sliding window, tiles {list(run.patch_shape)}, overlap {run.overlap}, "
                      "each tile standardized as torch-em's patches",
    }


class PeerSegmenter:
    """A peer's network behind what ``evaluate_slices`` asks of a model (``emfm.evaluation.evaluate.Segments``).

    Args:
        net: tiles (N, 1, Y, X) of the normalised image -> probabilities (N, K, Y, X).
        target: the ``target`` config it was trained for.
        input_shape: the sliding window's tile.
        overlap: the sliding window's tile overlap.
    """

    def __init__(self, net: torch.nn.Module, target: dict[str, Any], input_shape: Sequence[int],
                 overlap: float) -> None:
        self.net, self.overlap = net.eval(), overlap
        self.hparams = {"target": target}
        self.target = training_target(target)
        self.input_shape = tuple(input_shape)

    @torch.no_grad()
    def predict_region(self, image: torch.Tensor) -> torch.Tensor:
        """Probabilities (K, Y, X) over a whole slice (1, Y, X)."""
        return sliding_window(self.net, image, self.input_shape, self.overlap)


class Standardized(torch.nn.Module):
    """torch-em's input convention: each tile standardized on its own, as its training patches are."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        from torch_em.transform.raw import standardize

        return self.net(torch.stack([torch.from_numpy(standardize(t.numpy())) for t in tiles]))


def load_torch_em(run: TorchEmRun) -> PeerSegmenter:
    """The trained torch-em U-Net of ``run`` (its ``latest.pt``), on CPU, ready to be scored."""
    from torch_em.util import load_model

    net = load_model(str(run.checkpoint.parent), torch_em_unet(), name="latest", device="cpu")
    return PeerSegmenter(Standardized(net), run.target, run.patch_shape, run.overlap)
