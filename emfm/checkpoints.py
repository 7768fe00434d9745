"""Every checkpoint kind emfm reads, read here and nowhere else, without running code.

Three kinds: a pretraining checkpoint (``emfm pretrain``: the encoder and the objectives' heads), a
fine-tuning checkpoint (``emfm finetune``: encoder and segmentation head) and an export folder
(``emfm export``: ``encoder.safetensors`` and ``config.json``). Lightning checkpoints are loaded with
``torch.load(weights_only=True)``, exports with safetensors. Every file gets the same checks, so a
damaged file or one of another kind is named in one line, whichever command was given it. A checkpoint's
stamp (its files' times and sizes) tells a running job's weights from a rewritten file, its digest a copy from
another checkpoint. The folder an export is written to is checked here too, against what an export is.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import torch
import yaml
from torch import nn

from emfm.errors import EmfmError, first_line
from emfm.models.encoders import Encoder, create_encoder
from emfm.models.heads import SegmentationHead, create_head
from emfm.models.public import PublicWeights, listed, recognise
from emfm.models.segmenter import Segmenter
from emfm.paths import cache_dir, read_cache, refuse_foreign, refuse_overlap, write_cache

WEIGHTS, CONFIG, CARD = "encoder.safetensors", "config.json", "README.md"    # an export folder
FORMAT = "emfm-encoder/1"
ENCODER_PREFIXES = ("model.encoder.", "encoder.")     # fine-tuning, pretraining checkpoint
SETTLED_NS = 2 * 10**9    # a checkpoint's digest is cached once its files are unchanged this long (the coarsest clock)

Weights = dict[str, torch.Tensor]


@dataclass
class PretrainedHead:
    """A decoder from a checkpoint: its ``head`` config and weights (the output layer ``out.*`` included)."""

    config: dict[str, Any]
    weights: Weights
    pretrained: bool = False        # learned with the encoder on unlabeled data (objective=restore), not fine-tuned


@dataclass
class Network:
    """What a checkpoint or an export offers to build on: the encoder's config and weights, and a decoder.

    The decoder comes from a fine-tuning checkpoint (its head) or from whole-network pretraining
    (``objective=restore``, whose head is the decoder fine-tuning uses); an export holds none.
    """

    encoder: dict[str, Any]
    weights: Weights
    head: PretrainedHead | None = None


def named(path: str | Path, key: str | None) -> str:
    """How an error names the file: as the config key that gave it (``init=...``), or as the path."""
    return f"{key}={path}" if key else str(path)


def read_checkpoint(path: str | Path, key: str | None = None) -> dict[str, Any]:
    """The contents of a Lightning checkpoint file, loaded without running code (``weights_only=True``)."""
    where, path = named(path, key), Path(path)
    if not path.is_file():
        raise EmfmError(f"{where}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for "not a checkpoint"
        raise EmfmError(first_line(f"{where}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})")) \
            from None
    if not isinstance(state, dict):
        raise EmfmError(f"{where}: holds a {type(state).__name__}, not a checkpoint (a dict); expected a .ckpt "
                        f"written by emfm")
    return state


def hyper_parameters(state: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A checkpoint's ``hyper_parameters``, checked to be a mapping (``{}`` if it has none)."""
    hparams = state.get("hyper_parameters") or {}
    if not isinstance(hparams, Mapping):
        raise EmfmError(f"{where}: hyper_parameters is a {type(hparams).__name__}, not a mapping; not an emfm "
                        f"checkpoint")
    return dict(hparams)


def state_dict(state: Mapping[str, Any], where: str) -> Weights:
    """A checkpoint's ``state_dict``, checked to map names to tensors."""
    weights = state.get("state_dict")
    if not isinstance(weights, Mapping) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise EmfmError(f"{where}: no state_dict of tensors in it; not an emfm checkpoint")
    return dict(weights)


def encoder_config(model: Any, where: str) -> dict[str, Any]:
    """A ``model`` config read from a file: a mapping naming an encoder family."""
    if not isinstance(model, Mapping) or not isinstance(model.get("family"), str):
        raise EmfmError(f"{where}: no encoder config (a mapping with a 'family'); not an emfm checkpoint")
    return dict(model)


