"""The arms of ``benchmarks/peers.py``: what emfm and each peer run, one call per fresh process.

Each arm times only its own work (not the interpreter start, nor imports), reads its peak RSS at
the end and reports what it computed (``Result.facts``), read from the objects it built, so that
the two sides of a comparison can be checked against each other. Peers are imported inside their
arms: an emfm process never loads lightly or MONAI.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.harness import Result, config, peak_rss_mib
from benchmarks.workloads import (
    K,
    allocator,
    bare_parts,
    forward_precision,
    optimizer,
    plain_loop,
    real_batch,
    seeded_segmenter,
    trained_parameters,
)
from emfm.data.volume import Volume

MODEL_3D = ["model=vit3d", "model.name=vit_tiny_patch16_224", "model.patch_size=[4,16,16]",
            "data.patch_shape=[16,64,64]"]
PROBES = 4096       # output values of the in-memory sliding windows compared between the two sides


def parameters(module: torch.nn.Module) -> str:
    return f"{trained_parameters(module) / 1e6:.3f} M trained parameters"


def layers(module: torch.nn.Module) -> str:
    """An MLP's layers in order: Linear in->out (+bias), BN, ReLU."""
    parts = []
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            parts.append(f"Linear {m.in_features}->{m.out_features}{'' if m.bias is None else '+bias'}")
        elif isinstance(m, torch.nn.BatchNorm1d):
            parts.append("BN" if m.affine else "BN(no affine)")
        elif isinstance(m, torch.nn.ReLU):
            parts.append("ReLU")
    return " > ".join(parts)


# --- pretraining step -------------------------------------------------------------------------------------------


@dataclass
class TrainArm:
    """One side's training step, built and ready: the loss on its fixed batch, the model and its optimiser."""

    loss: Callable[[], torch.Tensor]
    model: torch.nn.Module
    optim: torch.optim.Optimizer
    batch: int
    facts: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)

    def timed(self, steps: int) -> Result:
        run = plain_loop(self.loss, self.model, self.optim, steps, self.batch)
        return Result(run.rate, run.rss_mib, self.facts, self.extra)


def emfm_train(args: list[str], steps: int) -> Result:
    return emfm_arm(args, steps).timed(steps)


def lightly_train(args: list[str], steps: int) -> Result:
    return lightly_arm(args).timed(steps)


def paired_train(args: list[str], steps: int, rounds: int) -> tuple[list[Result], list[Result]]:
    """Both sides built in this one process and timed in alternating blocks of ``steps``: whatever differs from
    one fresh process to the next (±10 % in images/s on the 2-core machine) then falls on both alike."""
    sides = (emfm_arm(args, steps), lightly_arm(args))
    results: tuple[list[Result], list[Result]] = ([], [])
    for _ in range(rounds):
        for arm, out in zip(sides, results):
            out.append(arm.timed(steps))
    return results


def emfm_arm(args: list[str], steps: int) -> TrainArm:
    """``workloads.bare_parts`` (emfm's module, ``compute_loss``, AdamW); its augmentation timed alone."""
    from emfm.data.augment import OPTIONS
    from emfm.pretrain.contrastive import TwoViews

    cfg, module, images = bare_parts(args)
    ((name, objective),) = module.objectives()
    method: Any = objective                  # the attributes of its own class (MAE, SimCLR) are read below
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(steps):
            method.views(images, None) if isinstance(method, TwoViews) else method.augment(images)
    augment = (time.perf_counter() - start) / steps
    encoder: Any = module.encoder
    on = [k for k in ("flip", "rot90", *OPTIONS) if getattr(method.augment, k)]
    facts = {"encoder": f"timm {type(encoder.timm_model).__name__}, {parameters(encoder.timm_model)}",
             "augmentation in the step": f"{', '.join(on)} ({1000 * augment:.0f} ms/step alone)"}
    if name == "mae":
        _, mask = method.mask(encoder, 1, images.device, None)
        block = method.decoder_blocks[0]
        facts |= {"encoder positions": "learned" if encoder.vit.pos_embed.requires_grad else "fixed sin-cos",
                  "hidden tokens": f"{int(mask.sum())} of {mask.shape[1]}",
                  "decoder": f"width {method.decoder_embed.out_features}, depth {len(method.decoder_blocks)}, "
                             f"heads {block.attn.num_heads}, qkv bias {block.attn.qkv.bias is not None}",
                  "decoder size": parameters(method),
                  "decoder input tokens": f"{method.decoder_pos_embed.shape[1]} (patch tokens)",
                  "tokens predicted": f"all {mask.shape[1]}, loss on the hidden",
                  "target": "per-patch normalised pixels" if method.norm_pix_loss else "pixels"}
    else:
        facts |= {"projector": layers(method.projector), "temperature": f"{method.temperature}",
                  "loss": "NT-Xent over both views of the batch"}
    return TrainArm(lambda: module.compute_loss(images)["loss"], module, optimizer(module, cfg), cfg.data.batch_size,
                    facts, {"augment_seconds": augment, "batch": cfg.data.batch_size})


