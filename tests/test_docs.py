"""The commands the README and the guide show are commands that work: the README's workflow runs as written (on a
small synthetic stack, shortened by a few appended overrides), and every other documented command line parses."""

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hydra import compose, initialize_config_module
from PIL import Image

from emfm.cli import HYDRA_COMMANDS
from emfm.data.synthetic import make_synthetic_em
from tests.conftest import CommandLine

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "guide.md"]

# Appended to the README's training commands to make them test-sized: every other word is the README's.
SHORTER = {
    "pretrain": ["trainer.max_steps=2", "trainer.val_check_interval=2", "data.patch_shape=[64,64]",
                 "data.batch_size=2", "data.num_workers=0", "callbacks.reconstructions.every_n_steps=2"],
    "finetune": ["trainer.max_steps=2", "trainer.val_check_interval=2", "data.patch_shape=[64,64]",
                 "data.batch_size=2", "data.num_workers=0"],
}


def commands(path: Path) -> list[list[str]]:
    """The ``emfm ...`` command lines of a Markdown file's bash blocks: continuations joined, comments dropped."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["emfm"] and len(words) > 1:
                found.append(words[1:])
    return found


def readme_workflow() -> list[list[str]]:
    """The README's workflow block: the one that starts at ``emfm ingest`` and goes on to ``emfm cluster``."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"On your own data.*?```bash\n(.*?)```", text, re.S)
    assert block, "README.md: the workflow block ('On your own data') is gone"
    return [w for w in (shlex.split(line, comments=True) for line in block[1].replace("\\\n", " ").splitlines())
            if w]


def test_the_readme_workflow_runs_as_written(run_cli: CommandLine, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    volume = make_synthetic_em((20, 64, 64), seed=0)
    tifffile.imwrite("my_stack.tif", volume.raw)
    Path("membranes_folder").mkdir()
    for z, mask in enumerate(volume.membranes):
        Image.fromarray((255 * (mask > 0)).astype(np.uint8)).save(f"membranes_folder/{z:03d}.png")
    steps = readme_workflow()
    assert [w[1] for w in steps] == ["ingest", "ingest", "pretrain", "finetune", "evaluate", "predict", "cluster"]
    for words in steps:
        argv = words[1:] + SHORTER.get(words[1], [])
        done = run_cli([(argv, None)])[0]
        assert done.returncode == 0, f"emfm {' '.join(argv)}\n{done.stderr[-3000:]}"
    assert Path("runs/ev/report.json").is_file() and Path("my_pred.zarr/labels/instances").is_dir()
    assert Path("clusters.zarr").is_dir() and Path("runs/pt/checkpoints/last.ckpt").is_file()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_documented_hydra_command_composes(doc: Path) -> None:
    """Overrides name keys, groups and experiments that exist (``...`` stands for the user's other settings)."""
    checked = 0
    with initialize_config_module("emfm.configs", version_base="1.3"):
        for words in commands(doc):
            verb, overrides = words[0], [w for w in words[1:] if w != "..."]
            if verb not in HYDRA_COMMANDS or "-m" in overrides:     # a multirun names its launcher's plugin
                continue
            compose(verb, [o for o in overrides if not o.startswith("hydra.")])
            checked += 1
    assert checked >= (5 if doc.name == "README.md" else 20)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_documented_argparse_command_has_valid_flags(run_cli: CommandLine, tmp_path: Path, doc: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in an empty folder, each fails on its missing input, never on a flag the command does not have."""
    monkeypatch.chdir(tmp_path)
    lines = [w for w in commands(doc) if w[0] not in HYDRA_COMMANDS and "..." not in w
             and not any(a.startswith(("http", "s3:")) for a in w)]
    assert len(lines) >= (2 if doc.name == "README.md" else 6)
    for words, done in zip(lines, run_cli([(w, None) for w in lines])):
        said = done.stderr
        assert not re.search(r"unrecognized arguments|invalid choice|arguments are required|expected \w+ argument",
                             said), f"emfm {' '.join(words)}: {said}"
        assert "Traceback" not in said, f"emfm {' '.join(words)}: {said}"
