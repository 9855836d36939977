"""Class-conditional UNet in the DDPM/DDIM layout, with a learned null class for classifier-free guidance.

With `UNetConfig` named `sa` it reproduces the Selective Amnesia / SalUn backbone exactly, parameter names
included, so that checkpoints trained with the published code load by name (see tests/test_unet.py).
A label of -1 (`NULL_CLASS`) selects the learned null embedding: the unconditional branch of guidance.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.config import UNetConfig

NULL_CLASS = -1


def swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


def timestep_embedding(timesteps: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding [sin, cos] of float timesteps, as in the DDIM codebase."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) / (half - 1) * torch.arange(half, dtype=torch.float32, device=timesteps.device))
    args = timesteps.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class Embedding(nn.Module):
    """Two linear layers with swish between; parameter names `dense.0`, `dense.1`."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.dense = nn.ModuleList([nn.Linear(in_dim, out_dim), nn.Linear(out_dim, out_dim)])

    def forward(self, x: Tensor) -> Tensor:
        return self.dense[1](swish(self.dense[0](x)))


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, dropout: float, groups: int = 32):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_cemb_proj = nn.Linear(2 * emb_channels, out_channels)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = h + self.temb_cemb_proj(emb)[:, :, None, None]
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, through PyTorch's fused attention."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x)
        # (B, 1, HW, C): one head of width C, so the softmax scale is 1/sqrt(C) as published.
        q, k, v = (conv(h).reshape(b, 1, c, hgt * wid).transpose(2, 3) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(2, 3).reshape(b, c, hgt, wid)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: residual blocks, attention after each where enabled, optional resampling."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class ConditionalUNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        ch, mults, emb_ch, groups = config.ch, tuple(config.ch_mult), config.ch * 4, config.norm_groups
        # Created in the published order, so that one seed gives the published initial weights; the null class
        # embedding starts standard normal, as published (its parameter is still listed first by name).
        self.temb = Embedding(ch, emb_ch)
        self.classes_emb = nn.Embedding(config.num_classes, ch)
        self.null_classes_emb = nn.Parameter(torch.randn(ch))
        self.cemb = Embedding(ch, emb_ch)
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)

        in_mults = (1,) + mults
        resolution = config.image_size
        self.down = nn.ModuleList()
        for level, mult in enumerate(mults):
            down, block_in = Level(), ch * in_mults[level]
            for _ in range(config.num_res_blocks):
                down.block.append(ResnetBlock(block_in, ch * mult, emb_ch, config.dropout, groups))
                block_in = ch * mult
                if resolution in config.attn_resolutions:
                    down.attn.append(AttnBlock(block_in, groups))
            if level != len(mults) - 1:
                down.downsample = Downsample(block_in)
                resolution //= 2
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, emb_ch, config.dropout, groups)
        self.mid.attn_1 = AttnBlock(block_in, groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, emb_ch, config.dropout, groups)

        ups = []
        for level in reversed(range(len(mults))):
            up, block_out = Level(), ch * mults[level]
            for index in range(config.num_res_blocks + 1):
                skip_in = ch * (in_mults[level] if index == config.num_res_blocks else mults[level])
                up.block.append(ResnetBlock(block_in + skip_in, block_out, emb_ch, config.dropout, groups))
                block_in = block_out
                if resolution in config.attn_resolutions:
                    up.attn.append(AttnBlock(block_in, groups))
            if level != 0:
                up.upsample = Upsample(block_in)
                resolution *= 2
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)

        self.norm_out = group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, config.in_channels, 3, padding=1)

    def embed(self, timesteps: Tensor, labels: Tensor) -> Tensor:
        """Concatenated (time, class) embedding after swish, shared by every residual block."""
        temb = self.temb(timestep_embedding(timesteps, self.config.ch))
        class_vec = self.classes_emb(labels.clamp(min=0))
        class_vec = torch.where((labels == NULL_CLASS)[:, None], self.null_classes_emb.to(class_vec.dtype), class_vec)
        return swish(torch.cat([temb, self.cemb(class_vec)], dim=1))

    def forward(self, x: Tensor, timesteps: Tensor, labels: Tensor) -> Tensor:
        """Predict the noise in `x` at integer or float `timesteps` for class `labels` (-1: null class)."""
        emb = self.embed(timesteps, labels)
        skips = [self.conv_in(x)]
        for down in self.down:
            for index, block in enumerate(down.block):
                h = block(skips[-1], emb)
                if len(down.attn) > 0:
                    h = down.attn[index](h)
                skips.append(h)
            if hasattr(down, "downsample"):
                skips.append(down.downsample(skips[-1]))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(skips[-1], emb)), emb)
        for up in reversed(self.up):
            for index, block in enumerate(up.block):
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
                if len(up.attn) > 0:
                    h = up.attn[index](h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
