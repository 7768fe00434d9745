"""Encoders behind one interface, and the registry that builds them from a plain config.

Objectives and heads only use what :class:`Encoder` promises, never a backbone class, so a new
family plugs in by registering a factory here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import Any, ClassVar

import timm
import torch
from timm.models import group_parameters
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from emfm.errors import EmfmError
from emfm.models.layers import BasicBlock3d, ConvBlock, PatchEmbed3d, max_pool_nd, triple


class Encoder(nn.Module):
    """The contract every encoder keeps.

    Attributes:
        family: registry name, used in config error messages.
        spatial_dims: 2 for (N, C, Y, X) input, 3 for (N, C, Z, Y, X).
        input_shape: the patch shape, (Y, X) or (Z, Y, X), the encoder was built for.
        in_chans: input channels (1 for EM).
        embed_dim: size of the global embedding returned by ``forward``.
        feature_channels: channels of each map returned by ``forward_features``.
        feature_strides: downsampling of each of those maps, one int per spatial axis, because
            3-D encoders may downsample Z less than Y and X.
    """

    family: ClassVar[str]
    spatial_dims: ClassVar[int]
    input_shape: tuple[int, ...]
    in_chans: int
    embed_dim: int
    feature_channels: list[int]
    feature_strides: list[tuple[int, ...]]

    @property
    def timm_model(self) -> nn.Module | None:
        """The stock timm model inside (2-D timm encoders), for export; ``None`` for our 3-D ones."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Global embedding, (N, embed_dim)."""
        raise NotImplementedError

    def layer_groups(self) -> list[list[str]]:
        """Parameter names grouped by depth, input side first, for layer-wise learning-rate decay."""
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps at several depths/scales, each (N, C_i, *spatial / stride_i)."""
        raise NotImplementedError

    def _set_input_shape(self, input_shape: Sequence[int]) -> None:
        """Keep the patch shape after checking it has this family's number of axes."""
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != self.spatial_dims:
            axes = "[Z, Y, X]" if self.spatial_dims == 3 else "[Y, X]"
            raise EmfmError(
                f"model.family={self.family} is {self.spatial_dims}-D but the patch shape "
                f"{list(shape)} has {len(shape)} axes; set data.patch_shape={axes}"
            )
        self.input_shape = shape

    def _check_divisible(self, step: Sequence[int], what: str) -> None:
        if any(s % p for s, p in zip(self.input_shape, step)):
            raise EmfmError(
                f"data.patch_shape {list(self.input_shape)} is not divisible by {what} {list(step)}"
            )


def _timm_groups(model: Any, prefix: str) -> list[list[str]]:
    """A timm model's own depth grouping (its ``group_matcher``), names prefixed as in the encoder."""
    groups = group_parameters(model, model.group_matcher(coarse=False))
    return [[prefix + name for name in names] for _, names in sorted(groups.items())]


def _per_axis(size: int | Sequence[int], dims: int, key: str) -> tuple[int, ...]:
    """One int for every axis, or one per axis; ``key`` names the config entry in errors."""
    sizes = (int(size),) * dims if isinstance(size, int) else tuple(int(s) for s in size)
    if len(sizes) != dims:
        raise EmfmError(f"{key}={list(sizes)} needs 1 or {dims} entries")
    return sizes


