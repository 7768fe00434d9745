"""``emfm`` command line: one verb per task.

Training-like verbs are Hydra apps (``emfm pretrain key=value ...``, ``-m`` for multirun); data
verbs take ordinary flags. Problems with the user's input end in one line, not a traceback
(set EMFM_DEBUG=1 to see it).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

from emfm.allocator import keep_freed_memory
from emfm.errors import EmfmError, first_line
from emfm.threads import default_workers, wait_passively

HYDRA_COMMANDS = {
    "pretrain": "self-supervised pretraining of an encoder on unlabeled volumes",
    "finetune": "train a segmentation head (and the encoder) on a few labeled slices",
    "evaluate": "predict a labeled region with a fine-tuned model, derive instances, write metrics",
    "predict": "a fine-tuned model over a whole volume, block by block, into OME-Zarr (resumable)",
    "features": "an encoder's dense features over a volume into a zarr store (resumable)",
    "cluster": "cluster dense features into a map on the raw grid, score it against labels, pictures",
    "classify": "a pixel classifier on features of a few labelled slices, predicted over a volume (resumable)",
}
RESUMABLE = ("predict", "features", "classify")     # an interrupted run is continued by the same command
# Lightning's DDP launcher restarts this program for ranks > 0 with the Hydra overrides only;
# the verb travels in the environment.
VERB_ENV = "EMFM_HYDRA_VERB"
USAGE = """usage: emfm COMMAND [ARGS]

commands:
  ingest    convert TIFF / PNG slices / HDF5 / MRC / npy / (remote) zarr into OME-Zarr
  synth     write a synthetic EM volume with ground truth (OME-Zarr or TIFF)
  export    a fine-tuned model as a bioimage.io package, or a pretrained encoder (safetensors + card)
  seeds     turn chosen clusters of `emfm cluster` into sparse labels for `emfm finetune`
  compare   does pretraining pay on my data? a recipe against training from scratch, over seeds
{hydra}

`emfm ingest -h` for the flags of a data command; `emfm pretrain --help` for a Hydra command's
config groups, and `emfm pretrain --cfg job` for its composed config.
"""


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``emfm ARGS``. Ctrl-C ends in one line, and a reader of the output that has gone (``emfm --help |
    head -1``) ends it quietly; each as the signal ends Unix tools, once the command has cleaned up."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            dispatch(args)
        finally:
            sys.stdout.flush()              # a reader that has gone is met here, not in Python's exit
    except BrokenPipeError:
        die_of(signal.SIGPIPE)
    except KeyboardInterrupt:
        if os.environ.get("EMFM_DEBUG"):
            raise
        verb = args[0] if args and args[0] in {*HYDRA_COMMANDS, *COMMANDS} else os.environ.get(VERB_ENV, "")
        resumes = "; the same command continues from the blocks already written" if verb in RESUMABLE else ""
        print(f"emfm{f' {verb}' if verb else ''}: interrupted{resumes}", file=sys.stderr)
        die_of(signal.SIGINT)


def die_of(signum: int) -> NoReturn:
    """End as a process the signal killed (status 128 + signum in the shell): a shell script stops at a command
    that died of SIGINT, where it runs on after one that exited, with 130 or any status."""
    sys.stderr.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    sys.exit(128 + signum)                  # not reached: the signal ends the process


def dispatch(args: list[str]) -> None:
    """Run the command ``args`` names: a Hydra app, a data verb's flags, or help and version."""
    if not args or args[0] in ("-h", "--help"):
        hydra = "\n".join(f"  {verb:<9} {text} (Hydra overrides)" for verb, text in HYDRA_COMMANDS.items())
        print(USAGE.format(hydra=hydra))
        return
    if {"-V", "--version"} & set(args):     # of every command: emfm's, not Hydra's
        from emfm import __version__

        print(f"emfm {__version__}")
        return
    if os.environ.get(VERB_ENV) and args[0] not in {*HYDRA_COMMANDS, *COMMANDS}:
        args = [os.environ[VERB_ENV], *args]
    verb, rest = args[0], args[1:]
    if verb in HYDRA_COMMANDS:
        run_hydra(verb, rest)
    elif verb in COMMANDS:
        with user_errors(verb):
            COMMANDS[verb](rest)
    else:
        sys.exit(f"emfm: unknown command {verb!r}; run `emfm --help` for the list")


