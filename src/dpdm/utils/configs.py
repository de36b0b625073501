"""Hydra hands nested configs over as DictConfig/ListConfig; the library code takes plain containers."""
from __future__ import annotations

from typing import Any


def to_plain(cfg: Any) -> Any:
    """A DictConfig/ListConfig as a resolved dict/list; anything else unchanged."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg
