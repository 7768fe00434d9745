"""The EM community's public encoders as ``init=``: a weights file's layout recognised from its key names.

Layouts (what the files hold; where to get them is in docs/guide.md, "Public encoders"):

- MoCo v2, as CEM500K's ResNet-50 (``cem500k_mocov2_resnet50_200ep.pth.tar``): ``state_dict`` holds
  ``module.encoder_q.*`` (the query encoder, a torchvision ResNet whose ``fc`` is the projection MLP),
  ``module.encoder_k.*`` (its momentum copy) and the ``module.queue``; the query encoder is kept.
- SwAV, as CEM1.5M's ResNet-50 (``cem1.5m_swav_resnet50_200ep_balanced.pth.tar``): ``module.*`` with the
  ``projection_head`` and ``prototypes`` beside the ResNet; the ResNet is kept.
- SAM / micro-sam image encoders (``image_encoder.*``): recognised and refused, as no emfm family has
  SAM's windowed ViT with relative positions and a convolutional neck.
- Anything else is taken as a timm state dict (torchvision ResNets share timm's names), flat or in a
  ``state_dict`` / ``model`` entry, ``.pth`` or ``.safetensors``.

Weights come back under timm's names; :func:`fit_timm` then fits them to the run's timm model: the
classifier (or projection) at the model's ``classifier`` name is left out (emfm builds none), and an RGB
first convolution is summed to the run's input channels, as timm does for its own pretrained weights.
Every other key must match: what is missing or left over is named in the error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from timm.models import adapt_input_conv
from torch import nn

from emfm.errors import EmfmError

Weights = dict[str, torch.Tensor]
WRAPPERS = ("state_dict", "model_state", "model")      # where training scripts keep the weights
SAM_SIZES = {(768, 12): "ViT-B", (1024, 24): "ViT-L", (1280, 32): "ViT-H"}


@dataclass
class PublicWeights:
    """A public file's weights under timm's names, the layout they came in, and the family that layout fits."""

    layout: str
    weights: Weights
    family: str | None = None     # None: any 2-D timm encoder (vit2d or cnn2d)


def tensors(state: Mapping[str, Any], where: str) -> Weights:
    """The file's mapping of names to tensors: the file itself, or the first of ``WRAPPERS`` in it."""
    for candidate in (state, *(state.get(w) for w in WRAPPERS)):
        if isinstance(candidate, Mapping) and candidate and all(isinstance(v, torch.Tensor)
                                                                for v in candidate.values()):
            return dict(candidate)
    raise EmfmError(f"{where}: not an emfm checkpoint, and no weights (a mapping of names to tensors) in it, nor in "
                    f"its {' / '.join(WRAPPERS)} entry; its keys: {listed(list(state))}")


def recognise(state: Mapping[str, Any], where: str) -> PublicWeights:
    """The layout of a file that is not emfm's, and its encoder's weights under timm's names."""
    weights = tensors(state, where)
    refuse_sam(weights, where)
    plain = {k.removeprefix("module."): v for k, v in weights.items()}
    if any(k.startswith("encoder_q.") for k in plain):
        return PublicWeights("MoCo v2 layout (module.encoder_q.*, as CEM500K)", _under(plain, "encoder_q."), "cnn2d")
    if any(k.startswith(("projection_head.", "prototypes.")) for k in plain):
        kept = {k: v for k, v in plain.items() if not k.startswith(("projection_head.", "prototypes."))}
        return PublicWeights("SwAV layout (module.* with projection_head, as CEM1.5M)", kept, "cnn2d")
    return PublicWeights("timm state dict", weights)


def refuse_sam(weights: Weights, where: str) -> None:
    """A SAM / micro-sam image encoder is named and refused: loading it into a plain ViT would be wrong."""
    embed = next((v for k, v in weights.items() if k.endswith("image_encoder.patch_embed.proj.weight")), None)
    if not any(".image_encoder." in f".{k}" for k in weights):
        return
    blocks = {k.split("blocks.")[1].split(".")[0] for k in weights if "image_encoder.blocks." in k}
    size = SAM_SIZES.get((int(embed.shape[0]), len(blocks)), "a ViT") if embed is not None else "a TinyViT (vit_t)"
    raise EmfmError(f"{where}: a SAM / micro-sam image encoder (image_encoder.*, {size}); SAM's ViT has windowed "
                    f"attention with relative position embeddings and a convolutional neck, which no emfm encoder "
                    f"family has (model=vit2d is timm's plain ViT), so it is not loaded")


def _under(weights: Weights, prefix: str) -> Weights:
    return {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}


def listed(keys: list[str], shown: int = 4) -> str:
    """The first few keys and how many more, for a one-line error."""
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def fit_timm(model: nn.Module, weights: Weights, where: str) -> Weights:
    """``weights`` made to fit ``model`` (a timm model built without classifier) where timm's own loading would;
    weights that share no name with the model are of a layout emfm does not know, and named so."""
    config = getattr(model, "pretrained_cfg", None) or {}
    own = model.state_dict()
    if not own.keys() & weights.keys():
        raise EmfmError(f"{where}: none of its {len(weights)} weights ({listed(list(weights))}) is named as in timm's "
                        f"{config.get('architecture', type(model).__name__)}: a layout emfm does not know (it reads "
                        f"emfm checkpoints and exports, MoCo v2 and SwAV ResNets, timm state dicts)")
    classifier = config.get("classifier")
    heads = classifier if isinstance(classifier, (list, tuple)) else [classifier] if classifier else []
    fitted = {k: v for k, v in weights.items()
              if k in own or not any(k == h or k.startswith(f"{h}.") for h in heads)}
    first = f"{config.get('first_conv')}.weight"
    if first in fitted and first in own and fitted[first].ndim == 4 and fitted[first].shape[1] != own[first].shape[1]:
        fitted[first] = adapt_input_conv(own[first].shape[1], fitted[first])
    return fitted