@contextmanager
def user_errors(verb: str) -> Iterator[None]:
    """Turn an :class:`EmfmError` into ``emfm VERB: error: ...`` and exit status 2; so too an error of the
    file system (a path that cannot be created or written, a full disk), which names its path."""
    try:
        yield
    except (EmfmError, OSError) as err:
        if os.environ.get("EMFM_DEBUG") or isinstance(err, BrokenPipeError):     # the reader of stdout has gone
            raise
        if isinstance(err, OSError):
            where = f"{err.filename}: " if err.filename else ""
            err = EmfmError(f"{where}{err.strerror or first_line(err)}")
        print(f"emfm {verb}: error: {err}", file=sys.stderr)
        sys.exit(2)


def run_hydra(verb: str, overrides: list[str]) -> None:
    import hydra
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    @hydra.main(config_path="pkg://emfm.configs", config_name=verb, version_base="1.3")
    def app(cfg: DictConfig) -> None:
        with user_errors(verb):
            if missing := sorted(OmegaConf.missing_keys(cfg)):
                raise EmfmError(f"missing required {'key' if len(missing) == 1 else 'keys'} {', '.join(missing)}: "
                                f"emfm {verb} {' '.join(f'{key}=...' for key in missing)}")
            wait_passively(compute_processes(verb, cfg))     # before torch loads: OpenMP reads it once
            keep_freed_memory()
            from emfm import run

            getattr(run, verb)(cfg)

    os.environ[VERB_ENV] = verb
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra raises its errors (run dir, config) for us to print
    sys.argv = [sys.argv[0], *overrides]
    with user_errors(verb):
        try:
            app()
        except OverrideParseException as err:
            raise EmfmError(unquoted_hint(err.override, str(err)) or one_line(err)) from None
        except (HydraException, OmegaConfBaseException) as err:
            raise EmfmError(one_line(err)) from None


def one_line(err: Exception) -> str:
    """Hydra's message (the override, a line with a caret under it, a link) on one line."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


def unquoted_hint(override: str, message: str) -> str | None:
    """Hydra's lexer stops at a character it takes only inside quotes (an accented letter or '~' in a path):
    name it, and show the override with the words that hold one quoted for Hydra."""
    key, _, value = override.partition("=")
    plain = re.compile(r"[A-Za-z0-9_/\\\-+.$%*@?|: ]*")    # the characters Hydra reads in an unquoted word
    words = re.compile(r"[^\[\]{},'\"]+")                  # a list's or dict's words: outside [ ] { } , and quotes
    odd = [c for word in words.findall(value) for c in word if not plain.fullmatch(c)]
    if not message.startswith("LexerNoViableAltException") or not odd:
        return None
    quoted = words.sub(lambda m: m[0] if plain.fullmatch(m[0]) else f"'{m[0]}'", value)
    return f"{override}: Hydra reads {odd[0]!r} only inside quotes; write \"{key}={quoted}\""


def compute_processes(verb: str, cfg: Any) -> int:
    """The processes a command will compute in at once on this machine: the training process and its DataLoader
    workers, or a LocalCluster's Dask workers and this process (DDP ranks on CPU share the cores among themselves)."""
    if verb in ("pretrain", "finetune"):
        workers = cfg.data.get("num_workers")
        return 1 + (workers if isinstance(workers, int) and workers >= 0 else default_workers())  # else refused later
    if cfg.get("executor") == "dask" and not cfg.dask.get("address") and isinstance(cfg.dask.get("n_workers"), int):
        return 1 + cfg.dask.n_workers
    return 1


def ingest(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="emfm ingest", description="Convert a volume to OME-Zarr.")
    parser.add_argument("input", help="multi-page TIFF, folder of TIFF/PNG slices, file.h5:/dataset, MRC, .npy, or "
                                      "zarr / OME-Zarr (a folder, or an http(s):// or s3:// URL)")
    parser.add_argument("--out", required=True, help="output .zarr path")
    parser.add_argument("--voxel-size", type=float, nargs="+", metavar="S", help="per axis, e.g. Z Y X (in --unit)")
    parser.add_argument("--unit", default="nanometer", help="of the voxel size: nanometer (default), micrometer, ...")
    parser.add_argument("--axes", help="axis names, e.g. zyx (default) or yx")
    parser.add_argument("--chunks", type=int, nargs="+", metavar="C", help="chunk shape per axis")
    parser.add_argument("--labels", action="store_true", help="a label volume: integer dtype kept, nearest pyramid")
    parser.add_argument("--mask", action="store_true",
                        help="a grey mask image (255 = structure, anti-aliased edges): 0/1 labels cut at half range; "
                             "1-bit images are 0/1 already: use --labels")
    parser.add_argument("--zarr-format", type=int, choices=(2, 3), default=3, help="3: OME-NGFF 0.5, 2: 0.4")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    from emfm.data.ingest import ingest as run_ingest

    out = run_ingest(
        args.input, args.out, voxel_size=args.voxel_size, unit=args.unit, axes=args.axes, chunks=args.chunks,
        is_label=args.labels, mask=args.mask, zarr_format=args.zarr_format, overwrite=args.overwrite,
    )
    print(f"wrote {out}")


