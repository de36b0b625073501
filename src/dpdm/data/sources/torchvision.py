"""MNIST or Fashion-MNIST through torchvision's downloader (needs its mirrors online)."""

from __future__ import annotations

from pathlib import Path

from dpdm.data.cache import DatasetMissingError, Say, Splits
from dpdm.data.idx import read_idx_splits
from dpdm.data.registry import Pins

__all__ = ["read_splits"]

_CLASSES = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def read_splits(name: str, *, root: Path, pins: Pins, say: Say) -> Splits:
    """Let torchvision download into ``root``, then read its raw/ files ourselves.

    Reading the raw IDX files (instead of ``dataset.data``) lets the same
    pinned IDX checksums cover this source too.
    """
    import torchvision.datasets as tvd  # deferred: slow to import, and only this source needs it

    cls = getattr(tvd, _CLASSES[name])
    say(f"  torchvision.datasets.{cls.__name__}(download=True) into {root}")
    try:
        for train in (True, False):
            dataset = cls(root=str(root), train=train, download=True)
    except Exception as e:  # torchvision raises bare RuntimeError/URLError/OSError
        detail = " ".join(str(e).split()) or type(e).__name__
        if len(detail) > 300:
            detail = detail[:297] + "..."
        raise DatasetMissingError(f"torchvision download failed ({detail})") from e
    return read_idx_splits(Path(dataset.raw_folder), pins=pins, say=say)
