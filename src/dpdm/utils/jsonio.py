"""JSON files of a run (privacy.json, summary.json, eval.json, reproduce state): read leniently, write
atomically (a reader never sees half a file, a crash never leaves one)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from dpdm.utils.files import atomic_path


def read_json(path) -> dict | None:
    """The parsed file, or None if it is missing or not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_json_atomic(path, obj, *, sort_keys: bool = True) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys, default=_jsonable) + "\n")


def _jsonable(v):
    if isinstance(v, float) and math.isinf(v):
        return None
    import torch

    if isinstance(v, torch.Tensor):
        return v.tolist()
    raise TypeError(f"not JSON serializable: {type(v)}")