def _total_strides(first: tuple[int, ...], steps: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The stride of each map from the first map's and each later stage's own, per axis."""
    return list(accumulate(steps, lambda total, step: tuple(a * b for a, b in zip(total, step)), initial=first))


class ViTEncoder(Encoder):
    """A timm Vision Transformer; :class:`ViT2dEncoder` and :class:`ViT3dEncoder` fix the axes.

    Both keep timm's model whole in ``self.vit`` (blocks, norm, class/register tokens, pooling),
    so a name gives the same transformer in 2-D and 3-D. Token access (``embed_tokens`` /
    ``run_blocks``) lets MAE drop masked tokens before the blocks without re-implementing the ViT.
    Subclasses adapt timm's model to their input in ``build_vit``.

    Args:
        input_shape: patch shape the encoder is built for; must be divisible by ``patch_size``.
        name: timm ViT, e.g. ``vit_small_patch16_224`` (weights are never downloaded).
        patch_size: token size, one int or one per axis.
        in_chans: input channels.
        feature_depths: blocks whose tokens ``forward_features`` returns; an int n picks n
            evenly spread blocks, the last included.
        **timm_kwargs: passed to ``timm.create_model``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        name: str = "vit_small_patch16_224",
        patch_size: int | Sequence[int] = 16,
        in_chans: int = 1,
        feature_depths: int | Sequence[int] = 4,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        self._set_input_shape(input_shape)
        self.patch_size = _per_axis(patch_size, self.spatial_dims, "model.patch_size")
        self._check_divisible(self.patch_size, "model.patch_size")
        self.in_chans = in_chans
        self.vit = self.build_vit(name, **timm_kwargs)
        self.embed_dim = self.vit.embed_dim
        self.grid_size = self.token_grid(self.input_shape)
        depth = len(self.vit.blocks)
        if isinstance(feature_depths, int):
            n = min(feature_depths, depth)
            feature_depths = [round((i + 1) * depth / n) - 1 for i in range(n)]
        self.feature_depths = sorted(int(d) for d in feature_depths)
        if not self.feature_depths or not 0 <= self.feature_depths[0] <= self.feature_depths[-1] < depth:
            raise EmfmError(
                f"model.feature_depths {self.feature_depths} must be block indices in [0, {depth - 1}]"
            )
        self.feature_channels = [self.embed_dim] * len(self.feature_depths)
        self.feature_strides = [self.patch_size] * len(self.feature_depths)

    def build_vit(self, name: str, **timm_kwargs: Any) -> VisionTransformer:
        """The named timm model without weights or head; token access relies on its ViT layout."""
        vit = timm.create_model(name, pretrained=False, in_chans=self.in_chans, num_classes=0, **timm_kwargs)
        if not isinstance(vit, VisionTransformer):
            raise EmfmError(f"model.name={name} is not a timm VisionTransformer, which {self.family} needs")
        return vit

    @property
    def num_prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens

    def token_grid(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """Token grid of an input with these spatial sizes."""
        return tuple(s // p for s, p in zip(spatial, self.patch_size))

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens with positions added, prefix (class/register) tokens first: (N, P + L, D)."""
        return self.vit._pos_embed(self.vit.patch_embed(x))

    def run_blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        """The transformer stack and final norm on any subset of tokens."""
        return self.vit.norm(self.vit.blocks(self.vit.norm_pre(tokens)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)

    def layer_groups(self) -> list[list[str]]:
        return _timm_groups(self.vit, "vit.")

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Patch tokens after each of ``feature_depths``, as (N, D, *grid) maps.

        Each map goes through the final norm (as DINOv2's intermediate layers do): maps from
        different depths get one scale, and a head on these maps trains every parameter, which
        DDP requires. timm's ``forward_intermediates`` only takes 2-D input, hence this loop.
        """
        n, grid = x.shape[0], self.token_grid(x.shape[2:])
        tokens = self.vit.norm_pre(self.embed_tokens(x))
        maps = []
        for depth, block in enumerate(self.vit.blocks[: self.feature_depths[-1] + 1]):
            tokens = block(tokens)
            if depth in self.feature_depths:
                patches = self.vit.norm(tokens[:, self.num_prefix_tokens :])  # (N, L, D)
                maps.append(patches.transpose(1, 2).reshape(n, -1, *grid))
        return maps


class ViT2dEncoder(ViTEncoder):
    """timm's ViT as is: ``self.vit``'s state_dict loads into a stock
    ``timm.create_model(name, img_size=input_shape, patch_size=..., in_chans=..., num_classes=0)``.
    """

    family, spatial_dims = "vit2d", 2

    @property
    def timm_model(self) -> nn.Module:
        return self.vit

    def build_vit(self, name: str, **timm_kwargs: Any) -> VisionTransformer:
        return super().build_vit(name, img_size=self.input_shape, patch_size=self.patch_size, **timm_kwargs)


class ViT3dEncoder(ViTEncoder):
    """timm's ViT on volumes: 3-D patches (anisotropic allowed) with fixed sine-cosine positions.

    timm only builds 2-D ViTs, so the model of that name is built and its patch and position
    embeddings are swapped for :class:`PatchEmbed3d`. Fixed positions give each token its offset
    in tokens, so an input with another grid than ``input_shape`` (a larger volume at inference)
    extends the field of view at the same voxel size instead of stretching a learned table; they
    hold no weights tied to the patch shape, and MAE's decoder uses the same code.
    """

    family, spatial_dims = "vit3d", 3

    def build_vit(self, name: str, **timm_kwargs: Any) -> VisionTransformer:
        vit = super().build_vit(name, **timm_kwargs)
        embed_2d = vit.patch_embed
        vit.patch_embed = PatchEmbed3d(
            self.input_shape, self.patch_size, self.in_chans, vit.embed_dim,
            bias=embed_2d.proj.bias is not None, norm=embed_2d.norm,
        )
        vit.pos_embed = None  # timm then only prepends the prefix tokens
        return vit


class CNNEncoder(Encoder):
    """A whole timm CNN (not ``features_only``), multi-scale maps from ``forward_intermediates``.

    ``self.cnn`` stays a stock timm model, so its state_dict reloads into
    ``timm.create_model(name, num_classes=0, in_chans=...)``, and ``forward`` is timm's own pooling.
    """

    family, spatial_dims = "cnn2d", 2
    cnn: Any  # a timm CNN: feature_info, head_hidden_size, forward_intermediates

    @property
    def timm_model(self) -> nn.Module:
        return self.cnn

    def __init__(
        self, input_shape: Sequence[int], name: str = "resnet18", in_chans: int = 1, **timm_kwargs: Any
    ) -> None:
        super().__init__()
        self._set_input_shape(input_shape)
        self.cnn = timm.create_model(
            name, pretrained=False, num_classes=0, in_chans=in_chans, **timm_kwargs
        )
        info = self.cnn.feature_info
        self.in_chans, self.embed_dim = in_chans, self.cnn.head_hidden_size
        self.feature_channels = [f["num_chs"] for f in info]
        self.feature_strides = [(f["reduction"],) * 2 for f in info]
        self._check_divisible(self.feature_strides[-1], f"the total stride of model.name={name}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cnn(x)

    def layer_groups(self) -> list[list[str]]:
        return _timm_groups(self.cnn, "cnn.")

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.cnn.forward_intermediates(
            x, indices=len(self.feature_channels), intermediates_only=True
        )


# name: (channels per stage, residual blocks per stage)
RESNET3D_PRESETS: dict[str, tuple[list[int], list[int]]] = {
    "test_resnet3d": ([8, 16, 32, 64], [1, 1, 1, 1]),
    "resnet10_3d": ([64, 128, 256, 512], [1, 1, 1, 1]),
    "resnet18_3d": ([64, 128, 256, 512], [2, 2, 2, 2]),
    "resnet34_3d": ([64, 128, 256, 512], [3, 4, 6, 3]),
}
# Full resolution in Z until stage 3 (EM sections are thicker than the pixel size), overall
# (4, 32, 32): the stem and first stage halve only Y and X, as ResNet's stem and max-pool do.
RESNET3D_STEM_STRIDE = (1, 2, 2)
RESNET3D_STRIDES = ((1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2))


class ResNet3dEncoder(Encoder):
    """A 3-D ResNet (basic blocks, BatchNorm3d so sync-BN conversion applies under DDP).

    Strides are per axis so anisotropic EM (thick sections) can keep Z resolution in the first
    stages. ``forward_features`` returns the stem and every stage, for U-Net style heads.

    Args:
        input_shape: (Z, Y, X) patch shape; must be divisible by the total stride.
        name: preset in :data:`RESNET3D_PRESETS` giving channels and blocks.
        in_chans: input channels.
        channels, blocks: per-stage widths and residual block counts (None = preset).
        strides: per-stage strides, each an int or (Z, Y, X) (None = :data:`RESNET3D_STRIDES`).
        stem_stride: stride of the stem convolution, an int or (Z, Y, X)
            (None = :data:`RESNET3D_STEM_STRIDE`).
    """

    family, spatial_dims = "cnn3d", 3

    def __init__(
        self,
        input_shape: Sequence[int],
        name: str = "resnet18_3d",
        in_chans: int = 1,
        channels: Sequence[int] | None = None,
        blocks: Sequence[int] | None = None,
        strides: Sequence[int | Sequence[int]] | None = None,
        stem_stride: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self._set_input_shape(input_shape)
        if name not in RESNET3D_PRESETS:
            raise EmfmError(
                f"model.name: unknown 3-D ResNet {name!r}; expected one of {sorted(RESNET3D_PRESETS)}"
            )
        channels = list(RESNET3D_PRESETS[name][0] if channels is None else channels)
        blocks = list(RESNET3D_PRESETS[name][1] if blocks is None else blocks)
        strides = RESNET3D_STRIDES if strides is None else strides
        if not len(channels) == len(blocks) == len(strides):
            raise EmfmError(
                f"model.channels, model.blocks and model.strides need one entry per stage; "
                f"got {len(channels)}, {len(blocks)} and {len(strides)}"
            )
        stem_stride = RESNET3D_STEM_STRIDE if stem_stride is None else stem_stride
        stem = _per_axis(stem_stride, 3, "model.stem_stride")
        stage_strides = [_per_axis(s, 3, f"model.strides[{i}]") for i, s in enumerate(strides)]
        kernel = triple([7 if s > 1 else 3 for s in stem])  # ResNet's wide stem on downsampled axes
        self.stem = nn.Sequential(
            nn.Conv3d(in_chans, channels[0], kernel, triple(stem), triple([k // 2 for k in kernel]), bias=False),
            nn.BatchNorm3d(channels[0]),
            nn.ReLU(inplace=True),
        )
        widths_in = [channels[0], *channels[:-1]]
        self.stages = nn.ModuleList(
            nn.Sequential(BasicBlock3d(c_in, c, s), *[BasicBlock3d(c, c) for _ in range(n - 1)])
            for c_in, c, n, s in zip(widths_in, channels, blocks, stage_strides)
        )
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        self.in_chans, self.embed_dim = in_chans, channels[-1]
        self.feature_channels = [channels[0], *channels]
        self.feature_strides = _total_strides(stem, stage_strides)
        self._check_divisible(
            self.feature_strides[-1], "the total stride of model.stem_stride and model.strides"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[-1].mean(dim=(-3, -2, -1))

    def layer_groups(self) -> list[list[str]]:
        parts = [("stem", self.stem)] + [(f"stages.{i}", stage) for i, stage in enumerate(self.stages)]
        return [[f"{prefix}.{name}" for name, _ in part.named_parameters()] for prefix, part in parts]

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = [self.stem(x)]
        for stage in self.stages:
            maps.append(stage(maps[-1]))
        return maps


class UNetEncoder(Encoder):
    """The encoder half of a classic U-Net (Ronneberger et al., 2015; torch-em's UNet2d / UNet3d);
    :class:`UNet2dEncoder` and :class:`UNet3dEncoder` fix the axes.

    Two conv-norm-act layers at full resolution, then per stage a max-pool and two more, the width
    doubling. A ResNet's finest map is at stride 2, which leaves a decoder one conv block over the
    raw pixels to draw 3-6 px membranes; here the first map is at stride 1, so
    :class:`~emfm.models.heads.UNetHead` decodes onto full-resolution features with no stage of its
    own, as torch-em's U-Net does. Instance norm (as the decoders'): the same at any batch size.

    Args:
        input_shape: patch shape; must be divisible by the total stride.
        in_chans: input channels.
        channels: width of the full-resolution stage; it doubles with every pooling stage.
        depth: pooling stages (maps at ``depth + 1`` scales).
        strides: pooling of each stage, an int or one per axis (None = :meth:`default_strides`).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        in_chans: int = 1,
        channels: int = 32,
        depth: int = 4,
        strides: Sequence[int | Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        self._set_input_shape(input_shape)
        if depth < 1:
            raise EmfmError(f"model.depth={depth}: a U-Net encoder needs at least 1 pooling stage")
        strides = self.default_strides(depth) if strides is None else strides
        if len(strides) != depth:
            raise EmfmError(f"model.strides needs one entry per pooling stage (model.depth={depth}); "
                            f"got {len(strides)}")
        dims = self.spatial_dims
        pools = [_per_axis(s, dims, f"model.strides[{i}]") for i, s in enumerate(strides)]
        widths = [channels * 2**i for i in range(depth + 1)]
        self.stages = nn.ModuleList([ConvBlock(dims, in_chans, widths[0])])
        self.stages.extend(nn.Sequential(max_pool_nd(dims, pool), ConvBlock(dims, c_in, c))
                           for c_in, c, pool in zip(widths, widths[1:], pools))
        self.in_chans, self.embed_dim = in_chans, widths[-1]
        self.feature_channels = widths
        self.feature_strides = _total_strides((1,) * dims, pools)
        self._check_divisible(self.feature_strides[-1], "the total stride of model.depth and model.strides")

    def default_strides(self, depth: int) -> Sequence[Sequence[int]]:
        """Halve every axis at every stage."""
        return [(2,) * self.spatial_dims] * depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[-1].flatten(2).mean(2)

    def layer_groups(self) -> list[list[str]]:
        return [[f"stages.{i}.{name}" for name, _ in stage.named_parameters()] for i, stage in enumerate(self.stages)]

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps


class UNet2dEncoder(UNetEncoder):
    family, spatial_dims = "unet2d", 2


class UNet3dEncoder(UNetEncoder):
    family, spatial_dims = "unet3d", 3

    def default_strides(self, depth: int) -> Sequence[Sequence[int]]:
        """The first half of the stages pool Y and X only (EM sections are thicker than the pixel size), as the
        3-D ResNet keeps Z resolution in its first stages."""
        return [(1, 2, 2)] * (depth // 2) + [(2, 2, 2)] * (depth - depth // 2)


ENCODERS: dict[str, Callable[..., Encoder]] = {
    "vit2d": ViT2dEncoder,
    "vit3d": ViT3dEncoder,
    "cnn2d": CNNEncoder,
    "cnn3d": ResNet3dEncoder,
    "unet2d": UNet2dEncoder,
    "unet3d": UNet3dEncoder,
}


# timm.create_model's own options choose files and weights to load, not an architecture: a model config
# read from a checkpoint or an export someone sent never makes timm load a file it names.
TIMM_LOADING = frozenset(inspect.signature(timm.create_model).parameters) - {"model_name", "kwargs"}


def create_encoder(family: str, **kwargs: Any) -> Encoder:
    """Build an encoder from a ``model`` config: ``create_encoder(**cfg.model)``."""
    if family not in ENCODERS:
        raise EmfmError(f"unknown encoder family {family!r}; expected one of {sorted(ENCODERS)}")
    if loading := sorted(TIMM_LOADING & set(kwargs)):
        raise EmfmError(f"model.{loading[0]}: not an encoder setting emfm writes (it makes timm load weights); "
                        f"remove it")
    settings = inspect.signature(ENCODERS[family]).parameters
    if all(p.kind != p.VAR_KEYWORD for p in settings.values()) and (unknown := sorted(set(kwargs) - set(settings))):
        raise EmfmError(f"model.{unknown[0]} is not a setting of model.family={family}; expected one of "
                        f"{list(settings)}")
    try:
        return ENCODERS[family](**kwargs)
    except RuntimeError as err:  # timm's message for an unknown model name
        if "Unknown model" in str(err):
            raise EmfmError(f"model.name: {err}") from None
        raise
