"""emfm: self-supervised foundation models for electron microscopy."""

__version__ = "0.1.0"
