"""Remote inputs: OME-Zarr served over HTTP on the loopback address is read chunk by chunk, pretrained on,
predicted from and ingested, exactly as the same store on disk; a bad URL is one line naming it."""

import functools
import json
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from emfm.data.ingest import ingest, write_ome_zarr
from emfm.data.volume import Volume, compute_normalization, storage_options
from emfm.errors import EmfmError
from emfm.paths import join, location, refuse_overlap, resolved
from tests.conftest import TINY_PRETRAIN, compose_run, pretrained


class Handler(SimpleHTTPRequestHandler):
    """A static file server (no zarr-specific behaviour) that records the paths asked for."""

    requested: list[str] = []

    def do_GET(self) -> None:
        Handler.requested.append(self.path)
        super().do_GET()

    def log_message(self, *args: object) -> None:    # quiet
        pass


@pytest.fixture(scope="module")
def served(synth_zarr: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(base URL, folder served there) of an HTTP server on 127.0.0.1; the folder holds a copy of the synthetic
    volume (zarr v3 / NGFF 0.5, normalisation stored) as ``synth.zarr``."""
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(synth_zarr, root / "synth.zarr")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()
    thread.join()


def test_locations_keep_urls_whole() -> None:
    assert location("https://host/a/x.zarr/") == "https://host/a/x.zarr"       # pathlib would give https:/host/...
    assert join("s3://bucket/x.zarr", "s0") == "s3://bucket/x.zarr/s0"
    assert join(Path("/d/x.zarr"), "0") == Path("/d/x.zarr/0")
    assert resolved("http://h:8000/x.zarr") == "http://h:8000/x.zarr"
    assert storage_options("s3://bucket/x.zarr") == {"anon": True} and storage_options("http://h/x.zarr") == {}
    refuse_overlap("output", "/tmp/out.zarr", {"input": "http://h/tmp/out.zarr"})       # a URL is never written
    with pytest.raises(EmfmError, match=r"^output=s3://b/o.zarr: emfm reads remote inputs but writes its outputs "
                                        r"to local folders only; choose a local output$"):
        refuse_overlap("output", "s3://b/o.zarr", {"input": "/data/raw.zarr"})


@pytest.mark.parametrize("fmt", [2, 3])
def test_volume_over_http_reads_the_local_voxels_chunk_by_chunk(served: tuple[str, Path], fmt: int,
                                                                emfm_cache: Path) -> None:
    url, root = served
    raw = Volume(root / "synth.zarr").read()
    name = f"um{fmt}.zarr"
    write_ome_zarr(raw, root / name, voxel_size=(0.02, 0.004, 0.004), unit="micrometer", chunks=(8, 48, 48),
                   zarr_format=fmt)
    group = zarr.open_group(str(root / name), mode="r+")
    group.attrs["emfm"] = {k: v for k, v in dict(group.attrs)["emfm"].items() if k != "normalization"}
    local, remote = Volume(root / name), Volume(f"{url}/{name}/")
    assert remote.path == f"{url}/{name}"
    assert (remote.shape, remote.dtype, remote.axes, remote.levels) == (local.shape, local.dtype, "zyx", local.levels)
    assert remote.voxel_size == pytest.approx((0.02, 0.004, 0.004)) and remote.units == ("micrometer",) * 3
    Handler.requested.clear()
    region = (slice(6, 10), slice(40, 60), slice(0, 20))        # in chunks (0-1, 0-1, 0) of (8, 48, 48)
    np.testing.assert_array_equal(remote.read(region), raw[region])
    key = "c/" if fmt == 3 else ""
    assert sorted(Handler.requested) == [f"/{name}/0/{key}{z}/{y}/0" for z in (0, 1) for y in (0, 1)]   # those alone
    np.testing.assert_array_equal(Volume(f"{url}/{name}", level=1).read(), Volume(root / name, level=1).read())
    np.testing.assert_array_equal(remote.read(), raw)

    # normalisation: computed once, cached under the URL (the remote store is never written), then reused
    lo, hi = remote.normalization()
    assert (lo, hi) == compute_normalization(local)
    cached = [json.loads(p.read_text()) for p in (emfm_cache / "normalization").iterdir()]
    assert {"input": f"{url}/{name}", "percentiles": [1.0, 99.5], "values": [lo, hi]} in cached
    assert "normalization" not in dict(zarr.open_group(str(root / name), mode="r").attrs)["emfm"]
    assert Volume(f"{url}/{name}").normalization() == (lo, hi)


def test_bad_urls_are_one_line_naming_them(served: tuple[str, Path]) -> None:
    url, root = served
    (root / "not_zarr").mkdir(exist_ok=True)
    (root / "not_zarr" / "readme.txt").write_text("no zarr here")
    zarr.open_group(str(root / "plain.zarr"), mode="w").create_array("a", shape=(4, 4), dtype="u1")
    with socket.socket() as s:                 # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/x.zarr"
    cases = [(f"{url}/missing.zarr", "no zarr array or OME-Zarr image found"),
             (f"{url}/not_zarr", "no zarr array or OME-Zarr image found"),
             (f"{url}/plain.zarr", "no zarr array or OME-Zarr image found (group without multiscales, holding: a)"),
             (closed, "cannot read"),
             ("ftp://host/x.zarr", "unsupported URL scheme; emfm reads http://, https://, s3:// stores")]
    for bad, what in cases:
        with pytest.raises(EmfmError) as err:
            Volume(bad)
        message = str(err.value)
        assert message.startswith(f"{bad}: {what}") and "\n" not in message, message


@pytest.fixture(scope="module")
def segmenter(two_step_finetuned: Callable[[str], Path]) -> Path:
    return two_step_finetuned("vit2d")


def test_pretraining_reads_an_ome_zarr_over_http(served: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = served
    Handler.requested.clear()
    checkpoint = pretrained(tmp_path, f"{url}/synth.zarr", 3, TINY_PRETRAIN)
    state = torch.load(checkpoint, weights_only=True)
    assert state["global_step"] == 3
    assert [v["path"] for v in state["PatchDataModule"]["volumes"]] == [f"{url}/synth.zarr"]
    assert any(p.startswith("/synth.zarr/0/c/") for p in Handler.requested)       # chunks came over HTTP


def test_predict_from_http_equals_predict_from_disk(served: tuple[str, Path], segmenter: Path,
                                                   tmp_path: Path) -> None:
    url, root = served

    def predict(source: str, output: Path) -> np.ndarray:
        compose_run("predict", [f"checkpoint={segmenter}", f"input={source}", f"output={output}",
                                f"paths.output_dir={tmp_path / 'run'}", "progress=false", "block_shape=[8,48,48]"])
        return zarr.open_array(f"{output}/0", mode="r")[...]

    local, remote = predict(str(root / "synth.zarr"), tmp_path / "local.zarr"), \
        predict(f"{url}/synth.zarr", tmp_path / "remote.zarr")
    np.testing.assert_array_equal(remote, local)
    attrs = {name: dict(zarr.open_group(str(tmp_path / name), mode="r").attrs) for name in ("local.zarr",
                                                                                            "remote.zarr")}
    assert attrs["remote.zarr"]["emfm"]["predict"]["input"] == f"{url}/synth.zarr"
    assert attrs["remote.zarr"]["ome"]["multiscales"] == attrs["local.zarr"]["ome"]["multiscales"]
    with pytest.raises(EmfmError, match=r"^output=http://x/p.zarr: emfm reads remote inputs but writes"):
        compose_run("predict", [f"checkpoint={segmenter}", f"input={url}/synth.zarr", "output=http://x/p.zarr",
                                f"paths.output_dir={tmp_path / 'run'}"])


def test_cluster_from_http_equals_cluster_from_disk(served: tuple[str, Path], segmenter: Path,
                                                    tmp_path: Path) -> None:
    url, root = served
    maps = {}
    for name, source in (("local", str(root / "synth.zarr")), ("remote", f"{url}/synth.zarr")):
        compose_run("cluster", [f"checkpoint={segmenter}", f"input={source}", f"output={tmp_path / name}.zarr",
                                f"paths.output_dir={tmp_path / name}", "progress=false", "k=3", "sample=2000",
                                "pictures=null"])
        maps[name] = zarr.open_array(f"{tmp_path / name}.zarr/0", mode="r")[...]    # features computed on the way
    np.testing.assert_array_equal(maps["remote"], maps["local"])


def test_ingest_from_http_copies_the_store_lazily(served: tuple[str, Path], tmp_path: Path) -> None:
    url, root = served
    out = ingest(f"{url}/synth.zarr", tmp_path / "copy.zarr", zarr_format=2, progress=False)
    source, copy = Volume(root / "synth.zarr"), Volume(out)
    np.testing.assert_array_equal(copy.read(), source.read())
    assert copy.voxel_size == pytest.approx(source.voxel_size) and copy.units == ("nanometer",) * 3
    local = ingest(root / "synth.zarr", tmp_path / "local.zarr", progress=False)     # a zarr folder ingests too
    np.testing.assert_array_equal(Volume(local).read(), source.read())
