"""CelebA 32x32 from the official files, read with ``torchvision.datasets.CelebA(download=False)``.

CelebA cannot be downloaded here (Google Drive quota): the official files go in
``<data_dir>/celeba_raw/celeba/`` (or ``raw_dir``). torchvision's integrity check verifies the five txt
files against their official md5s; the images are not hashed upstream, so there are no array pins and
the cache's npz checksums are the only guard after preprocessing (see ``celeba_transform``).
"""

from __future__ import annotations

import time
import zipfile
from pathlib import Path

import numpy as np

from dpdm.data.cache import (
    DatasetCorruptError,
    DatasetMissingError,
    Say,
    Splits,
    celeba_missing_message,
    celeba_raw_dir,
)
from dpdm.data.registry import CELEBA_SIZE, CELEBA_TEXT_FILES, CELEBA_URL

__all__ = ["celeba_transform", "read_splits"]

CELEBA_CROP = 140
CELEBA_LABEL = -1  # unconditional: no class label (same value dpdm-sample writes for unconditional nets)
# dpdm split -> torchvision CelebA split (the official list_eval_partition.txt; "valid" is unused)
CELEBA_SPLITS = {"train": "train", "test": "test"}


def _torchvision_root(raw_dir: Path) -> Path:
    """The torchvision root for ``raw_dir``: itself, or its parent if ``raw_dir`` is the ``celeba/`` folder."""
    if not (raw_dir / "celeba").is_dir() and raw_dir.name == "celeba" and (
        (raw_dir / "img_align_celeba").is_dir() or (raw_dir / "list_eval_partition.txt").is_file()
    ):
        return raw_dir.parent
    return raw_dir


def celeba_transform(image: object) -> np.ndarray:
    """Aligned CelebA PIL image (178x218) -> uint8 (3, 32, 32).

    Center crop 140x140 (rows 39..178, cols 19..158 of 178x218: the face, without most of the
    background and hair), then resize to 32x32 with PIL's antialiased bilinear filter. This is the
    crop used for CelebA 32/64 in the score-based / DP generative-model literature (NCSN, Score SDE,
    DP-Sinkhorn, DPDM); cropping to a square first keeps the aspect ratio of the face.
    """
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    img = image.convert("RGB")  # type: ignore[attr-defined]
    w, h = img.size
    if w < CELEBA_CROP or h < CELEBA_CROP:  # center_crop would pad a small image; refuse it instead
        raise DatasetCorruptError(f"CelebA image is {w}x{h}, smaller than the {CELEBA_CROP}x{CELEBA_CROP} crop")
    img = TF.center_crop(img, [CELEBA_CROP, CELEBA_CROP])
    # On a PIL image torchvision resizes with PIL itself (antialiased bilinear).
    img = TF.resize(img, [CELEBA_SIZE, CELEBA_SIZE], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def _check_files(root: Path, data_dir: Path, raw_dir: Path | None, say: Say) -> None:
    """Missing files -> DatasetMissingError naming where to put them; bad md5 -> DatasetCorruptError.

    Uses torchvision's own ``CelebA.file_list`` md5s and ``check_integrity``.
    """
    from torchvision.datasets import CelebA
    from torchvision.datasets.utils import check_integrity

    base = root / CelebA.base_folder
    images = base / "img_align_celeba"
    missing = [f for f in CELEBA_TEXT_FILES if not (base / f).is_file()]
    if not images.is_dir():
        archive = base / "img_align_celeba.zip"
        if archive.is_file():
            say(f"  extracting {archive} (about 200k files, once)")
            try:
                with zipfile.ZipFile(archive) as zf:
                    zf.extractall(base)
            except (OSError, zipfile.BadZipFile) as e:
                raise DatasetCorruptError(f"{archive}: cannot extract ({e})") from e
        if not images.is_dir():
            missing.insert(0, "img_align_celeba/ (or img_align_celeba.zip)")
    if missing:
        raise DatasetMissingError(
            celeba_missing_message(data_dir, raw_dir, f"missing in {base}: {', '.join(missing)}"))
    for _, md5, fname in CelebA.file_list:
        if Path(fname).suffix in (".zip", ".7z"):
            continue  # torchvision allows the archive to be deleted once extracted
        if not check_integrity(str(base / fname), md5):
            raise DatasetCorruptError(
                f"{base / fname}: md5 does not match the official file ({md5}); download it again from {CELEBA_URL}")
    say(f"  {base}: the txt files match torchvision's md5s")


def _preprocess(root: Path, *, say: Say) -> Splits:
    """Read each split through ``torchvision.datasets.CelebA(download=False)`` and preprocess it."""
    from torchvision.datasets import CelebA

    splits: Splits = {}
    for split, tv_split in CELEBA_SPLITS.items():
        try:
            dataset = CelebA(str(root), split=tv_split, target_type=[], transform=celeba_transform, download=False)
        except RuntimeError as e:  # integrity failure after our own checks passed: a race or a torchvision change
            raise DatasetCorruptError(f"torchvision.datasets.CelebA({root}): {e}") from e
        n = len(dataset)
        if n == 0:
            raise DatasetCorruptError(f"{root}: list_eval_partition.txt has no {tv_split} images")
        images = np.empty((n, 3, CELEBA_SIZE, CELEBA_SIZE), dtype=np.uint8)
        every = max(1, min(10000, n // 20))
        start = time.monotonic()
        say(f"  {split}: preprocessing {n} images (crop {CELEBA_CROP}, resize {CELEBA_SIZE})")
        for i in range(n):
            try:
                images[i] = dataset[i][0]
            except FileNotFoundError as e:
                raise DatasetMissingError(f"{root}: image listed in list_eval_partition.txt is missing ({e})") from e
            except OSError as e:  # PIL.UnidentifiedImageError and truncated files
                raise DatasetCorruptError(f"{root}: cannot decode {dataset.filename[i]} ({e})") from e
            done = i + 1
            if done % every == 0 or done == n:
                elapsed = time.monotonic() - start
                eta = elapsed / done * (n - done)
                say(f"    {split}: {done}/{n} images ({100 * done / n:.0f}%, {elapsed:.0f} s, ~{eta:.0f} s left)")
        splits[split] = (images, np.full((n,), CELEBA_LABEL, dtype=np.int64))
    return splits


def read_splits(data_dir: Path, *, raw_dir: str | Path | None, say: Say) -> Splits:
    """Check the official files under ``raw_dir`` (default ``<data_dir>/celeba_raw``) and preprocess them.

    ``raw_dir`` is the torchvision root holding ``celeba/``, or that ``celeba/`` folder itself.
    """
    given = None if raw_dir is None else Path(raw_dir).expanduser().resolve()
    root = _torchvision_root(given if given is not None else celeba_raw_dir(data_dir))
    say(f"celeba32: reading the official CelebA files under {root}")
    _check_files(root, data_dir, given, say)
    return _preprocess(root, say=say)
