"""Fashion-MNIST from the files of the Debian package ``dataset-fashion-mnist``.

Installing the package is machine set-up, not library work: ``make data`` does it (with sudo when not
root); here a missing package is an error that says how to get it.
"""

from __future__ import annotations

import os
from pathlib import Path

from dpdm.data.cache import DatasetMissingError, Say, Splits
from dpdm.data.idx import find_idx, read_idx_splits
from dpdm.data.registry import Pins

__all__ = ["DEBIAN_DIR_ENV", "DEBIAN_PACKAGE", "debian_dir", "read_splits"]

DEBIAN_DIR_ENV = "DPDM_FASHION_MNIST_DIR"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEFAULT_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def debian_dir() -> Path:
    """Where the Debian package installs Fashion-MNIST (``$DPDM_FASHION_MNIST_DIR`` overrides)."""
    override = os.environ.get(DEBIAN_DIR_ENV)
    return Path(override) if override else DEFAULT_DEBIAN_DIR


def read_splits(name: str, *, pins: Pins, say: Say) -> Splits:
    """Read the package's four IDX files, each checked against its pin."""
    if name != "fashion_mnist":
        raise DatasetMissingError(f"no Debian source for {name}")
    raw_dir = debian_dir()
    if find_idx(raw_dir, "train-images-idx3-ubyte") is None:
        raise DatasetMissingError(
            f"Debian package {DEBIAN_PACKAGE} not found in {raw_dir}; install it "
            f"(`sudo apt-get install {DEBIAN_PACKAGE}`, or `make data`), "
            f"or point {DEBIAN_DIR_ENV} at a folder holding the Fashion-MNIST IDX files"
        )
    say(f"  reading Debian package files in {raw_dir}")
    return read_idx_splits(raw_dir, pins=pins, say=say)
