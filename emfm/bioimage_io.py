"""A fine-tuned segmenter as a bioimage.io model package (format 0.5): what ilastik, deepImageJ, Fiji and the
model zoo open.

The package holds TorchScript weights (they run without emfm) and the state dict of
:class:`~emfm.models.segmenter.Segmenter` (rebuilt from emfm and the configs the description
keeps), emfm's intensity normalisation as ``scale_range`` preprocessing, a test input and the
probabilities the model computes from it, a cover and the model card. bioimage.io's tools check a
package by running the test input through preprocessing and each weights format and comparing with
the test output, offline (``bioimageio.core.test_model``).
"""

from __future__ import annotations

import getpass
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from emfm.checkpoints import check_export_dir, fill, read_checkpoint, read_segmenter
from emfm.data.synthetic import make_synthetic_em
from emfm.data.volume import NORM_PERCENTILES, Volume
from emfm.errors import EmfmError, first_line
from emfm.models.segmenter import Segmenter
from emfm.paths import remove

RDF = "rdf.yaml"
INPUT, OUTPUT = "raw", "probabilities"
EPS = 1e-6                     # scale_range's epsilon, in the test output too
CITATIONS = {                  # encoder family without its "2d" / "3d" -> (text, DOI) of its architecture
    "vit": ("Dosovitskiy et al., An image is worth 16x16 words: Transformers for image recognition at scale, "
            "ICLR 2021", "10.48550/arXiv.2010.11929"),
    "cnn": ("He et al., Deep residual learning for image recognition, CVPR 2016", "10.1109/CVPR.2016.90"),
    "unet": ("Ronneberger et al., U-Net: Convolutional networks for biomedical image segmentation, MICCAI 2015",
             "10.1007/978-3-319-24574-4_28"),
}


def normalise(raw: np.ndarray) -> np.ndarray:
    """emfm's normalisation as bioimage.io's ``scale_range`` computes it on one input: its own percentiles."""
    lo, hi = np.percentile(raw, NORM_PERCENTILES)
    return ((raw - lo) / (hi - lo + EPS)).astype(np.float32)


