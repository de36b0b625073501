"""Small builders shared by tests."""
from __future__ import annotations

import torch

from dpdm.diffusion.preconditioning import Denoiser, EDMPreconditioning
from dpdm.nets import DDPMppUNet
from dpdm.training.module import DPDiffusionModule


def tiny_denoiser(*, dtype=torch.float64, seed: int = 0, num_classes: int = 3,
                  resolution: int = 8, attention: bool = True, patch_size: int = 1) -> Denoiser:
    torch.manual_seed(seed)
    net = DDPMppUNet(img_resolution=resolution, in_channels=1, out_channels=1,
                     num_classes=num_classes, model_channels=8, channel_mult=(1, 2),
                     num_blocks=1, attn_resolutions=(resolution // patch_size // 2,) if attention else (),
                     dropout=0.0, zero_init=False, patch_size=patch_size)
    return Denoiser(net, EDMPreconditioning()).to(dtype).train()


class RecordingModule(DPDiffusionModule):
    """The real module, recording the gradient that reaches the wrapped Adam at every real step (after
    clipping, noise, scaling and, under DDP, the all-reduce)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.recorded: list = []

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        inner = self.dp.optimizer.original_optimizer
        real_step = inner.step

        def step(*args, **kwargs):
            self.recorded.append([p.grad.detach().clone() for p in self.denoiser.parameters()])
            return real_step(*args, **kwargs)

        inner.step = step
        return opt
