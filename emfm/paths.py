"""Where inputs and outputs are, and the rules every command that deletes or replaces a path follows.

An input is a local path or the URL of a remote store (``http(s)://``, ``s3://``), kept as text:
pathlib would fold a URL's ``//``. Outputs are local. An output that is the input, holds it
(a parent folder) or lies inside it (a store within the input store) would be deleted, replaced or
mixed into before the input is read, so it is refused before anything is touched, whatever
``overwrite`` says; so is an output path that holds anything but an earlier output of the same
command, recognised by emfm's own marker in it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from emfm.errors import EmfmError

log = logging.getLogger(__name__)

URL_SCHEMES = ("http", "https", "s3")       # what remote inputs are read from (through fsspec)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(location: str | Path) -> bool:
    """Whether ``location`` names a remote store (``scheme://...``) rather than a local path."""
    return isinstance(location, str) and _URL.match(location) is not None


def location(given: str | Path) -> str | Path:
    """An input's location: a URL as text (without a trailing ``/``), anything else a local path."""
    return given.rstrip("/") if isinstance(given, str) and is_url(given) else Path(given)


def join(base: str | Path, *parts: str) -> str | Path:
    """``base/part/...`` for a local path or a URL alike."""
    if isinstance(base, Path):
        return base.joinpath(*parts)
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def resolved(given: str | Path) -> str:
    """A location written down to be found again (jobs, checkpoints, cache keys): a URL as given, a path absolute."""
    return str(location(given)) if is_url(str(given)) else str(Path(given).expanduser().resolve())


def local_output(key: str, output: str | Path) -> Path:
    """The absolute path of an output; a URL is refused: emfm reads remote stores but writes only local folders."""
    if is_url(str(output)):
        raise EmfmError(f"{key}={output}: emfm reads remote inputs but writes its outputs to local folders only; "
                        f"choose a local {key}")
    return Path(output).expanduser().resolve()


def refuse_overlap(key: str, output: str | Path, inputs: Mapping[str, str | Path | None]) -> None:
    """Raise if ``output`` (named ``key`` in the message) is, contains or lies inside one of ``inputs``.

    Paths are compared resolved (relative parts and symlinks followed), so another spelling of the
    same place is caught; ``None`` inputs and remote ones (URLs, never written) are skipped. An
    output URL is refused.
    """
    out = local_output(key, output)
    for name, given in inputs.items():
        if given is None or is_url(str(given)):
            continue
        path = Path(given).expanduser().resolve()
        relation = ("is" if out == path else "contains" if out in path.parents else
                    "lies inside" if path in out.parents else None)
        if relation:
            raise EmfmError(f"{key}={output} {relation} the {name} {given}; emfm never deletes or writes into "
                            f"its inputs: choose another {key}")


def refuse_foreign(key: str, output: str | Path, what: str, ours: Callable[[Path], bool]) -> bool:
    """Whether an earlier output of emfm's is at ``output`` (``False``: nothing is there); raise if anything else is.

    ``ours`` recognises the command's own output (``what``) by the marker emfm writes into it (a store's ``emfm``
    attributes, an export's ``config.json``, ...). Anything else (a user's file or folder, a run directory,
    another command's output) is never replaced, whatever ``overwrite`` says, and the refusal does not suggest
    it. The caller replaces its own output only with ``overwrite``.
    """
    path = Path(output)
    if not (path.exists() or path.is_symlink()):
        return False
    if not ours(path):
        thing = "a file" if path.is_file() else "a folder" if path.is_dir() else "a broken link"
        raise EmfmError(f"{key}={output} is {thing} that is not an emfm {what}; emfm replaces only an earlier "
                        f"{what} of its own, nothing else: choose another {key}")
    return True


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs: the partial files of one that does not are left-overs to clear."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # another user's process
        return True
    return True


def remove(path: str | Path) -> None:
    """Delete what is at ``path`` to replace it: a folder (a store) with its contents, a file or a link."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def cache_dir() -> Path:
    """Where emfm keeps what it computes about inputs it never writes into (their intensity normalisation, the
    digests of checkpoints): ``$EMFM_CACHE_DIR``, else ``$XDG_CACHE_HOME/emfm``, else ``~/.cache/emfm``."""
    if given := os.environ.get("EMFM_CACHE_DIR"):
        return Path(given).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "emfm"


def read_cache(path: Path) -> Any:
    """A cache file's JSON content; None if it is missing or unreadable (then it is computed and written again)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_cache(path: Path, content: dict[str, Any]) -> None:
    """Write a cache file atomically; where it cannot be written the values are only kept in memory."""
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(content) + "\n")
        os.replace(partial, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        log.info("%s: could not write the cache file (%s); keeping the values in memory", path, e)
