"""Image conversions and grids (uint8 is the exchange format: samples.npz, PNGs)."""
from __future__ import annotations

from pathlib import Path

import torch


def from_uint8(x: torch.Tensor, *, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 [0, 255] → float32 [-1, 1] (x/127.5 − 1): the scale every network here sees."""
    return x.to(device=device, dtype=torch.float32).div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats → uint8, the inverse of from_uint8 (rounded, clamped)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def save_image_grid(images: torch.Tensor, path: str | Path, *, nrow: int, pad: int = 2) -> None:
    """Writes uint8 N×C×H×W images as one PNG grid with `nrow` images per row (greyscale stays greyscale)."""
    from torchvision.io import write_png
    from torchvision.utils import make_grid

    grid = make_grid(images, nrow=nrow, padding=pad, pad_value=0)
    write_png(grid[:1] if images.shape[1] == 1 else grid, str(path))   # make_grid repeats 1 channel to 3
