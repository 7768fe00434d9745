"""The notebooks: stored clean, and executed end to end on a briefly pretrained tiny encoder."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore_clusters.ipynb"
PNG = b"\x89PNG\r\n\x1a\n"


def test_notebook_is_stored_without_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert nb.metadata.kernelspec.name == "python3"


def python3_kernel(where: Path) -> Path:
    """A ``python3`` kernelspec running this interpreter (found first through JUPYTER_PATH), whatever
    other kernelspecs the machine has."""
    spec = where / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (emfm test)", "language": "python"}))
    return where


def images(cell: nbformat.NotebookNode) -> list[bytes]:
    return [base64.b64decode(out["data"]["image/png"]) for out in cell.get("outputs", [])
            if out["output_type"] in ("display_data", "execute_result") and "image/png" in out.get("data", {})]


def test_explore_clusters_notebook_runs(vit_checkpoint: Path, synth_zarr: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("EMFM_NB_CHECKPOINT", str(vit_checkpoint))
    monkeypatch.setenv("EMFM_NB_VOLUME", str(synth_zarr))
    monkeypatch.setenv("EMFM_NB_LABELS", str(synth_zarr / "labels" / "membranes"))     # 0 background, 1 membrane
    monkeypatch.setenv("JUPYTER_PATH", str(python3_kernel(tmp_path / "jupyter")))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))      # no user profile or startup files
    monkeypatch.delenv("MPLBACKEND", raising=False)                   # the kernel's inline backend shows figures
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(tmp_path)}})
    # No mimic of the Output widget: it sends on the shell channel while the client polls that channel for the
    # cell's reply, which now and then stalls the cell until the timeout (jupyter/nbclient#312). Without it the
    # figure drawn inside the widget is a plain output of the cell.
    client.widget_registry = {}
    client.execute()

    cells = {cell.id: cell for cell in nb.cells}
    features = text(cells["features"])
    assert "features (64, 2, 12, 12)" in features, features            # test_vit: 64 channels, stride 8
    assert features.startswith("layer=3:"), features                    # emfm features' default: the last of 4 maps
    assert "filter bank: 48 channels" in text(cells["baselines"])      # 8 filters per sigma, 6 sigmas, per slice
    for name in ("pca", "cluster-map", "umap", "gallery", "side-by-side"):
        pictures = images(cells[name])
        assert len(pictures) == 1 and pictures[0].startswith(PNG) and len(pictures[0]) > 5000, name
    widgets = [out for out in cells["choose-k"].outputs
               if "application/vnd.jupyter.widget-view+json" in out.get("data", {})]
    assert len(widgets) == 1 and len(images(cells["choose-k"])) == 1   # the slider, and show(K) drawn once
    scores = dict(line.split(": IoU ") for line in text(cells["scores"]).splitlines())
    assert list(scores) == ["learned", "filters", "intensity baseline"], scores
    membrane = {}
    for name, line in scores.items():           # "0 0.296 (cluster 3), 1 0.473 (cluster 5); ARI 0.143"
        ious = [float(part.split()[1]) for part in line.split(";")[0].split(", ")]
        assert len(ious) == 2 and all(0 < iou <= 1 for iou in ious), (name, line)
        membrane[name] = ious[1]
    # Neither baseline depends on the checkpoint: both find the membranes (0.47, 0.42; the baseline scores 0.15 against
    # the labels of slices 8-9), so the labels were read on the slices shown.
    assert membrane["filters"] > 0.3 and membrane["intensity baseline"] > 0.3, scores


def text(cell: nbformat.NotebookNode) -> str:
    return "".join(out.get("text", "") for out in cell.outputs if out["output_type"] == "stream")
