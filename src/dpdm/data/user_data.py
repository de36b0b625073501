"""Your own images, imported once into the verified cache: an image folder or an npz file.

* ``data=image_folder data.path=<dir>``: one sub-folder per class (the class is the folder's name, in
  sorted order), or the images directly in ``<dir>`` for an unconditional model.
* ``data=npz data.path=<file>``: ``x`` uint8, N×C×H×W, N×H×W×C or N×H×W (grey); optional ``y``, integer
  class labels 0..K−1.

The import decides everything before training starts, because N enters ε: it never drops an example. A
file it cannot read, mixed sizes or colour modes, an empty class folder, labels out of range: each is
refused with one message naming the files or the count, and nothing is written. With
``data.resolution=R`` every image is resized (shorter side to R, antialiased) and centre-cropped to R×R
on import; without it, the images must already be square and of one size. The result is
``<data_dir>/user/<name>/``: train.npz (the cache's layout), meta.json (shape, classes, where it came
from) and checksums.json, written last. The folder's name changes when the source files or the
resolution do, so an edited dataset is imported afresh and a finished import is never rewritten.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dpdm.data.cache import DatasetCorruptError, DatasetMissingError, is_written, load_verified, write_cache

__all__ = ["USER_KINDS", "BadDataError", "UserDataset", "import_user_data", "load_user_data", "user_cache_dir"]

USER_KINDS = ("image_folder", "npz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
META_FILE = "meta.json"
# Grey and colour modes read without loss ("1" and "P" are encodings of grey and colour images).
GREY_MODES, COLOUR_MODES = {"L": "L", "1": "L"}, {"RGB": "RGB", "P": "RGB"}
SHOWN = 5  # file names quoted in a message; the rest are counted

Say = Callable[[str], None]


class BadDataError(DatasetCorruptError):
    """The user's data cannot be imported as it is; the message says which files and what to do."""


@dataclass(frozen=True)
class UserDataset:
    """What an import produced (meta.json)."""

    kind: str
    source: str
    num_examples: int
    image_shape: tuple[int, int, int]
    num_classes: int            # 0: unconditional
    class_names: tuple[str, ...]
    resolution: int | None

    @classmethod
    def from_json(cls, d: dict) -> UserDataset:
        return cls(**{**d, "image_shape": tuple(d["image_shape"]), "class_names": tuple(d["class_names"])})


def _names(paths: Sequence[Path | str], root: Path | None = None) -> str:
    shown = [str(Path(p).relative_to(root)) if root else str(p) for p in paths[:SHOWN]]
    more = f" and {len(paths) - SHOWN} more" if len(paths) > SHOWN else ""
    return ", ".join(shown) + more


# ---------------------------------------------------------------- where an import lives


def _source_files(kind: str, path: Path) -> list[Path]:
    if kind == "npz":
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(path).parts))


