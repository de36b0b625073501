"""DDPM++ U-Net denoiser (the SongUNet / DDPM++ family used by EDM and DPDM).

The network maps noisy images, a per-row noise label (e.g. EDM's
``c_noise = ln(sigma) / 4``) and optional class labels to an output of the
same spatial size; any preconditioning is the caller's business.

Class conditioning uses ``nn.Embedding(num_classes + 1, emb)`` whose last row
is the "no label" token for classifier-free guidance.  The network never drops
labels itself: the loss decides which rows become unconditional, so that the
randomness is explicit (and the embedding is used on every forward, which
Opacus needs to produce a per-sample gradient for it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpdm.nets.layers import PositionalEmbedding, ResBlock, group_norm

__all__ = ["DDPMppUNet"]


class DDPMppUNet(nn.Module):
    """DDPM++ U-Net; the defaults are DPDM's MNIST/Fashion-MNIST configuration."""

    def __init__(
        self,
        *,
        img_resolution: int = 28,
        in_channels: int = 1,
        out_channels: int = 1,
        num_classes: int = 10,
        model_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2),
        channel_mult_emb: int = 4,
        channel_mult_noise: int = 1,
        num_blocks: int = 2,
        attn_resolutions: Sequence[int] = (7,),
        dropout: float = 0.1,
        num_heads: int = 1,
        max_positions: float = 10_000.0,
        zero_init: bool = True,
        patch_size: int = 1,
        unpatch_channels: int = 0,
        full_res_blocks: int = 0,
    ) -> None:
        super().__init__()
        if num_classes < 0:
            raise ValueError("num_classes must be >= 0")
        if patch_size < 1 or img_resolution % patch_size:
            raise ValueError(f"patch_size={patch_size} must be >= 1 and divide the resolution {img_resolution}")
        if unpatch_channels < 0 or (unpatch_channels and patch_size == 1):
            raise ValueError(f"unpatch_channels={unpatch_channels}: a full-resolution output conv needs "
                             f"patch_size > 1 (got {patch_size}) and at least one channel; 0 turns it off")
        if full_res_blocks < 0 or (full_res_blocks and not unpatch_channels):
            raise ValueError(f"full_res_blocks={full_res_blocks}: residual blocks at full resolution run on the "
                             f"unpatch_channels (got {unpatch_channels}); set unpatch_channels > 0, or 0 blocks")
        grid = img_resolution // patch_size  # the resolution the U-Net itself runs at
        if grid % 2 ** (len(channel_mult) - 1):
            raise ValueError(f"resolution {grid} (image {img_resolution} / patch {patch_size}) not divisible "
                             f"by 2^{len(channel_mult) - 1}")
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_classes = num_classes
        self.patch_size = patch_size
        self.grid_resolution = grid
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise

        self.map_noise = PositionalEmbedding(noise_channels, max_positions)
        self.map_layer0 = nn.Linear(noise_channels, emb_channels)
        self.map_layer1 = nn.Linear(emb_channels, emb_channels)
        self.map_label = nn.Embedding(num_classes + 1, emb_channels) if num_classes else None

        block = dict(emb_channels=emb_channels, num_heads=num_heads, dropout=dropout)
        # patch_size p > 1: p×p pixel blocks become channels (pixel unshuffle) so every layer runs at
        # resolution/p: about p² fewer FLOPs per image, the cheapest lever on a CPU (docs/recipes.md).
        self.input_conv = nn.Conv2d(in_channels * patch_size**2, model_channels, kernel_size=3, padding=1)
        self.enc, skip_channels = self._build_encoder(
            model_channels, channel_mult, num_blocks, attn_resolutions, block
        )
        top = model_channels * channel_mult[-1]
        self.mid = nn.ModuleList(
            [ResBlock(top, top, attention=True, **block), ResBlock(top, top, **block)]
        )
        self.dec, last = self._build_decoder(
            model_channels, channel_mult, num_blocks, attn_resolutions, skip_channels, block
        )
        self.out_norm = group_norm(last)
        # On patches, out_conv predicts the p² pixels of a block as p² separate channels, and no layer
        # sees the image grid. unpatch_channels c > 0 ends the net at full resolution instead: c channels
        # per pixel, shuffled to the image grid and mixed by a 3x3 conv there (U-ViT, Bao et al. 2023,
        # ends with such a conv). Measured on MNIST (docs/recipes.md, mnist_fast_proxy): it costs no
        # time, but it does not remove the speckle of the patch nets' samples; the presets leave it off.
        # full_res_blocks n puts n residual blocks (conditioned on the noise level and label) between the
        # shuffle and that conv: a linear 3x3 filter cannot threshold an isolated pixel away, a GroupNorm +
        # SiLU block can. Measured (same study, two seeds): one block at c = 16 removes the speckle and lifts
        # recall from 0.6 to 0.75 for 10-12% more time per DP step, with the downstream CNN within the seed
        # spread. At ε = 1 (mnist_eps1_levers) it raises recall too but costs the CNN ~2 points. On the
        # Fashion-MNIST proxy (fmnist_fullres) it improves every diagnostic with the CNN level or better,
        # but at full size (fmnist_fullres_full) it cost the CNN 1.2-2.1 points: the presets leave it off.
        head = unpatch_channels or out_channels
        self.out_conv = nn.Conv2d(last, head * patch_size**2, kernel_size=3, padding=1)
        self.full_res = nn.ModuleList(
            [ResBlock(unpatch_channels, unpatch_channels, **block) for _ in range(full_res_blocks)]
        )
        self.unpatch_conv = (nn.Conv2d(unpatch_channels, out_channels, kernel_size=3, padding=1)
                             if unpatch_channels else None)
        self.reset_parameters(zero_init=zero_init)

    @property
    def null_label(self) -> int:
        """Embedding index of the "no label" token (equals ``num_classes``)."""
        return self.num_classes

    def _build_encoder(
        self, model_channels: int, channel_mult: Sequence[int], num_blocks: int,
        attn_resolutions: Sequence[int], block: dict,
    ) -> tuple[nn.ModuleList, list[int]]:
        blocks, skips = nn.ModuleList(), [model_channels]
        res, ch = self.grid_resolution, model_channels
        for level, mult in enumerate(channel_mult):
            if level > 0:
                res //= 2
                blocks.append(ResBlock(ch, ch, resample_mode="down", **block))
                skips.append(ch)
            for _ in range(num_blocks):
                out = model_channels * mult
                blocks.append(ResBlock(ch, out, attention=res in attn_resolutions, **block))
                ch = out
                skips.append(ch)
        return blocks, skips

    def _build_decoder(
        self, model_channels: int, channel_mult: Sequence[int], num_blocks: int,
        attn_resolutions: Sequence[int], skips: list[int], block: dict,
    ) -> tuple[nn.ModuleList, int]:
        # Consumes the encoder skips in reverse; as in DDPM++ only the last
        # block of each level attends, which keeps the decoder cheaper.
        blocks, skips = nn.ModuleList(), list(skips)
        res = self.grid_resolution // 2 ** (len(channel_mult) - 1)
        ch = model_channels * channel_mult[-1]
        for level in reversed(range(len(channel_mult))):
            if level < len(channel_mult) - 1:
                res *= 2
                blocks.append(ResBlock(ch, ch, resample_mode="up", **block))
            for idx in range(num_blocks + 1):
                out = model_channels * channel_mult[level]
                attn = idx == num_blocks and res in attn_resolutions
                blocks.append(ResBlock(ch + skips.pop(), out, attention=attn, **block))
                ch = out
        assert not skips
        return blocks, ch

    @torch.no_grad()
    def reset_parameters(self, zero_init: bool = True) -> None:
        """Xavier-uniform weights and zero biases (as DDPM++), GroupNorm at identity.

        With ``zero_init`` the last conv of every residual branch, every
        attention projection and the output conv start at zero, so each block
        starts as its skip path and the untrained net outputs zeros.  The
        full-resolution conv after it (``unpatch_channels``) keeps its Xavier
        weights: two zero layers in a row would pass each other no gradient.
        """
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight)
        if zero_init:
            last = [m.conv1 for m in self.modules() if isinstance(m, ResBlock)]
            last += [m.attn.proj for m in self.modules() if isinstance(m, ResBlock) and m.attn]
            for conv in last + [self.out_conv]:
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)

    def embed(self, noise_labels: Tensor, class_labels: Tensor | None, dtype: torch.dtype) -> Tensor:
        emb = self.map_noise(noise_labels.reshape(-1).to(dtype))
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            if class_labels is None:
                class_labels = torch.full_like(noise_labels.reshape(-1), self.null_label, dtype=torch.long)
            emb = emb + self.map_label(class_labels.reshape(-1).long())
        elif class_labels is not None:
            raise ValueError("class_labels given to an unconditional network (num_classes=0)")
        # Every block projects SiLU(emb); computing it once is equivalent.
        return F.silu(emb)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None) -> Tensor:
        # A broadcast scalar noise label would silently couple the rows, which
        # breaks per-sample gradients; demand one label per row.
        if noise_labels.numel() != x.shape[0]:
            raise ValueError(f"need {x.shape[0]} noise labels, got {noise_labels.numel()}")
        emb = self.embed(noise_labels, class_labels, x.dtype)
        if self.patch_size > 1:
            x = F.pixel_unshuffle(x, self.patch_size)
        h = self.input_conv(x)
        skips = [h]
        for blk in self.enc:
            h = blk(h, emb)
            skips.append(h)
        for blk in self.mid:
            h = blk(h, emb)
        for blk in self.dec:
            if blk.resample_mode == "up":
                h = blk(h, emb)
            else:
                h = blk(torch.cat([h, skips.pop()], dim=1), emb)
        out = self.out_conv(F.silu(self.out_norm(h)))
        if self.patch_size > 1:
            out = F.pixel_shuffle(out, self.patch_size)
        for blk in self.full_res:
            out = blk(out, emb)
        return self.unpatch_conv(out) if self.unpatch_conv is not None else out
