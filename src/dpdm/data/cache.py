"""The verified on-disk dataset cache: where it is, how it is written, and how it is read back.

Layout (read by the rest of dpdm, keep it stable)::

    <data_dir>/<name>/train.npz      images uint8 (N, *image_shape), labels int64 (N,)
                                     (1x28x28 for the MNISTs; 3x32x32 and labels -1 for celeba32)
    <data_dir>/<name>/test.npz
    <data_dir>/<name>/checksums.json {"train.npz": sha256, "test.npz": sha256}

``checksums.json`` is written last, so its presence means a verified acquisition finished; it
exists to catch later damage to the npz files (truncated copies, disk errors), not to authenticate
the upstream data, which ``prepare`` does with the pins in ``registry`` before anything is cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dpdm.data.registry import CELEBA_TEXT_FILES, CELEBA_URL, DATASETS, IMAGE_SHAPE, SPLITS, dataset_info
from dpdm.utils.checksums import sha256_file
from dpdm.utils.files import atomic_path

if TYPE_CHECKING:
    import torch

__all__ = [
    "DATA_DIR_ENV",
    "DatasetCorruptError",
    "DatasetMissingError",
    "celeba_raw_dir",
    "dataset_dir",
    "default_data_dir",
    "is_written",
    "load_split",
    "write_cache",
]

DATA_DIR_ENV = "DPDM_DATA_DIR"
CHECKSUMS_FILE = "checksums.json"
CELEBA_RAW_DIR = "celeba_raw"  # default folder (a torchvision root) for the official CelebA files

Splits = dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (images, labels)
Say = Callable[[str], None]  # progress messages


class DatasetMissingError(RuntimeError):
    """The dataset is not cached (or no source could provide it)."""


class DatasetCorruptError(RuntimeError):
    """Cached or downloaded bytes do not match what they must be."""


def default_data_dir() -> Path:
    """``$DPDM_DATA_DIR`` if set, else ``./data``, as an absolute path."""
    return Path(os.environ.get(DATA_DIR_ENV) or "data").expanduser().resolve()


def _root(data_dir: str | Path | None) -> Path:
    return default_data_dir() if data_dir is None else Path(data_dir).expanduser().resolve()


def dataset_dir(name: str, data_dir: str | Path | None = None) -> Path:
    """``<data_dir>/<name>`` as an absolute path (``data_dir`` defaults to ``default_data_dir()``)."""
    dataset_info(name)
    return _root(data_dir) / name


def celeba_raw_dir(data_dir: str | Path | None = None) -> Path:
    """Default folder for the official CelebA files: ``<data_dir>/celeba_raw`` (a torchvision root)."""
    return _root(data_dir) / CELEBA_RAW_DIR


# ---------------------------------------------------------------- hashing


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def array_sha256(array: np.ndarray) -> str:
    # Pin the logical content, not a file format: dtype is fixed to
    # little-endian so the digest is the same on any platform.
    canonical = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return sha256_bytes(memoryview(canonical).cast("B"))


def check_digest(actual: str, expected: str | None, *, what: str) -> None:
    if expected is None:
        raise DatasetCorruptError(f"no pinned checksum for {what}; refusing to trust it")
    if actual != expected:
        raise DatasetCorruptError(f"checksum mismatch for {what}: sha256 {actual}, expected {expected}")


# ---------------------------------------------------------------- writing


def check_arrays(images: np.ndarray, labels: np.ndarray, *, what: str,
                 shape: tuple[int, ...] = IMAGE_SHAPE) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != tuple(shape):
        raise DatasetCorruptError(
            f"{what}: images must be uint8 (N, {', '.join(map(str, shape))}), got {images.dtype} {images.shape}"
        )
    if labels.dtype != np.int64 or labels.shape != (images.shape[0],):
        raise DatasetCorruptError(
            f"{what}: labels must be int64 ({images.shape[0]},), got {labels.dtype} {labels.shape}"
        )


def _atomic_write(path: Path, write: Callable[[object], None]) -> str:
    """Write a cache file whole or not at all (fsynced, see atomic_path); returns its sha256."""
    with atomic_path(path, durable=True) as tmp:
        with open(tmp, "wb") as f:
            write(f)
        digest = sha256_file(tmp)
    return digest


def write_cache(directory: str | Path, splits: Mapping[str, tuple[np.ndarray, np.ndarray]],
                *, image_shape: tuple[int, int, int] | None = None,
                extra_files: Mapping[str, str] | None = None) -> Path:
    """Write ``{split}.npz`` files, any ``extra_files`` (name → text) and, last, ``checksums.json`` (which
    covers them all) into ``directory``.

    ``image_shape`` defaults to that of the dataset the folder is named after (1x28x28 if unknown).
    """
    directory = Path(directory)
    if image_shape is None:
        info = DATASETS.get(directory.name)
        image_shape = info.image_shape if info is not None else IMAGE_SHAPE
    directory.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in splits.items():
        check_arrays(images, labels, what=f"{directory.name} {split}", shape=image_shape)
    # Invalidate first: a crash between npz writes must not leave old
    # checksums vouching for a mix of old and new files.
    (directory / CHECKSUMS_FILE).unlink(missing_ok=True)
    sums: dict[str, str] = {}
    for split, (images, labels) in splits.items():
        fname = f"{split}.npz"
        sums[fname] = _atomic_write(
            directory / fname, lambda f, x=images, y=labels: np.savez(f, images=x, labels=y)
        )
    for fname, content in (extra_files or {}).items():
        sums[fname] = _atomic_write(directory / fname, lambda f, c=content: f.write(c.encode()))
    text = json.dumps(sums, indent=2, sort_keys=True) + "\n"
    _atomic_write(directory / CHECKSUMS_FILE, lambda f: f.write(text.encode()))
    return directory


def is_written(directory: Path) -> bool:
    """Whether a cache folder was written to the end: write_cache writes checksums.json last, so its
    presence says a writer finished (not that the files are intact; reading them verifies that)."""
    return (Path(directory) / CHECKSUMS_FILE).is_file()


# ---------------------------------------------------------------- what to do when it is missing or damaged


def _data_dir_option(data_dir: Path) -> str:
    return "" if data_dir == default_data_dir() else f" --data-dir {data_dir}"


def celeba_missing_message(data_dir: Path, raw_dir: Path | None, problem: str | None = None) -> str:
    where = (raw_dir or data_dir / CELEBA_RAW_DIR) / "celeba"
    extra = _data_dir_option(data_dir)
    if raw_dir is not None:
        extra += f" --raw-dir {raw_dir}"
    why = f" ({problem})" if problem else ""
    return (
        f"dataset 'celeba32' is not prepared in {data_dir / 'celeba32'}{why}. CelebA cannot be downloaded "
        f"automatically: download img_align_celeba.zip and the txt files ({', '.join(CELEBA_TEXT_FILES)}) "
        f"from the official site ({CELEBA_URL}) into {where}/ and run `dpdm-data celeba32{extra}`."
    )


def _missing_message(name: str, directory: Path) -> str:
    if name == "celeba32":
        return celeba_missing_message(directory.parent, None)
    return (
        f"dataset {name!r} is not prepared in {directory}. "
        f"Get it with `dpdm-data {name}{_data_dir_option(directory.parent)}` (or `make data`)."
    )


def _corrupt_message(name: str, directory: Path, problem: str) -> str:
    return (
        f"cached dataset {name!r} in {directory} is corrupt or incomplete: {problem}. "
        f"Delete the folder {directory} and rerun `dpdm-data {name}{_data_dir_option(directory.parent)}` "
        f"(or `make data`)."
    )


# ---------------------------------------------------------------- reading


def _expected_sums(name: str, directory: Path) -> dict[str, str]:
    path = directory / CHECKSUMS_FILE
    if not path.is_file():
        raise DatasetMissingError(_missing_message(name, directory))
    try:
        sums = json.loads(path.read_text())
        if not isinstance(sums, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise DatasetCorruptError(_corrupt_message(name, directory, f"unreadable {CHECKSUMS_FILE} ({e})")) from e
    return sums


def _verified_npz(name: str, directory: Path, split: str, sums: Mapping[str, str]) -> Path:
    path = directory / f"{split}.npz"
    if path.name not in sums:
        raise DatasetCorruptError(_corrupt_message(name, directory, f"{CHECKSUMS_FILE} has no entry for {path.name}"))
    if not path.is_file():
        raise DatasetCorruptError(_corrupt_message(name, directory, f"{path.name} is missing"))
    actual = sha256_file(path)
    if actual != sums[path.name]:
        raise DatasetCorruptError(
            _corrupt_message(name, directory, f"{path.name} sha256 {actual} != recorded {sums[path.name]}")
        )
    return path


def load_split(name: str, split: str, *, data_dir: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one cached split as ``(images uint8 (N, *image_shape), labels int64 (N,))``."""
    directory = dataset_dir(name, data_dir)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    path = _verified_npz(name, directory, split, _expected_sums(name, directory))
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, labels = npz["images"], npz["labels"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise DatasetCorruptError(_corrupt_message(name, directory, f"cannot read {path.name} ({e})")) from e
    try:
        check_arrays(images, labels, what=path.name, shape=dataset_info(name).image_shape)
    except DatasetCorruptError as e:
        raise DatasetCorruptError(_corrupt_message(name, directory, str(e))) from e
    import torch  # deferred: the dpdm-data CLI never needs it and it is slow to import

    return torch.from_numpy(images), torch.from_numpy(labels)


def load_verified(directory: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of a cache folder that no registry entry describes (your own data, `user_data.py`):
    every file checksums.json lists is verified, the arrays are checked against their own shape."""
    def damaged(problem: str) -> DatasetCorruptError:
        return DatasetCorruptError(f"the imported data in {directory} is damaged: {problem}. Delete {directory} "
                                   "and train again: it is imported afresh from data.path")

    try:
        sums = json.loads((directory / CHECKSUMS_FILE).read_text())
    except (OSError, ValueError) as e:
        raise damaged(f"unreadable {CHECKSUMS_FILE} ({e})") from e
    for fname, expected in sums.items():
        if not (directory / fname).is_file() or sha256_file(directory / fname) != expected:
            raise damaged(f"{fname} is missing or does not match its checksum")
    if f"{split}.npz" not in sums:
        raise damaged(f"{CHECKSUMS_FILE} has no entry for {split}.npz")
    with np.load(directory / f"{split}.npz", allow_pickle=False) as npz:
        images, labels = npz["images"], npz["labels"]
    check_arrays(images, labels, what=f"{directory.name} {split}", shape=images.shape[1:])
    import torch

    return torch.from_numpy(images), torch.from_numpy(labels)


def cache_problem(name: str, directory: Path) -> str | None:
    """None if the cache is complete and intact, else why not."""
    try:
        sums = _expected_sums(name, directory)
        for split in SPLITS:
            _verified_npz(name, directory, split, sums)
    except (DatasetMissingError, DatasetCorruptError) as e:
        return str(e)
    return None