def sample_tile(sample: str | Path | None, shape: Sequence[int], channels: int) -> np.ndarray:
    """A (1, C, *shape) float32 raw tile: the centre of ``sample`` (a zarr volume), else synthetic EM."""
    if sample is None:
        depth = shape[0] if len(shape) == 3 else 1
        raw = make_synthetic_em((max(depth, 2), shape[-2], shape[-1]), seed=0).raw[:depth]
    else:
        volume = Volume(sample)
        if volume.ndim < len(shape) or any(s < t for s, t in zip(volume.shape[-len(shape):], shape)):
            raise EmfmError(f"--sample {sample}: shape {list(volume.shape)} holds no tile of the model's input shape "
                            f"{list(shape)}")
        leading = tuple(s // 2 for s in volume.shape[: volume.ndim - len(shape)])
        centre = tuple(slice((s - t) // 2, (s - t) // 2 + t) for s, t in zip(volume.shape[-len(shape):], shape))
        raw = volume.read((*leading, *centre))
    tile = np.asarray(raw, dtype=np.float32).reshape(shape)
    return np.broadcast_to(tile, (1, channels, *shape)).copy()


def save_torchscript(segmenter: Segmenter, example: torch.Tensor, path: Path) -> None:
    """TorchScript of ``segmenter`` traced for inputs of the example's shape (the package's fixed input shape).

    Tracing warns that shape arithmetic becomes constants (right for the one input shape), and torch
    calls TorchScript deprecated in favour of torch.export; it is what bioimage.io's consumers read.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(segmenter, example, check_trace=False), str(path))


def cover(raw: np.ndarray, probs: np.ndarray, path: Path) -> None:
    """raw | the last output channel (a softmax's last class), side by side (the central slice of 3-D tiles), as PNG."""
    image, prob = raw[0, 0], probs[0, -1]
    if image.ndim == 3:
        image, prob = image[image.shape[0] // 2], prob[prob.shape[0] // 2]
    lo, hi = np.percentile(image, [1, 99])
    panels = [np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1), np.clip(prob, 0, 1)]
    grey = (np.concatenate(panels, axis=1) * 255).astype(np.uint8)
    Image.fromarray(grey).resize((grey.shape[1] * 4, grey.shape[0] * 4), Image.Resampling.NEAREST).save(path)


def channels(name: str, count: int) -> Any:
    """A channel axis of ``count`` channels named after ``name``."""
    from bioimageio.spec.model import v0_5 as spec

    names = [name] if count == 1 else [f"{name}{i}" for i in range(count)]
    return spec.ChannelAxis(channel_names=[spec.Identifier(n) for n in names])


def export_package(checkpoint: str | Path, out_dir: str | Path, *, sample: str | Path | None = None,
                   authors: Sequence[str] = (), license: str = "CC-BY-4.0", overwrite: bool = False) -> Path:
    """Write ``out_dir``, a bioimage.io model package of a fine-tuning checkpoint; returns ``out_dir``."""
    try:
        from bioimageio.spec import save_bioimageio_package_as_folder
        from pydantic import ValidationError  # what bioimageio.spec raises
    except ImportError:
        raise EmfmError("a bioimage.io package needs bioimageio.spec: pip install 'emfm[bioimageio]'") from None
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    check_export_dir(checkpoint, out_dir, overwrite)
    hparams, weights = read_segmenter(checkpoint, None)
    configs = {k: dict(hparams[k]) for k in ("encoder", "head", "target")}
    segmenter = Segmenter(configs["encoder"], configs["head"], configs["target"]).eval()
    fill(segmenter, {k: v for k, v in weights.items() if k.startswith("model.")}, str(checkpoint))
    encoder = segmenter.model.encoder
    raw = sample_tile(sample, encoder.input_shape, encoder.in_chans)
    example = torch.from_numpy(normalise(raw))
    with torch.no_grad():
        probs = segmenter(example).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        files = Path(tmp)
        np.save(files / "test_input.npy", raw)
        np.save(files / "test_output.npy", probs)
        save_torchscript(segmenter, example, files / "weights_torchscript.pt")
        torch.save(segmenter.state_dict(), files / "weights.pt")
        cover(raw, probs, files / "cover.png")
        steps = read_checkpoint(checkpoint).get("global_step")
        (files / "README.md").write_text(package_card(hparams, checkpoint, steps, encoder.input_shape))
        try:
            descr = describe(files, configs, raw.shape, probs.shape, authors or [getpass.getuser()], license)
        except ValidationError as err:   # a value given (--license, --author) that the spec refuses
            told = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg'][:100]}" for e in err.errors())
            raise EmfmError(first_line(f"{checkpoint}: no valid bioimage.io description ({told})")) from None
        partial = out_dir.with_name(f".{out_dir.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        save_bioimageio_package_as_folder(descr, output_path=partial)
    remove(out_dir)
    partial.rename(out_dir)
    return out_dir


def describe(files: Path, configs: dict[str, Any], in_shape: Sequence[int],
             out_shape: Sequence[int], authors: Sequence[str], license: str) -> Any:
    """The bioimage.io model description of the files export_package wrote into ``files``."""
    from bioimageio.spec.model import v0_5 as spec

    encoder, head, kind = configs["encoder"], configs["head"], configs["target"]["kind"]
    axes = [spec.AxisId(a) for a in "zyx"[-(len(in_shape) - 2):]]
    version = spec.Version(torch.__version__.split("+")[0])
    text, doi = CITATIONS[encoder["family"][:-2]]
    return spec.ModelDescr(
        name=f"emfm {encoder['family']} {encoder.get('name', '')} {kind}",
        description=f"{kind} probabilities from an emfm {encoder['family']} encoder and "
                    f"{head.get('name', 'auto')} head fine-tuned on EM",
        authors=[spec.Author(name=name) for name in authors],
        cite=[spec.CiteEntry(text=text, doi=spec.Doi(doi))],
        license=license_id(license),
        documentation=spec.FileDescr(source=files / "README.md"),
        covers=[spec.FileDescr(source=files / "cover.png")],
        tags=["electron-microscopy", "segmentation", "emfm", "pytorch", f"{len(axes)}d"],
        inputs=[spec.InputTensorDescr(
            id=spec.TensorId(INPUT),
            axes=[spec.BatchAxis(), channels("raw", in_shape[1]),
                  *[spec.SpaceInputAxis(id=a, size=s) for a, s in zip(axes, in_shape[2:])]],
            test_tensor=spec.FileDescr(source=files / "test_input.npy"),
            data=spec.IntervalOrRatioDataDescr(type="float32"),
            preprocessing=[spec.ScaleRangeDescr(kwargs=spec.ScaleRangeKwargs(
                axes=axes, min_percentile=NORM_PERCENTILES[0], max_percentile=NORM_PERCENTILES[1], eps=EPS))],
        )],
        outputs=[spec.OutputTensorDescr(
            id=spec.TensorId(OUTPUT),
            axes=[spec.BatchAxis(), channels(str(kind), out_shape[1]),
                  *[spec.SpaceOutputAxis(id=a, size=s) for a, s in zip(axes, out_shape[2:])]],
            test_tensor=spec.FileDescr(source=files / "test_output.npy"),
            data=spec.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
        )],
        weights=spec.WeightsDescr(
            pytorch_state_dict=spec.PytorchStateDictWeightsDescr(
                source=files / "weights.pt", pytorch_version=version,
                architecture=spec.ArchitectureFromLibraryDescr(
                    callable=spec.Identifier("Segmenter"), import_from="emfm.models.segmenter",
                    kwargs=configs)),
            torchscript=spec.TorchscriptWeightsDescr(
                source=files / "weights_torchscript.pt", pytorch_version=version, parent="pytorch_state_dict"),
        ),
    )


def license_id(license: str) -> Any:
    """``license`` as the spec's SPDX id; one it does not know is named without the spec's list of all of them."""
    from bioimageio.spec.model import v0_5 as spec
    from pydantic import ValidationError

    try:
        return spec.LicenseId(license)
    except ValidationError:
        raise EmfmError(f"--license {license}: not an SPDX license id bioimage.io takes (e.g. CC-BY-4.0, MIT)") \
            from None


def package_card(hparams: Mapping[str, Any], checkpoint: Path, steps: Any, shape: Sequence[int]) -> str:
    """The model card: what the model computes from what, how it was trained, how to run it (a tested snippet)."""
    encoder, target = hparams["encoder"], hparams["target"]
    axes = "ZYX"[-len(shape):]
    return "\n".join([
        f"# emfm {encoder['family']} `{encoder.get('name', '')}`: {target['kind']} probabilities",
        "",
        f"- Network: emfm encoder {encoder['family']} `{encoder.get('name', '')}` with segmentation head "
        f"`{hparams['head'].get('name', 'auto')}`, fine-tuned with `emfm finetune` for {steps} "
        f"steps from `init={hparams.get('init', 'scratch')}` (checkpoint `{checkpoint.resolve()}`).",
        f"- Input `{INPUT}`: one {axes} tile of {' x '.join(map(str, shape))} voxels, "
        f"{hparams['encoder'].get('in_chans', 1)} channel(s), raw intensities. Preprocessing maps the "
        f"{NORM_PERCENTILES[0]} and {NORM_PERCENTILES[1]} intensity percentiles of the input to 0 and 1, as emfm "
        "does per volume: give it tiles of the whole volume with the volume's contrast.",
        f"- Output `{OUTPUT}`: per-voxel probabilities of the target `{dict(target)}` "
        f"({'softmax over classes' if target['kind'] == 'semantic' else 'a sigmoid per channel'}).",
        "- Weights: TorchScript (runs without emfm) and the PyTorch state dict of "
        "`emfm.models.segmenter.Segmenter` (needs emfm installed).",
        "",
        "Run it in Python (`pip install bioimageio.core torch`), in this folder:",
        "",
        "```python",
        "import numpy as np",
        "import torch",
        "from bioimageio.core import predict",
        "",
        'image = np.load("test_input.npy")           # (batch, channel, *space) raw intensities',
        'result = predict(model="rdf.yaml", inputs={"raw": image})',
        f'probabilities = result.members["{OUTPUT}"].data.to_numpy()',
        "",
        "# or the TorchScript weights alone, with the normalisation done by hand:",
        f"lo, hi = np.percentile(image, {list(NORM_PERCENTILES)})",
        'model = torch.jit.load("weights_torchscript.pt")',
        f"normalised = ((image - lo) / (hi - lo + {EPS})).astype(np.float32)",
        "same = model(torch.from_numpy(normalised)).detach().numpy()",
        "assert np.allclose(same, probabilities, atol=1e-4)",
        "```",
        "",
        "## Validation",
        "",
        "The package's test checks that the weights reproduce the test output, not that the segmentation is good;",
        "score held-out labelled slices with `emfm evaluate checkpoint=... raw=... labels=... slices=...`.",
        "",
    ])