class LightlyMAE(torch.nn.Module):
    """MAE from lightly's building blocks around a timm ViT, in the shape of lightly's own MAE example."""

    def __init__(self, vit: Any, decoder_dim: int, depth: int, heads: int, mask_ratio: float, norm_pix: bool) -> None:
        from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM

        super().__init__()
        self.mask_ratio, self.norm_pix, self.patch = mask_ratio, norm_pix, vit.patch_embed.patch_size[0]
        self.backbone = MaskedVisionTransformerTIMM(vit=vit)
        self.decoder_embed = torch.nn.Linear(vit.embed_dim, decoder_dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=vit.patch_embed.num_patches, embed_dim=decoder_dim, depth=depth, num_heads=heads,
            num_prefix_tokens=vit.num_prefix_tokens)
        self.head = torch.nn.Linear(decoder_dim, self.patch**2 * vit.patch_embed.proj.in_channels)

    def masks(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept, hidden) token indices; the class token (index 0) is always kept."""
        from lightly.models import utils

        return utils.random_token_mask((batch, self.backbone.sequence_length), self.mask_ratio, device=device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from lightly.models import utils

        n = images.shape[0]
        keep, hidden = self.masks(n, images.device)
        x = self.decoder_embed(self.backbone.encode(images, idx_keep=keep))                 # (N, 1 + L_keep, Dd)
        full = utils.set_at_index(x.new_zeros(n, self.backbone.sequence_length, x.shape[-1]), keep, x)
        pred = self.head(utils.get_at_index(self.decoder(full, idx_mask=hidden), hidden))  # (N, L_hidden, p*p*C)
        target = utils.get_at_index(utils.patchify(images, self.patch), hidden - 1)       # patches lack the class
        if self.norm_pix:    # lightly has no option for it; emfm's norm_pix_loss in two lines
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        return torch.nn.functional.mse_loss(pred, target)


def lightly_arm(args: list[str]) -> TrainArm:
    """The same timm model in lightly's blocks, sized from emfm's config, in the same loop on the same batch."""
    import timm

    cfg = config(args)
    images = real_batch(cfg)
    model_cfg, ((name, hp),) = cfg.model, cfg.objective.methods.items()
    loss: Callable[[], torch.Tensor]
    model: torch.nn.Module
    if name == "mae":
        vit: Any = timm.create_model(model_cfg.name, pretrained=False, num_classes=0, in_chans=model_cfg.in_chans,
                                img_size=tuple(model_cfg.input_shape), patch_size=model_cfg.patch_size)
        model = LightlyMAE(vit, hp.decoder_dim, hp.decoder_depth, hp.decoder_heads, hp.mask_ratio, hp.norm_pix_loss)
        loss = lambda: model(images)  # noqa: E731
        _, hidden = model.masks(1, images.device)
        block = model.decoder.blocks[0]
        facts = {"encoder": f"timm {type(vit).__name__}, {parameters(vit)}",
                 "encoder positions": "learned" if vit.pos_embed.requires_grad else "fixed sin-cos",
                 "hidden tokens": f"{hidden.shape[1]} of {vit.patch_embed.num_patches}",
                 "decoder": f"width {hp.decoder_dim}, depth {len(model.decoder.blocks)}, heads "
                            f"{block.attn.num_heads}, qkv bias {block.attn.qkv.bias is not None}",
                 "decoder size": parameters(torch.nn.ModuleList([model.decoder_embed, model.decoder, model.head])),
                 "decoder input tokens": f"{model.decoder.sequence_length} (class + patch tokens)",
                 "tokens predicted": f"the {hidden.shape[1]} hidden",
                 "target": "per-patch normalised pixels" if hp.norm_pix_loss else "pixels"}
    else:
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        backbone = timm.create_model(model_cfg.name, pretrained=False, num_classes=0, in_chans=model_cfg.in_chans)
        head = SimCLRProjectionHead(backbone.num_features, hp.hidden_dim, hp.proj_dim)
        criterion = NTXentLoss(temperature=hp.temperature)
        model = torch.nn.Sequential(backbone, head)
        views = torch.cat([images, images.flip(-1)])    # made once: lightly's SimCLRTransform runs in the DataLoader

        def loss() -> torch.Tensor:
            return criterion(*model(views).chunk(2))     # one pass for both views, as emfm's

        facts = {"encoder": f"timm {type(backbone).__name__}, {parameters(backbone)}",
                 "projector": layers(head), "temperature": f"{criterion.temperature}",
                 "loss": "NT-Xent over both views of the batch"}
    facts["augmentation in the step"] = "none (lightly's transforms run per image in DataLoader workers)"
    return TrainArm(loss, model, optimizer(model, cfg), cfg.data.batch_size, facts)


# --- sliding window ---------------------------------------------------------------------------------------------


def segment_fn(checkpoint: Path | None) -> tuple[Callable[[torch.Tensor], torch.Tensor], tuple[int, ...]]:
    """(tiles (B, 1, *tile) -> probabilities, tile): a 2-D checkpoint slice by slice as `emfm predict` runs
    it, or (``None``) the 3-D model."""
    if checkpoint is None:
        net = seeded_segmenter(MODEL_3D)                              # a 3-D ViT-Ti UNETR
        return net, tuple(net.model.encoder.input_shape)
    from emfm.checkpoints import load_segmenter

    module = load_segmenter(checkpoint)
    tile = (1, *module.model.encoder.input_shape)
    return (lambda x: module.activate(module.model(x[:, :, 0]).float()).unsqueeze(2)), tile


def counted(fn: Callable[[torch.Tensor], torch.Tensor], count: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` adding the tiles it is given to ``count[0]``."""

    def run(x: torch.Tensor) -> torch.Tensor:
        count[0] += x.shape[0]
        return fn(x)

    return run


