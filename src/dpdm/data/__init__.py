"""Datasets for dpdm: acquisition into a verified on-disk cache, and the Lightning DataModule.

registry.py names the datasets and pins their checksums; cache.py is the on-disk cache; preparation.py
fills it from the modules in sources/ (idx.py reads the MNIST file format); datamodule.py serves it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dpdm.data.cache import DatasetCorruptError, DatasetMissingError, dataset_dir, default_data_dir, load_split
from dpdm.data.preparation import prepare
from dpdm.data.registry import DATASETS, DatasetInfo, dataset_info

if TYPE_CHECKING:
    from dpdm.data.datamodule import ImageDataModule

__all__ = [
    "DATASETS",
    "DatasetCorruptError",
    "DatasetInfo",
    "DatasetMissingError",
    "ImageDataModule",
    "dataset_dir",
    "dataset_info",
    "default_data_dir",
    "load_split",
    "prepare",
]


def __getattr__(name: str) -> Any:
    # Lazy so that `dpdm-data` and anything else needing only the cache
    # doesn't pay for importing Lightning and Opacus (several seconds).
    if name == "ImageDataModule":
        from dpdm.data.datamodule import ImageDataModule

        return ImageDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
