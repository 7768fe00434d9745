"""emfm: self-supervised foundation models for electron microscopy."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("emfm")        # pyproject.toml's, as installed
except PackageNotFoundError:             # a source tree that was never installed
    __version__ = "unknown"
__all__ = ["load_encoder"]


def __getattr__(name: str) -> Any:
    # Lazy, so `emfm --help` and data commands start without importing torch.
    if name == "load_encoder":
        from emfm.checkpoints import load_encoder

        return load_encoder
    raise AttributeError(f"module 'emfm' has no attribute {name!r}")