def corner_weight(side: str, tile: tuple[int, ...]) -> str:
    """The Gaussian blending weight at a tile's corner relative to its centre, as each side computes it."""
    if side == "emfm":
        from emfm.inference import blend_weights

        weights = blend_weights(tile, kind="gaussian")
    else:
        from monai.data.utils import compute_importance_map

        weights = compute_importance_map(tile, mode="gaussian", sigma_scale=0.125)
    return f"{float(weights.min() / weights.max()):.0e}"


def window_arm(side: str, checkpoint: Path | None, volume: Path, overlap: float, batch: int) -> Result:
    """One side's sliding window over a normalised volume in memory, timed alone (imports before)."""
    if side == "emfm":
        from emfm.inference import sliding_window
    else:
        from monai.inferers import sliding_window_inference
    fn, tile = segment_fn(checkpoint)
    vol = Volume(volume)
    image = torch.from_numpy(vol.normalize(vol.read()))[None]                          # (1, Z, Y, X)
    with torch.no_grad():
        fn(torch.zeros(batch, 1, *tile))                                                # warm-up
    tiles = [0]
    start = time.perf_counter()
    if side == "emfm":
        out = sliding_window(counted(fn, tiles), image, tile, overlap, batch, blend="gaussian")
    else:
        with torch.no_grad():
            out = sliding_window_inference(image[None], tile, batch, counted(fn, tiles), overlap, mode="gaussian")[0]
    seconds = time.perf_counter() - start
    probes = np.random.default_rng(0).integers(out.numel(), size=PROBES)
    return Result(image.numel() / seconds, peak_rss_mib(),
                  {"tiles through the model": str(tiles[0]),
                   "Gaussian weight at a tile corner": corner_weight(side, tile)},
                  {"probes": out.flatten()[probes].numpy()})