def synth(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="emfm synth", description="Write a synthetic EM volume.")
    parser.add_argument("--out", required=True, help=".zarr (OME-Zarr with labels/) or .tif (raw only)")
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 256, 256), metavar=("Z", "Y", "X"))
    parser.add_argument("--anisotropy", type=float, default=1.0, help="z voxel size / xy voxel size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    from emfm.data.synthetic import check_output, make_synthetic_em, save_synthetic

    out = check_output(args.out, args.overwrite)      # before the volume is generated
    volume = make_synthetic_em(tuple(args.shape), anisotropy=args.anisotropy, seed=args.seed)
    print(f"wrote {save_synthetic(volume, out, overwrite=args.overwrite)}")


def export(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="emfm export", description="A fine-tuning checkpoint as a bioimage.io model package (ilastik, deepImageJ, "
        "Fiji, the model zoo); a pretraining checkpoint as its encoder: emfm.load_encoder(OUT_DIR).")
    parser.add_argument("checkpoint", help="an emfm fine-tuning or pretraining checkpoint (.ckpt)")
    parser.add_argument("out_dir", help="directory to write (bioimage.io: rdf.yaml and its files; encoder: "
                                        "encoder.safetensors, config.json, README.md)")
    parser.add_argument("--sample", help="bioimage.io: a raw volume (zarr / OME-Zarr) whose centre is the test input "
                                         "and cover (default: synthetic EM)")
    parser.add_argument("--author", action="append", default=[], help="bioimage.io: an author's name (repeatable; "
                                                                      "default: your user name)")
    parser.add_argument("--license", default="CC-BY-4.0", help="bioimage.io: SPDX license id (default CC-BY-4.0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export")
    args = parser.parse_args(argv)
    from emfm.export import export as run_export

    out = run_export(args.checkpoint, args.out_dir, sample=args.sample, authors=args.author, license=args.license,
                     overwrite=args.overwrite)
    print(f"wrote {out}")


def seeds(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="emfm seeds", description="Chosen clusters as sparse labels (ignore elsewhere) for `emfm finetune`.")
    parser.add_argument("clusters", help="a cluster map written by `emfm cluster` (its output .zarr)")
    parser.add_argument("--map", required=True, nargs="+", metavar="CLUSTER=CLASS",
                        help="e.g. 3=1 5=2: cluster 3 becomes class 1, cluster 5 class 2")
    parser.add_argument("--out", required=True, help="output label .zarr (same grid as the raw volume)")
    parser.add_argument("--slices", help="keep seeds only on these z-slices, e.g. 0-4,9")
    parser.add_argument("--ignore", type=int, default=255, help="label of every other voxel (default 255)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    from emfm.data.labeled import parse_slices
    from emfm.explore.seeds import clusters_to_labels

    try:
        mapping = {int(c): int(v) for c, v in (item.split("=") for item in args.map)}
    except ValueError:
        raise EmfmError(f"--map {' '.join(args.map)}: expected CLUSTER=CLASS pairs of integers, e.g. 3=1") from None
    slices = parse_slices(args.slices, 1 << 30, "--slices") if args.slices else None
    out = clusters_to_labels(args.clusters, mapping, args.out, slices=slices, ignore=args.ignore,
                             overwrite=args.overwrite)
    print(f"wrote {out}: train with data.labels={out} data.ignore_label={args.ignore} target=semantic "
          f"target.classes={sorted({v for v in mapping.values() if v})}")


def compare(argv: list[str]) -> None:
    """Its flags and their checks live with the command: every refusal names the flag, before any work."""
    from emfm.evaluation.compare import main as run_compare

    run_compare(argv)


# The verbs with ordinary flags, each a function above.
COMMANDS: dict[str, Callable[[list[str]], None]] = {"ingest": ingest, "synth": synth, "export": export, "seeds": seeds,
                                                    "compare": compare}
