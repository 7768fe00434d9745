"""emfm: self-supervised foundation models for electron microscopy."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_encoder"]


def __getattr__(name: str) -> Any:
    # Lazy, so `emfm --help` and data commands start without importing torch.
    if name == "load_encoder":
        from emfm.export import load_encoder

        return load_encoder
    raise AttributeError(f"module 'emfm' has no attribute {name!r}")
