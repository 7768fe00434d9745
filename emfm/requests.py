"""A command's typed request: the keys of its composed config it acts on, unpacked once at the command's top, so
nothing below the command sees the raw config."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

R = TypeVar("R", bound="Request")


@dataclass(frozen=True)
class Request:
    """The base of the requests: each field is the config key of its name."""

    @classmethod
    def from_config(cls: type[R], cfg: DictConfig, **given: Any) -> R:
        """The request's keys of a composed config (keys the config lacks keep their defaults), ``given`` ones
        replaced."""
        values = {f.name: cfg[f.name] for f in fields(cls) if f.name in cfg}
        plain = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in values.items()}
        return cls(**{**plain, **given})
