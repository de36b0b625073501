"""Denoiser networks."""

from dpdm.nets.unet import DDPMppUNet

__all__ = ["DDPMppUNet"]
