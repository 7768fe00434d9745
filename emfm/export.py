"""Hand a model to someone else: a fine-tuned one as a bioimage.io package, a pretrained encoder as safetensors
weights, a config and a model card.

The encoder export holds only the encoder (no objective heads, no optimiser state) and everything needed
to use it right: architecture, input channels and patch size, and the voxel size and intensity
normalisation it was trained with. 2-D timm encoders are saved with plain timm parameter names,
so the weights also load into ``timm.create_model`` without emfm.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from emfm.bioimage_io import export_package
from emfm.checkpoints import (
    CARD,
    CONFIG,
    FORMAT,
    WEIGHTS,
    build_encoder,
    check_export_dir,
    exported_module,
    fill,
    hyper_parameters,
    read_checkpoint,
    read_pretraining,
)
from emfm.errors import EmfmError
from emfm.models.encoders import Encoder
from emfm.paths import remove


def export(checkpoint: str | Path, out_dir: str | Path, *, sample: str | Path | None = None,
           authors: Sequence[str] = (), license: str = "CC-BY-4.0", overwrite: bool = False) -> Path:
    """``emfm export``: a fine-tuning checkpoint as a bioimage.io package, a pretraining one as its encoder."""
    if not is_segmenter(checkpoint):
        if sample is not None or authors:
            raise EmfmError(f"{checkpoint}: a pretraining checkpoint, exported as its encoder; --sample and "
                            f"--author apply to fine-tuning checkpoints (bioimage.io packages)")
        return export_encoder(checkpoint, out_dir, overwrite=overwrite)
    return export_package(checkpoint, out_dir, sample=sample, authors=authors, license=license, overwrite=overwrite)


def is_segmenter(checkpoint: str | Path) -> bool:
    """Whether ``checkpoint`` holds a fine-tuned segmentation model (a head and a target)."""
    hparams = hyper_parameters(read_checkpoint(checkpoint), str(checkpoint))
    return "head" in hparams and "target" in hparams


def export_encoder(checkpoint: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``out_dir`` with the encoder of an emfm pretraining checkpoint; returns ``out_dir``."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    state = read_pretraining(checkpoint)
    hparams, model = state["hyper_parameters"], dict(state["hyper_parameters"]["encoder"])
    check_export_dir(checkpoint, out_dir, overwrite)
    encoder = build_encoder(model, str(checkpoint))
    fill(encoder, {k.removeprefix("encoder."): v for k, v in state["state_dict"].items() if k.startswith("encoder.")},
         str(checkpoint))
    data = {k: v for k, v in (state.get("PatchDataModule") or {}).items() if k != "batches_served"}
    patch = getattr(encoder, "patch_size", None)   # ViTs only
    config = {
        "format": FORMAT,
        "model": model,
        "timm_model": encoder.timm_model is not None,
        "spatial_dims": encoder.spatial_dims,
        "in_chans": encoder.in_chans,
        "patch_size": None if patch is None else list(patch),
        "embed_dim": encoder.embed_dim,
        "feature_channels": encoder.feature_channels,
        "feature_strides": [list(s) for s in encoder.feature_strides],
        "pretraining": {"methods": hparams.get("methods"), "steps": state.get("global_step"),
                        "checkpoint": str(checkpoint.resolve())},
        "data": data,
    }
    partial = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    tensors = {k: v.contiguous() for k, v in exported_module(encoder).state_dict().items()}
    save_file(tensors, partial / WEIGHTS, metadata={"format": FORMAT})
    (partial / WEIGHTS).chmod(0o666 & ~umask())     # safetensors writes through a private (0600) temporary file
    (partial / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (partial / CARD).write_text(model_card(config, encoder))
    remove(out_dir)
    partial.rename(out_dir)
    return out_dir


def umask() -> int:
    """This process's umask: the mode a new file gets is ``0o666 & ~umask()`` (others in a lab may read it)."""
    mask = os.umask(0o077)          # read by setting it: the most private one meanwhile
    os.umask(mask)
    return mask


def model_card(config: dict[str, Any], encoder: Encoder) -> str:
    """A short README: what the encoder is, what it saw, how to load it."""
    model, pre = config["model"], config["pretraining"]
    volumes = config["data"].get("volumes", [])
    lines = [
        f"# {model['family']} encoder `{model.get('name', '')}` pretrained with emfm",
        "",
        (f"- Architecture: {model['family']} `{model.get('name', '')}`, input shape {model.get('input_shape')}, "
         f"patch size {config['patch_size']}, {config['in_chans']} input channel(s), "
         f"{sum(p.numel() for p in encoder.parameters()) / 1e6:.2f} M parameters, "
         f"embedding size {config['embed_dim']}."),
        f"- Feature maps: channels {config['feature_channels']}, strides {config['feature_strides']}.",
        f"- Pretraining: {', '.join(pre['methods'] or [])} for {pre['steps']} steps.",
        (f"- Data ({len(volumes)} volume(s), level {config['data'].get('level')}, patches "
         f"{config['data'].get('patch_shape')}):"),
        *[f"  - `{v['path']}`: shape {v['shape']}, axes {v['axes']}, voxel size {v['voxel_size']}, "
          f"intensity percentiles {v['normalization_percentiles']}" for v in volumes],
        "",
        "Inputs were normalised per volume as `(x - p_low) / (p_high - p_low)` with the percentiles above;",
        "normalise new data the same way (`emfm.data.volume.Volume.normalize` does).",
        "",
        f"Load it in Python, in this folder ({'a timm model' if config['timm_model'] else 'an emfm Encoder'}, "
        "in eval mode):",
        "",
        "```python",
        "import torch",
        "",
        "import emfm",
        "",
        'encoder = emfm.load_encoder(".")',
        "with torch.no_grad():",
        f"    embedding = encoder(torch.rand(1, {config['in_chans']}, {', '.join(map(str, model['input_shape']))}))",
        f"assert embedding.shape == (1, {config['embed_dim']})",
        "```",
        "",
    ]
    return "\n".join(lines)