def user_cache_dir(kind: str, path: str | Path, *, data_dir: str | Path, resolution: int | None) -> Path:
    """``<data_dir>/user/<kind>-<stem>-<key>``: the key hashes the source files' names, sizes and
    modification times and the resolution, so any change to them is a new import."""
    path = _check_source(kind, path)
    h = hashlib.sha256(f"{kind}\0{path}\0{resolution}".encode())
    for f in _source_files(kind, path):
        st = f.stat()
        h.update(f"\0{f.relative_to(path.parent)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    res = f"-{resolution}px" if resolution else ""
    return Path(data_dir).expanduser().resolve() / "user" / f"{kind}-{path.stem}{res}-{h.hexdigest()[:12]}"


def _check_source(kind: str, path: str | Path | None) -> Path:
    if kind not in USER_KINDS:
        raise ValueError(f"unknown kind of user data {kind!r}; choose from {', '.join(USER_KINDS)}")
    if path is None or str(path) in ("", "???"):
        raise ValueError(f"data={kind} needs data.path=<{'folder' if kind == 'image_folder' else 'file.npz'}>")
    path = Path(path).expanduser().resolve()
    if kind == "image_folder" and not path.is_dir():
        raise DatasetMissingError(f"data.path={path} is not a folder of images (data=image_folder)")
    if kind == "npz" and not path.is_file():
        raise DatasetMissingError(f"data.path={path} is not an npz file (data=npz)")
    return path


# ---------------------------------------------------------------- reading and checking


def _to_square(x, resolution: int):
    """uint8 C×H×W tensor → C×R×R: shorter side resized to R (antialiased bilinear), centre crop."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    x = TF.resize(x, resolution, interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.center_crop(x, [resolution, resolution])


def _stack(images: list, files: Sequence[str], resolution: int | None, root: Path | None) -> np.ndarray:
    """One uint8 N×C×H×W array, refusing mixed sizes or non-square images unless resizing."""
    import torch

    if resolution is not None:
        # A copy: decoded images may be read-only arrays, which torch would only warn about sharing.
        return torch.stack([_to_square(torch.tensor(x), resolution) for x in images]).numpy()
    sizes: dict[tuple[int, int], list[str]] = {}
    for x, f in zip(images, files, strict=True):
        sizes.setdefault(tuple(x.shape[-2:]), []).append(f)
    if len(sizes) > 1:
        parts = "; ".join(f"{h}×{w}: {len(fs)} ({_names(fs, root)})" for (h, w), fs in
                          sorted(sizes.items(), key=lambda kv: -len(kv[1])))
        raise BadDataError(f"images of different sizes ({parts}); resize them to one size, or import with "
                           "data.resolution=<R> to resize and centre-crop every image to R×R")
    ((h, w),) = sizes
    if h != w:
        raise BadDataError(f"the images are {h}×{w}, not square; import with data.resolution=<R> to resize "
                           "and centre-crop them to R×R")
    return np.stack(images)


def _read_image(f: Path):
    """(mode family, uint8 C×H×W array) of one image file; BadDataError-worthy problems as a string."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(f) as img:
            img.load()  # decodes everything: a truncated file fails here, not during training
            mode = img.mode
            if mode in GREY_MODES:
                arr = np.asarray(img.convert(GREY_MODES[mode]), dtype=np.uint8)[None]
                return "grey", arr
            if mode in COLOUR_MODES:
                arr = np.asarray(img.convert(COLOUR_MODES[mode]), dtype=np.uint8).transpose(2, 0, 1)
                return "colour", arr
            return f"mode {mode}", None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        return f"unreadable ({type(e).__name__})", None


Arrays = tuple[np.ndarray, np.ndarray, tuple[str, ...]]  # images N×C×H×W, labels, class names


def read_image_folder(path: Path, *, resolution: int | None, say: Say) -> Arrays:
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    class_dirs = [p for p in entries if p.is_dir()]
    loose = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if class_dirs and loose:
        raise BadDataError(f"{path} holds both class folders ({_names(class_dirs, path)}) and images directly "
                           f"({_names(loose, path)}); put every image in its class's folder, or use a flat "
                           "folder for an unconditional model")
    groups = [(d.name, d) for d in class_dirs] if class_dirs else [("", path)]
    files, labels, ignored = [], [], []
    for label, (_, folder) in enumerate(groups):
        found = sorted(p for p in folder.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(folder).parts))
        images = [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES]
        ignored += [p for p in found if p not in images]
        if not images:
            raise BadDataError(f"class folder {folder} has no images (looked for "
                               f"{', '.join(IMAGE_SUFFIXES)}); add images or remove the folder")
        files += images
        labels += [label if class_dirs else -1] * len(images)
    if ignored:
        say(f"  not images (by their suffix), not imported: {len(ignored)} files ({_names(ignored, path)})")
    say(f"  reading {len(files)} images from {path}")
    read = [_read_image(f) for f in files]
    problems: dict[str, list[Path]] = {}
    for (kind, _), f in zip(read, files, strict=True):
        if kind not in ("grey", "colour"):
            problems.setdefault(kind, []).append(f)
    if problems:
        parts = "; ".join(f"{k}: {len(fs)} files ({_names(fs, path)})" for k, fs in problems.items())
        raise BadDataError(f"cannot import these images ({parts}). Fix or remove them; grey (L) and colour "
                           "(RGB) images are supported (convert others, e.g. RGBA, first)")
    families: dict[str, list[Path]] = {}
    for (kind, _), f in zip(read, files, strict=True):
        families.setdefault(kind, []).append(f)
    if len(families) > 1:
        grey, colour = families["grey"], families["colour"]
        raise BadDataError(f"mixed grey and colour images: {len(grey)} grey ({_names(grey, path)}) and "
                           f"{len(colour)} colour ({_names(colour, path)}); convert them all to one mode")
    x = _stack([a for _, a in read], [str(f.relative_to(path)) for f in files], resolution, None)
    return x, np.asarray(labels, dtype=np.int64), tuple(name for name, _ in groups) if class_dirs else ()


