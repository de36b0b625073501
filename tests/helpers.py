"""Small builders shared by tests."""
from __future__ import annotations

import torch

from dpdm.diffusion.preconditioning import Denoiser, EDMPreconditioning
from dpdm.nets import DDPMppUNet


def tiny_denoiser(*, dtype=torch.float64, seed: int = 0, num_classes: int = 3,
                  resolution: int = 8, attention: bool = True) -> Denoiser:
    torch.manual_seed(seed)
    net = DDPMppUNet(img_resolution=resolution, in_channels=1, out_channels=1,
                     num_classes=num_classes, model_channels=8, channel_mult=(1, 2),
                     num_blocks=1, attn_resolutions=(resolution // 2,) if attention else (),
                     dropout=0.0, zero_init=False)
    return Denoiser(net, EDMPreconditioning()).to(dtype).train()
