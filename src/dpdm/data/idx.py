"""The IDX format of the original MNIST files, which Fashion-MNIST copies.

Hand-written rather than torchvision's ``read_sn3_pascalvincent_tensor`` for strict size checks that
reader does not make: torchvision's MNIST loaders call it with ``strict=False`` and its header checks are
asserts (gone under ``python -O``), so a truncated or padded file fails with an opaque error from
``Tensor.view``. Here a bad magic number or a payload that is not exactly the size the header says is a
``DatasetCorruptError`` naming the file. It also reads the Debian package's .gz files as they are.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from dpdm.data.cache import DatasetCorruptError, DatasetMissingError, Say, Splits, check_digest, sha256_bytes
from dpdm.data.registry import IMAGE_SHAPE, SPLITS, Pins

__all__ = ["read_idx", "read_idx_splits"]

_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# IDX file stem per split, as named upstream and in torchvision's raw/ folder.
_STEMS = {"train": "train", "test": "t10k"}


def _maybe_gunzip(data: bytes) -> bytes:
    # Sniff the gzip magic rather than trusting the file name: torchvision's
    # raw/ folder holds decompressed files, the Debian package compressed ones.
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _read_payload(path: Path) -> bytes:
    try:
        return _maybe_gunzip(path.read_bytes())
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DatasetCorruptError(f"{path}: cannot read ({e})") from e


def _parse_idx(data: bytes, *, source: str = "<bytes>") -> np.ndarray:
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetCorruptError(f"{source}: not an IDX file (bad magic number)")
    dtype = _IDX_DTYPES[data[2]]
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetCorruptError(f"{source}: IDX header truncated")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise DatasetCorruptError(
            f"{source}: IDX payload has {len(data) - header} bytes, header says {expected}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (plain or gzip-compressed) into a native-endian array."""
    path = Path(path)
    return _parse_idx(_read_payload(path), source=str(path))


def find_idx(raw_dir: Path, stem: str) -> Path | None:
    """``raw_dir/stem`` or ``raw_dir/stem.gz``, whichever exists."""
    for candidate in (raw_dir / stem, raw_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx_splits(raw_dir: Path, *, pins: Pins, say: Say) -> Splits:
    """Read the four upstream IDX files from ``raw_dir``, each checked against its pin."""
    splits: Splits = {}
    for split in SPLITS:
        parts = []
        for kind, suffix in (("images", "idx3-ubyte"), ("labels", "idx1-ubyte")):
            stem = f"{_STEMS[split]}-{kind}-{suffix}"
            path = find_idx(raw_dir, stem)
            if path is None:
                raise DatasetMissingError(f"{raw_dir}: {stem}[.gz] not found")
            data = _read_payload(path)
            check_digest(sha256_bytes(data), pins.artifacts.get(stem), what=f"{path} (decompressed)")
            parts.append(_parse_idx(data, source=str(path)))
        images, labels = parts
        say(f"  read {split}: {images.shape[0]} images from {raw_dir}")
        splits[split] = (images.reshape(-1, *IMAGE_SHAPE), labels.astype(np.int64))
    return splits