def read_npz(path: Path, *, resolution: int | None, say: Say) -> Arrays:
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            if "x" not in keys:
                raise BadDataError(f"{path} has no array x (found {sorted(keys)}); save the images as x "
                                   "(uint8, N×C×H×W or N×H×W×C) and the labels, if any, as y")
            x, y = f["x"], (f["y"] if "y" in keys else None)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise BadDataError(f"cannot read {path} as an npz file ({type(e).__name__}: {e}); it may be "
                           "truncated: write it again with numpy.savez") from e
    if x.dtype != np.uint8:
        raise BadDataError(f"{path}: x is {x.dtype}, not uint8; store pixel values 0..255 as uint8 "
                           "(e.g. (x * 255).round().astype(np.uint8) for floats in [0, 1])")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise BadDataError(f"{path}: x has shape {x.shape}; expected N×C×H×W or N×H×W×C with C = 1 or 3, "
                           "or N×H×W")
    if len(x) == 0:
        raise BadDataError(f"{path}: x holds no images")
    if y is None:
        labels, class_names = np.full(len(x), -1, dtype=np.int64), ()
    else:
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise BadDataError(f"{path}: y must be integer labels of shape ({len(x)},), got {y.dtype} {y.shape}")
        bad = np.flatnonzero(y < 0)
        if bad.size:
            raise BadDataError(f"{path}: labels out of range: {bad.size} negative labels (at indices "
                               f"{_names([str(i) for i in bad])}); classes are 0..K−1 (omit y for an "
                               "unconditional model)")
        labels = y.astype(np.int64)
        num_classes = int(labels.max()) + 1
        missing = sorted(set(range(num_classes)) - set(np.unique(labels).tolist()))
        if missing:
            raise BadDataError(f"{path}: labels out of range: classes run 0..{num_classes - 1} but "
                               f"{len(missing)} of them have no examples ({_names([str(m) for m in missing])});"
                               " renumber the classes 0..K−1")
        class_names = tuple(str(c) for c in range(num_classes))
    say(f"  read {len(x)} images {x.shape[1]}×{x.shape[2]}×{x.shape[3]} from {path}")
    x = _stack(list(x), [f"x[{i}]" for i in range(len(x))], resolution, None)
    return x, labels, class_names


# ---------------------------------------------------------------- import and load


def import_user_data(kind: str, path: str | Path, *, data_dir: str | Path, resolution: int | None = None,
                     say: Say = print) -> Path:
    """Import once (idempotent): the cache folder holding train.npz, meta.json and checksums.json."""
    if resolution is not None and int(resolution) < 1:
        raise ValueError(f"data.resolution must be a positive number of pixels or null, got {resolution}")
    directory = user_cache_dir(kind, path, data_dir=data_dir, resolution=resolution)
    if is_written(directory):
        return directory
    source = _check_source(kind, path)
    read = read_image_folder if kind == "image_folder" else read_npz
    x, y, class_names = read(source, resolution=resolution, say=say)
    meta = UserDataset(kind=kind, source=str(source), num_examples=len(x), image_shape=tuple(x.shape[1:]),
                       num_classes=len(class_names), class_names=class_names, resolution=resolution)
    # Everything is checked before the first byte is written; write_cache writes checksums.json last.
    write_cache(directory, {"train": (x, y)}, image_shape=meta.image_shape,
                extra_files={META_FILE: json.dumps(asdict(meta), indent=1) + "\n"})
    c, h, w = meta.image_shape
    what = f"{meta.num_classes} classes" if meta.num_classes else "unconditional"
    say(f"{kind}: imported {meta.num_examples} examples ({c}×{h}×{w}, {what}) from {source} into {directory}")
    return directory


def load_user_data(directory: Path):
    """(images uint8 tensor, labels int64 tensor, UserDataset) of an import, checksums verified."""
    images, labels = load_verified(directory, "train")
    try:
        meta = UserDataset.from_json(json.loads((directory / META_FILE).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetCorruptError(f"{directory / META_FILE} is unreadable ({e}); delete {directory} and "
                                  "train again to re-import") from e
    return images, labels, meta
