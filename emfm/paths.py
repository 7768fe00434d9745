"""The rules every command that deletes or replaces a path follows: never an input, whatever is there.

An output that is the input, holds it (a parent folder) or lies inside it (a store within the
input store) would be deleted, replaced or mixed into before the input is read, so it is refused
before anything is touched, whatever ``overwrite`` says.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from emfm.errors import EmfmError


def refuse_overlap(key: str, output: str | Path, inputs: Mapping[str, str | Path | None]) -> None:
    """Raise if ``output`` (named ``key`` in the message) is, contains or lies inside one of ``inputs``.

    Paths are compared resolved (relative parts and symlinks followed), so another spelling of the
    same place is caught; ``None`` inputs are skipped.
    """
    out = Path(output).expanduser().resolve()
    for name, given in inputs.items():
        if given is None:
            continue
        path = Path(given).expanduser().resolve()
        relation = ("is" if out == path else "contains" if out in path.parents else
                    "lies inside" if path in out.parents else None)
        if relation:
            raise EmfmError(f"{key}={output} {relation} the {name} {given}; emfm never deletes or writes into "
                            f"its inputs: choose another {key}")


def refuse_file(key: str, output: str | Path) -> None:
    """An output emfm writes is a folder (a store, an export); a file at its path is someone else's, never
    replaced, whatever ``overwrite`` says."""
    if Path(output).is_file():
        raise EmfmError(f"{key}={output} is a file; emfm writes a folder there and replaces only folders it "
                        f"wrote: choose another {key}")


def remove(path: str | Path) -> None:
    """Delete what is at ``path`` to replace it: a folder (a store) with its contents, a file or a link."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def cache_dir() -> Path:
    """Where emfm keeps what it computes about inputs it never writes into (their intensity normalisation):
    ``$EMFM_CACHE_DIR``, else ``$XDG_CACHE_HOME/emfm``, else ``~/.cache/emfm``."""
    if given := os.environ.get("EMFM_CACHE_DIR"):
        return Path(given).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "emfm"