def monai_whole(checkpoint: Path, volume: Path, output: Path, overlap: float, batch: int, precision: str = "32"
                ) -> Result:
    """MONAI as its users run it on a volume that fits: read it all, infer, write it all (uint8, as emfm);
    ``precision="bf16"``: under the bfloat16 autocast a user would write around it."""
    import zarr
    from monai.inferers import sliding_window_inference

    from emfm.blockwise.store import encode

    start, tiles = time.perf_counter(), [0]
    fn, tile = segment_fn(checkpoint)
    vol = Volume(volume)
    image = torch.from_numpy(vol.normalize(vol.read()))[None, None]                     # (1, 1, Z, Y, X)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        probs = sliding_window_inference(image, tile, batch, counted(fn, tiles), overlap, mode="gaussian")[0]
    data = encode(probs.float().numpy(), "uint8")                                               # (K, Z, Y, X)
    zarr.open_array(str(output), mode="w", shape=data.shape, chunks=(data.shape[0], 4, 512, 512),
                    dtype="uint8")[...] = data
    return Result(image.numel() / (time.perf_counter() - start), peak_rss_mib(),
                  {"tiles through the model": str(tiles[0]),
                   "Gaussian weight at a tile corner": corner_weight("monai", tile),
                   "forward passes": forward_precision(precision), "freed memory": allocator()})


# --- clustering ---------------------------------------------------------------------------------------------------


def plain_cluster(checkpoint: Path, volume: Path, output: Path, precision: str = "auto") -> Result:
    """The notebook way: the whole volume and its features in memory, k-means on every feature vector.

    After the timed part, k-means again with another seed: how alike k-means is with itself here.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    from emfm import load_encoder
    from emfm.explore.features import dense_features

    start = time.perf_counter()
    encoder = load_encoder(checkpoint, as_timm=False)
    vol = Volume(volume)
    image = vol.normalize(vol.read())                                                    # (Z, Y, X)
    feats = dense_features(encoder, image, precision=precision)                          # (F, Z, Yc, Xc)
    vectors = feats.reshape(feats.shape[0], -1).T                                        # (cells, F)
    labels = KMeans(K, n_init=3, random_state=0).fit_predict(vectors).astype(np.uint8)
    stride = [s // c for s, c in zip(image.shape, feats.shape[1:])]
    grid = labels.reshape(feats.shape[1:])
    for axis, k in enumerate(stride):
        grid = grid.repeat(k, axis)
    np.save(output, grid[tuple(slice(0, s) for s in image.shape)])
    rate = image.size / (time.perf_counter() - start)
    itself = adjusted_rand_score(labels, KMeans(K, n_init=3, random_state=1).fit_predict(vectors)) \
        if len(vectors) <= 10**6 else float("nan")
    return Result(rate, peak_rss_mib(),
                  {"vectors k-means is fitted on": f"all {len(vectors)}", "projection": "none",
                   "k-means": f"scikit-learn, k={K}, 3 inits", "features": "float32 in memory",
                   "map on the voxel grid": "nearest cell (repeated)", "forward passes": forward_precision(precision),
                   "freed memory": allocator()},
                  {"stride": stride, "self_ari": float(itself)})
