"""Hydra configs for library code: where conf/ is, composing one, and plain containers from DictConfigs."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# The package's own copy of the configs (dpdm/conf): in a checkout a link to the top-level conf/, in an
# installed wheel the files themselves. Hydra's search path starts here wherever dpdm is installed.
CONFIG_DIR = str((Path(__file__).resolve().parents[1] / "conf").resolve())


def to_plain(cfg: Any) -> Any:
    """A DictConfig/ListConfig as a resolved dict/list; anything else unchanged."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def compose(name: str, overrides=(), *, hydra_config: bool = False):
    """conf/<name>.yaml composed with `overrides`, as the console script of that name would see it
    (`hydra_config`: with the `hydra` node, as a running app has it)."""
    from hydra import compose as _compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return _compose(name, list(overrides), return_hydra_config=hydra_config)


def override_value(v: Any) -> str:
    """A scalar as Hydra's override grammar reads it back (null, true, inf, quoted strings)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    raise TypeError(f"no override syntax for {type(v).__name__} value {v!r}")
