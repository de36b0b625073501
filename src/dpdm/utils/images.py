"""Image conversions and grids (uint8 is the exchange format: samples.npz, PNGs)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats → uint8 with the inverse of the data module's x/127.5 − 1 scaling."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def save_image_grid(images: torch.Tensor, path: str | Path, *, nrow: int, pad: int = 2) -> None:
    """Writes uint8 N×C×H×W images as one PNG grid with `nrow` images per row."""
    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(images.numpy()):
        r, k = divmod(i, nrow)
        y0, x0 = pad + r * (h + pad), pad + k * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = img.transpose(1, 2, 0)
    mode = "L" if c == 1 else "RGB"
    Image.fromarray(grid[..., 0] if c == 1 else grid, mode=mode).save(path)