def read_pretraining(path: str | Path, key: str | None = None) -> dict[str, Any]:
    """A pretraining (or fine-tuning) checkpoint with its encoder config and weights checked."""
    state = read_checkpoint(path, key)
    where = named(path, key)
    hparams = hyper_parameters(state, where)
    if not isinstance(hparams.get("encoder"), Mapping) or "state_dict" not in state:
        raise EmfmError(f"{where}: not an emfm pretraining checkpoint (no encoder config in hyper_parameters)")
    encoder_config(hparams["encoder"], where)
    state_dict(state, where)
    return state


def read_network(path: str | Path, key: str | None = None) -> Network:
    """The encoder (and decoder, if any) of any emfm checkpoint file or export folder."""
    where = named(path, key)
    if Path(path).is_dir():
        config, exported = read_export(path, key)
        return Network(config, exported.state_dict())
    if not Path(path).is_file():
        raise EmfmError(f"{where}: no such checkpoint or export directory")
    state = read_pretraining(path, key)
    hparams, weights = hyper_parameters(state, where), state_dict(state, where)
    encoder = {k.removeprefix(p): v for k, v in weights.items() for p in ENCODER_PREFIXES if k.startswith(p)}
    head = None
    if isinstance(hparams.get("head"), Mapping):  # fine-tuning checkpoint
        head = PretrainedHead(dict(hparams["head"]), _under(weights, "model.head."))
    elif isinstance((hparams.get("methods") or {}).get("restore"), Mapping):  # whole-network pretraining
        config = hparams["methods"]["restore"].get("head") or {"name": "auto"}
        head = PretrainedHead(dict(config), _under(weights, "methods.restore.head."), pretrained=True)
    return Network(encoder_config(hparams["encoder"], where), encoder, head)


def read_init(path: str | Path, key: str | None = "init") -> tuple[Network | None, PublicWeights | None]:
    """What ``init=`` names: an emfm checkpoint or export (the first), or a public encoder's weights file whose
    layout :mod:`emfm.models.public` recognises (the second)."""
    if Path(path).is_dir() or not Path(path).is_file():
        return read_network(path, key), None
    where = named(path, key)
    state: dict[str, Any] = read_safetensors(path, where) if Path(path).suffix == ".safetensors" \
        else read_checkpoint(path, key)
    if "hyper_parameters" in state:      # emfm's, to be checked as such
        return read_network(path, key), None
    return None, recognise(state, where)


def _under(weights: Mapping[str, torch.Tensor], prefix: str) -> Weights:
    return {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}


def read_segmenter(path: str | Path, key: str | None = "checkpoint") -> tuple[dict[str, Any], Weights]:
    """(hyper-parameters, weights) of a fine-tuning checkpoint; other kinds are refused with the reason."""
    where = named(path, key)
    state = read_checkpoint(path, key)
    hparams = hyper_parameters(state, where)
    if "head" not in hparams or "target" not in hparams:
        raise EmfmError(f"{where}: no segmentation head in it (a pretraining checkpoint?); fine-tune one with "
                        f"`emfm finetune`")
    return hparams, state_dict(state, where)


def load_segmenter(path: str | Path, key: str = "checkpoint") -> Segmenter:
    """A fine-tuned model for inference, in eval mode on CPU; other checkpoints are refused with the reason."""
    hparams, weights = read_segmenter(path, key)
    try:
        segmenter = Segmenter(hparams.get("encoder", {}), hparams["head"], hparams["target"],
                              hparams.get("overlap", 0.25))
    except TypeError as err:
        raise EmfmError(f"{key}={path}: its hyper_parameters do not build a segmentation model ({err})") from None
    fill(segmenter, {k: v for k, v in weights.items() if k.startswith("model.")}, f"{key}={path}")
    return segmenter.eval()


def fine_tuning_data(path: str | Path, key: str | None = "checkpoint") -> dict[str, Any]:
    """What a fine-tuning checkpoint was trained on, as its data module recorded it (``raw``, ``labels``,
    ``labeled_slices``, ``val_slices``); ``{}`` where it holds no record."""
    record = read_checkpoint(path, key).get("LabeledDataModule")
    return dict(record) if isinstance(record, Mapping) else {}


