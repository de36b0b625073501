"""A tiny fake CelebA in torchvision's exact on-disk layout, for tests of the celeba32 path.

    <root>/celeba/img_align_celeba/000001.jpg ...      178x218 RGB JPEGs
    <root>/celeba/list_eval_partition.txt               "000001.jpg 0"   (0 train, 1 valid, 2 test)
    <root>/celeba/identity_CelebA.txt                   "000001.jpg 2880"
    <root>/celeba/list_attr_celeba.txt                  count, 40 names, "000001.jpg -1  1 ..."
    <root>/celeba/list_bbox_celeba.txt                  count, header, "000001.jpg    95  71 226 313"
    <root>/celeba/list_landmarks_align_celeba.txt       count, header, 10 ints per row

torchvision's ``CelebA._check_integrity`` compares every txt file with the md5 of the *real* file, which
a fixture cannot match; ``celeba_file_list`` returns a ``CelebA.file_list`` with the fixture's md5s, to
be monkeypatched onto the class so the real reader (and its real integrity check) runs unchanged.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 178, 218  # aligned-and-cropped CelebA
ATTR_NAMES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()
LANDMARK_NAMES = ("lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y "
                  "leftmouth_x leftmouth_y rightmouth_x rightmouth_y").split()


def fake_image(rng: np.random.Generator) -> Image.Image:
    """A smooth random 178x218 RGB image (smooth so JPEG keeps it close to the array)."""
    coarse = rng.integers(0, 256, size=(HEIGHT // 16 + 1, WIDTH // 16 + 1, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.BILINEAR)


def write_fake_celeba(root: str | Path, *, n_train: int = 16, n_valid: int = 4, n_test: int = 4,
                      seed: int = 0) -> dict[str, str]:
    """Write the fake dataset under ``<root>/celeba``; returns ``{txt file name: md5}``.

    Partitions are in file order (train, then valid, then test), as in the real list_eval_partition.txt.
    """
    rng = np.random.default_rng(seed)
    base = Path(root) / "celeba"
    images = base / "img_align_celeba"
    images.mkdir(parents=True, exist_ok=True)
    partition = [0] * n_train + [1] * n_valid + [2] * n_test
    n = len(partition)
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    for name in names:
        fake_image(rng).save(images / name, format="JPEG", quality=95)

    def table(rows: list[str], header: str | None) -> str:
        head = [] if header is None else [str(n), header]
        return "\n".join(head + rows) + "\n"

    attr = rng.choice([-1, 1], size=(n, len(ATTR_NAMES)))
    bbox = rng.integers(0, 400, size=(n, 4))
    landmarks = rng.integers(0, 178, size=(n, len(LANDMARK_NAMES)))
    files = {
        "list_eval_partition.txt": table([f"{f} {p}" for f, p in zip(names, partition, strict=True)], None),
        "identity_CelebA.txt": table([f"{f} {rng.integers(1, 10178)}" for f in names], None),
        # The real attribute header ends with a space; the reader must cope with that.
        "list_attr_celeba.txt": table([f + " " + " ".join(f"{v:2d}" for v in row)
                                       for f, row in zip(names, attr, strict=True)],
                                      " ".join(ATTR_NAMES) + " "),
        "list_bbox_celeba.txt": table([f"{f} " + " ".join(f"{v:4d}" for v in row)
                                       for f, row in zip(names, bbox, strict=True)],
                                      "image_id x_1 y_1 width height"),
        "list_landmarks_align_celeba.txt": table(
            [f"{f} " + " ".join(f"{v:4d}" for v in row) for f, row in zip(names, landmarks, strict=True)],
            " ".join(LANDMARK_NAMES)),
    }
    md5s = {}
    for fname, text in files.items():
        data = text.encode()
        (base / fname).write_bytes(data)
        md5s[fname] = hashlib.md5(data).hexdigest()
    return md5s


def celeba_file_list(md5s: dict[str, str]) -> list[tuple[str, str, str]]:
    """torchvision's ``CelebA.file_list`` with the txt md5s replaced by the fixture's."""
    from torchvision.datasets import CelebA

    return [(file_id, md5s.get(fname, md5), fname) for file_id, md5, fname in CelebA.file_list]