def exported_module(encoder: Encoder) -> nn.Module:
    """What an export's weights file holds: the timm model of a 2-D timm encoder, else the encoder itself."""
    return encoder.timm_model if encoder.timm_model is not None else encoder


def read_export(path: str | Path, key: str | None = None) -> tuple[dict[str, Any], Encoder]:
    """(model config, encoder with its weights) of an ``emfm export`` folder."""
    folder = Path(path)
    config_file, weights_file = folder / CONFIG, folder / WEIGHTS
    if not config_file.is_file() or not weights_file.is_file():
        raise EmfmError(f"{named(path, key)}: not an emfm export (expected {CONFIG} and {WEIGHTS}; make one with "
                        f"`emfm export`)")
    try:
        config = json.loads(config_file.read_text())
    except (UnicodeDecodeError, ValueError) as err:
        raise EmfmError(f"{config_file}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise EmfmError(f"{config_file}: holds a {type(config).__name__}, expected the JSON object `emfm export` "
                        f"writes")
    if config.get("format") != FORMAT:
        raise EmfmError(f"{config_file}: format {config.get('format')!r}, expected {FORMAT!r}")
    model = encoder_config(config.get("model"), f"{config_file}: model")
    encoder = build_encoder(model, str(config_file))
    fill(exported_module(encoder), read_safetensors(weights_file, str(weights_file)), str(weights_file))
    return model, encoder


def is_export(path: Path) -> bool:
    """Whether ``path`` is a folder ``emfm export`` wrote (renamed into place whole): an encoder's ``config.json``
    in emfm's format, or a bioimage.io package whose network is imported from emfm (its ``rdf.yaml``)."""
    try:
        if (path / CONFIG).is_file():
            return json.loads((path / CONFIG).read_text()).get("format") == FORMAT
        rdf = yaml.safe_load((path / "rdf.yaml").read_text())
        return str(rdf["weights"]["pytorch_state_dict"]["architecture"]["import_from"]).startswith("emfm.")
    except (OSError, ValueError, yaml.YAMLError, LookupError, TypeError, AttributeError):    # not what emfm wrote
        return False


def check_export_dir(checkpoint: Path, out_dir: Path, overwrite: bool) -> None:
    """Refuse an export folder that is or holds the checkpoint, holds anything but an earlier export, or is one
    (unless ``overwrite``)."""
    refuse_overlap("out_dir", out_dir, {"checkpoint": checkpoint})
    if refuse_foreign("out_dir", out_dir, "export", is_export) and not overwrite:
        raise EmfmError(f"{out_dir} exists; pass --overwrite to replace it")


def read_safetensors(path: str | Path, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a damaged one is named in one line."""
    try:
        from safetensors.torch import load_file

        return load_file(path)
    except Exception as err:  # safetensors raises its own error type, OSError, ...
        raise EmfmError(first_line(f"{where}: not a readable safetensors file ({err})")) from None


def build_encoder(model: Mapping[str, Any], where: str) -> Encoder:
    """An encoder from a model config read from a file; a config that builds none is named with the file."""
    try:
        return create_encoder(**model)
    except EmfmError as err:
        raise EmfmError(f"{where}: {err}") from None
    except (TypeError, ValueError) as err:  # keys or values the encoder does not take
        raise EmfmError(first_line(f"{where}: model {dict(model)} builds no encoder ({err})")) from None


def fill(module: nn.Module, weights: Mapping[str, torch.Tensor], where: str) -> None:
    """Load ``weights`` into ``module``; keys missing, left over or of another shape are named with the file."""
    own = module.state_dict()
    problems = {
        "missing": [k for k in own if k not in weights],
        "unexpected": [k for k in weights if k not in own],
        "of another shape": [f"{k} {list(weights[k].shape)} (expected {list(own[k].shape)})"
                             for k in own if k in weights and weights[k].shape != own[k].shape],
    }
    if any(problems.values()):
        told = "; ".join(f"{what}: {listed(keys)}" for what, keys in problems.items() if keys)
        raise EmfmError(f"{where}: the weights do not fit the {type(module).__name__} ({told})")
    module.load_state_dict(weights)


@overload
def load_encoder(path: str | Path, as_timm: Literal[False], key: str | None = None) -> Encoder: ...


@overload
def load_encoder(path: str | Path, as_timm: bool = True, key: str | None = None) -> nn.Module: ...


def load_encoder(path: str | Path, as_timm: bool = True, key: str | None = None) -> nn.Module:
    """A ready encoder in eval mode from an ``emfm export`` folder or any emfm checkpoint.

    2-D timm encoders come back as the timm model itself (``as_timm=False``: emfm's
    :class:`~emfm.models.encoders.Encoder`, which features and segmentation heads use); 3-D ones as
    the Encoder.
    """
    encoder, _ = load_network(path, key, decoder="none")
    return encoder.timm_model.eval() if as_timm and encoder.timm_model is not None else encoder


def load_network(path: str | Path, key: str | None = None,
                 decoder: Literal["any", "pretrained", "none"] = "any") -> tuple[Encoder, SegmentationHead | None]:
    """The encoder and the decoder of any checkpoint or export folder, in eval mode.

    The decoder is the U-Net / UNETR head trained with the encoder: by whole-network pretraining
    (``objective=restore``), or by fine-tuning (``decoder="pretrained"``: not that one). None where there is
    none: an export, an encoder-only pretraining, a fine-tuned linear head (which has no full-resolution features
    to give), or ``decoder="none"``.
    """
    where = named(path, key)
    if Path(path).is_dir():
        return read_export(path, key)[1].eval(), None
    network = read_network(path, key)
    encoder = build_encoder(network.encoder, where)
    fill(encoder, network.weights, where)
    head = network.head
    if head is None or head.config.get("name") == "linear" or decoder == "none" or (
            decoder == "pretrained" and not head.pretrained):
        return encoder.eval(), None
    made = create_head(encoder=encoder, out_channels=len(head.weights["out.weight"]), **head.config)
    fill(made, head.weights, where)
    return encoder.eval(), made.eval()


def checkpoint_files(path: str | Path) -> list[Path]:
    """A checkpoint file, or every file of an export directory."""
    return sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]


def checkpoint_digest(path: str | Path) -> str:
    """sha256 of a checkpoint file, or of every file of an export directory.

    Kept in emfm's cache folder under the files' identity (:func:`file_identity`), so that the commands given
    one checkpoint read it whole once, not at every start (0.1 s for the 78 MB of a ViT-Ti fine-tuning
    checkpoint). Files changed in the last ``SETTLED_NS`` are hashed every time: a rewrite within the same tick
    of the file system's clock would keep their identity.
    """
    files = checkpoint_files(path)
    identity = file_identity(files)
    cache = cache_dir() / "checkpoints" / f"{hashlib.sha256(json.dumps(identity).encode()).hexdigest()}.json"
    cached = read_cache(cache)
    if isinstance(cached, dict) and isinstance(cached.get("sha256"), str):
        return cached["sha256"]
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    settled = max((changed for *_, changed in identity), default=0) < time.time_ns() - SETTLED_NS
    if settled and file_identity(files) == identity:             # and not rewritten while it was read
        write_cache(cache, {"checkpoint": str(Path(path).resolve()), "sha256": digest.hexdigest()})
    return digest.hexdigest()


def file_identity(files: list[Path]) -> list[list[Any]]:
    """What tells a file's contents apart without reading them: path, device, inode, size, modification and change
    times (the change time moves with every write, and cannot be set back): a rewrite, a copy or a move is new."""
    return [[str(f.resolve()), s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns]
            for f, s in ((f, f.stat()) for f in files)]


def checkpoint_stamp(path: str | Path) -> tuple[tuple[int, int], ...]:
    """Modification time and size of each checkpoint file: cheap to read, and changed when the checkpoint is
    rewritten (a new ``last.ckpt``)."""
    return tuple((s.st_mtime_ns, s.st_size) for s in (f.stat() for f in checkpoint_files(path)))


def unchanged_checkpoint(path: str, stamp: tuple[tuple[int, int], ...]) -> str:
    """``path``, once its files are checked to be as they were when the run started (``stamp``): a process that
    loads the model later must not compute with other weights than the blocks before it."""
    if checkpoint_stamp(path) != stamp:
        raise EmfmError(f"checkpoint={path}: rewritten since this run started (its finished blocks came from the "
                        "earlier file): put that back, or run again with overwrite=true")
    return path
