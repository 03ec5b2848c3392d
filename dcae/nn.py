"""Building blocks of DC-AE: norms, ResBlock, LiteMLA linear attention, GLUMBConv, EfficientViT block,
and the residual-autoencoding down/up-sampling blocks.

Module and parameter names are dcae's own; `dcae.weights` maps them to the efficientvit and diffusers layouts.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------------------
# Norms and activations
# ----------------------------------------------------------------------------------------------------------------------
class RMSNorm2d(nn.Module):
    """RMS norm over the channel axis of a (B, C, H, W) map, per pixel, with weight and bias (efficientvit `trms2d`)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.shape[1] > 1 and x.shape[2] * x.shape[3] > 1 and \
                x.is_contiguous(memory_format=torch.channels_last):
            # NHWC: channels are the innermost axis, so torch's fused rms_norm (fp32 accumulation for bf16/fp16)
            # normalizes a contiguous (B, H, W, C) view in one pass instead of five elementwise passes; identical
            # values in fp32 (tests/test_models.py). NCHW inputs keep the explicit form, which is faster there.
            y = F.rms_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight.to(x.dtype), self.eps)
            return (y + self.bias.to(x.dtype)).permute(0, 3, 1, 2)
        # The mean square is taken in fp32: in bf16/fp16 the sum over 1024+ channels loses the small ones.
        rms = torch.rsqrt(x.float().square().mean(dim=1, keepdim=True) + self.eps)
        x = (x.float() * rms).to(x.dtype)
        return x * self.weight.view(1, -1, 1, 1).to(x.dtype) + self.bias.view(1, -1, 1, 1).to(x.dtype)


def build_norm(name: str | None, channels: int) -> nn.Module:
    """`rms2d` (RMSNorm2d), `bn2d` (BatchNorm2d) or None (identity)."""
    if name is None or name == "none":
        return nn.Identity()
    if name in ("rms2d", "trms2d"):
        return RMSNorm2d(channels)
    if name == "bn2d":
        return nn.BatchNorm2d(channels, eps=1e-5)
    raise ValueError(f"unknown norm {name!r}; expected rms2d, bn2d or none")


def build_act(name: str | None) -> nn.Module:
    """`silu`, `relu`, `gelu` or None (identity)."""
    acts = {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, None: nn.Identity, "none": nn.Identity}
    if name not in acts:
        raise ValueError(f"unknown activation {name!r}; expected one of silu, relu, gelu, none")
    return acts[name]()


# ----------------------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------------------
class ResBlock(nn.Module):
    """x + norm(conv3x3_nobias(act(conv3x3_bias(x))))."""

    def __init__(self, channels: int, norm: str | None, act: str | None):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=True)
        self.act = build_act(act)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = build_norm(norm, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.conv2(self.act(self.conv1(x))))


def relu_linear_attention(qkv: torch.Tensor, head_dim: int, eps: float = 1e-15) -> torch.Tensor:
    """ReLU linear attention, O(N): out = (v k^T) q / (1^T k^T q); always computed in fp32.

    qkv: (B, heads*3*head_dim, H, W), laid out head-major with [q | k | v] inside each head.
    """
    B, _, H, W = qkv.shape
    with torch.autocast(device_type=qkv.device.type, enabled=False):
        qkv = qkv.float().reshape(B, -1, 3 * head_dim, H * W)  # (B, h, 3d, N)
        q, k, v = qkv.split(head_dim, dim=2)  # each (B, h, d, N)
        q, k = F.relu(q), F.relu(k)
        v = F.pad(v, (0, 0, 0, 1), value=1.0)  # (B, h, d+1, N): the ones row yields the normaliser
        vk = v @ k.transpose(-1, -2)  # (B, h, d+1, d)
        out = vk @ q  # (B, h, d+1, N)
        out = out[:, :, :-1] / (out[:, :, -1:] + eps)
    return out.reshape(B, -1, H, W)


def relu_quadratic_attention(qkv: torch.Tensor, head_dim: int, eps: float = 1e-15) -> torch.Tensor:
    """The same ReLU attention computed through the N x N map; the reference uses it when H*W <= head_dim."""
    B, _, H, W = qkv.shape
    with torch.autocast(device_type=qkv.device.type, enabled=False):
        qkv = qkv.float().reshape(B, -1, 3 * head_dim, H * W)
        q, k, v = qkv.split(head_dim, dim=2)
        q, k = F.relu(q), F.relu(k)
        attn = k.transpose(-1, -2) @ q  # (B, h, N, N)
        attn = attn / (attn.sum(dim=2, keepdim=True) + eps)
        out = v @ attn  # (B, h, d, N)
    return out.reshape(B, -1, H, W)


class LiteMLA(nn.Module):
    """Lightweight multi-scale linear attention (EfficientViT): 1x1 qkv, optional depthwise multi-scale aggregation,
    ReLU linear attention per head, 1x1 projection, norm. The residual is added by the enclosing block."""

    def __init__(self, channels: int, head_dim: int = 32, scales: tuple[int, ...] = (), norm: str | None = "rms2d"):
        super().__init__()
        heads = channels // head_dim
        inner = heads * head_dim
        self.head_dim = head_dim
        self.qkv = nn.Conv2d(channels, 3 * inner, 1, bias=False)
        self.aggreg = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(3 * inner, 3 * inner, s, padding=s // 2, groups=3 * inner, bias=False),
                nn.Conv2d(3 * inner, 3 * inner, 1, groups=3 * heads, bias=False),
            )
            for s in scales
        )
        self.proj = nn.Conv2d(inner * (1 + len(scales)), channels, 1, bias=False)
        self.norm = build_norm(norm, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)  # (B, 3*inner, H, W)
        if len(self.aggreg) > 0:
            qkv = torch.cat([qkv] + [aggregate(qkv) for aggregate in self.aggreg], dim=1)  # (B, 3*inner*(1+S), H, W)
        H, W = qkv.shape[-2:]
        # The reference takes the N x N path when H*W <= head_dim. That is a Python branch on the shape, which an
        # exporter (torch.export, jit.trace) freezes at the example's size: an export from a small example would run
        # the O(N^2) path at every size. Both paths are the same function (tests/test_export.py), so exports take
        # the linear one, which holds at any size.
        exporting = torch.compiler.is_exporting() or torch.jit.is_tracing()
        attention = relu_linear_attention if exporting or H * W > self.head_dim else relu_quadratic_attention
        out = attention(qkv, self.head_dim).to(qkv.dtype)  # (B, inner*(1+S), H, W)
        return self.norm(self.proj(out))


class GLUMBConv(nn.Module):
    """Gated MBConv: 1x1 C->2*mid (bias, act) -> depthwise 3x3 (bias) -> x * act(gate) -> 1x1 mid->C (no bias) -> norm."""

    def __init__(self, channels: int, expand_ratio: float = 4, norm: str | None = "rms2d", act: str | None = "silu"):
        super().__init__()
        mid = round(channels * expand_ratio)
        self.inverted_conv = nn.Conv2d(channels, 2 * mid, 1, bias=True)
        self.inverted_act = build_act(act)
        self.depth_conv = nn.Conv2d(2 * mid, 2 * mid, 3, padding=1, groups=2 * mid, bias=True)
        self.glu_act = build_act(act)
        self.point_conv = nn.Conv2d(mid, channels, 1, bias=False)
        self.norm = build_norm(norm, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.depth_conv(self.inverted_act(self.inverted_conv(x)))  # (B, 2*mid, H, W)
        x, gate = x.chunk(2, dim=1)
        return self.norm(self.point_conv(x * self.glu_act(gate)))


class EfficientViTBlock(nn.Module):
    """x + LiteMLA(x), then x + GLUMBConv(x)."""

    def __init__(self, channels: int, norm: str | None, act: str | None, head_dim: int = 32,
                 scales: tuple[int, ...] = (), expand_ratio: float = 4):
        super().__init__()
        self.attn = LiteMLA(channels, head_dim=head_dim, scales=scales, norm=norm)
        self.mlp = GLUMBConv(channels, expand_ratio=expand_ratio, norm=norm, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


def build_block(block_type: str, channels: int, norm: str | None, act: str | None, head_dim: int) -> nn.Module:
    """`ResBlock`, `EViT_GLU` (EfficientViT block, no multi-scale branch) or `EViTS5_GLU` (5x5 multi-scale branch)."""
    if block_type == "ResBlock":
        return ResBlock(channels, norm, act)
    if block_type == "EViT_GLU":
        return EfficientViTBlock(channels, norm, act, head_dim=head_dim, scales=())
    if block_type == "EViTS5_GLU":
        return EfficientViTBlock(channels, norm, act, head_dim=head_dim, scales=(5,))
    raise ValueError(f"unknown block type {block_type!r}; expected ResBlock, EViT_GLU or EViTS5_GLU")


# ----------------------------------------------------------------------------------------------------------------------
# Residual autoencoding: parameter-free shortcuts, and the down/up-sampling blocks that learn the residual to them
# ----------------------------------------------------------------------------------------------------------------------
def space_to_channel_shortcut(x: torch.Tensor, out_channels: int, factor: int = 2) -> torch.Tensor:
    """Space-to-channel (pixel_unshuffle), then average groups of consecutive channels down to out_channels."""
    if factor > 1:
        x = F.pixel_unshuffle(x, factor)  # (B, C*f*f, H/f, W/f)
    return x.unflatten(1, (out_channels, -1)).mean(dim=2)


def channel_to_space_shortcut(x: torch.Tensor, out_channels: int, factor: int = 2) -> torch.Tensor:
    """Duplicate each channel (repeat_interleave) up to out_channels*f*f, then channel-to-space (pixel_shuffle)."""
    repeats = out_channels * factor * factor // x.shape[1]
    x = x.repeat_interleave(repeats, dim=1)
    return F.pixel_shuffle(x, factor) if factor > 1 else x


DOWNSAMPLE_BLOCKS = ("pixel_unshuffle", "conv")  # in/mix/1.x models, Sana (efficientvit `Conv`)
UPSAMPLE_BLOCKS = ("pixel_shuffle", "interpolate")  # in/mix/1.x models and DC-AE-Lite, Sana (`InterpolateConv`)


class DownsampleBlock(nn.Module):
    """Halve the resolution with a learned layer, plus a shortcut.

    block: "pixel_unshuffle" (conv3x3 to out/4 channels, then pixel_unshuffle: the in/mix models) or "conv" (a
    stride-2 conv3x3 straight to out channels: Sana's encoder, efficientvit `downsample_block_type=Conv`).
    shortcut: "averaging" (the paper's space-to-channel shortcut), "pooling" (a conventional one: average pooling,
    channels matched by a 1x1 conv; the ablation that isolates space-to-channel) or None (no shortcut; also the
    encoder stem when stage 0 is empty).
    """

    def __init__(self, in_channels: int, out_channels: int, shortcut: str | None = "averaging",
                 block: str = "pixel_unshuffle"):
        super().__init__()
        if block not in DOWNSAMPLE_BLOCKS:
            raise ValueError(f"unknown downsample block {block!r}; expected {' or '.join(DOWNSAMPLE_BLOCKS)}")
        if block == "pixel_unshuffle" and out_channels % 4 != 0:
            raise ValueError(f"downsample out_channels must be a multiple of 4, got {out_channels}")
        if shortcut not in ("averaging", "pooling", None):
            raise ValueError(f"unknown downsample shortcut {shortcut!r}; expected averaging, pooling or None")
        self.out_channels = out_channels
        self.shortcut = shortcut
        self.block = block
        if block == "conv":
            self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        else:
            self.conv = nn.Conv2d(in_channels, out_channels // 4, 3, padding=1)
        if shortcut == "pooling":
            self.shortcut_conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)  # (B, out, H/2, W/2) strided, or (B, out/4, H, W)
        if self.block == "pixel_unshuffle":
            y = F.pixel_unshuffle(y, 2)  # (B, out, H/2, W/2)
        if self.shortcut == "averaging":
            y = y + space_to_channel_shortcut(x, self.out_channels)
        elif self.shortcut == "pooling":
            y = y + self.shortcut_conv(F.avg_pool2d(x, 2))
        return y


class UpsampleBlock(nn.Module):
    """Double the resolution with a learned layer, plus a shortcut.

    block: "pixel_shuffle" (conv3x3 to out*4 channels, then pixel_shuffle) or "interpolate" (nearest 2x upsampling,
    then conv3x3 to out channels: Sana's decoder, efficientvit `InterpolateConv`, diffusers "interpolate").
    shortcut: "duplicating" (the paper's channel-to-space shortcut), "interpolate" (conventional: nearest upsampling,
    channels matched by a 1x1 conv) or None (no shortcut; also the decoder head when stage 0 is empty).
    """

    def __init__(self, in_channels: int, out_channels: int, shortcut: str | None = "duplicating",
                 block: str = "pixel_shuffle"):
        super().__init__()
        if block not in UPSAMPLE_BLOCKS:
            raise ValueError(f"unknown upsample block {block!r}; expected {' or '.join(UPSAMPLE_BLOCKS)}")
        if shortcut not in ("duplicating", "interpolate", None):
            raise ValueError(f"unknown upsample shortcut {shortcut!r}; expected duplicating, interpolate or None")
        self.out_channels = out_channels
        self.shortcut = shortcut
        self.block = block
        self.conv = nn.Conv2d(in_channels, out_channels * (4 if block == "pixel_shuffle" else 1), 3, padding=1)
        if shortcut == "interpolate":
            self.shortcut_conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.block == "interpolate":
            y = self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))  # (B, out, 2H, 2W)
        else:
            y = F.pixel_shuffle(self.conv(x), 2)  # (B, out, 2H, 2W)
        if self.shortcut == "duplicating":
            y = y + channel_to_space_shortcut(x, self.out_channels)
        elif self.shortcut == "interpolate":
            y = y + F.interpolate(self.shortcut_conv(x), scale_factor=2, mode="nearest")
        return y


class LatentProjectOut(nn.Module):
    """Encoder output: conv3x3 to the latent channels, plus the averaging shortcut (groups of channels -> one).

    `forward(x, channels=k)` computes only the first k latent channels (DC-AE 1.5's structured latent; DC-Gen
    `AdaptiveOutputConvLayer` slices the conv's weight and bias the same way); the shortcut, whose channel groups
    depend on the latent width, has no such form, so structured models have none.
    """

    def __init__(self, in_channels: int, latent_channels: int, shortcut: bool = True):
        super().__init__()
        if shortcut and in_channels % latent_channels != 0:
            raise ValueError(f"encoder width {in_channels} is not a multiple of latent channels {latent_channels}")
        self.latent_channels = latent_channels
        self.shortcut = shortcut
        self.conv = nn.Conv2d(in_channels, latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, channels: int | None = None) -> torch.Tensor:
        if channels is not None and channels != self.latent_channels:
            return F.conv2d(x, self.conv.weight[:channels], self.conv.bias[:channels], padding=1)  # (B, k, h, w)
        y = self.conv(x)
        return y + space_to_channel_shortcut(x, self.latent_channels, factor=1) if self.shortcut else y


class LatentProjectIn(nn.Module):
    """Decoder input: conv3x3 from the latent channels, plus the duplicating shortcut (each channel repeated).

    A latent with k < C channels (structured models only) goes through the conv's first k input channels (DC-Gen
    `AdaptiveInputConvLayer`): the same as zero-padding it to C channels, since a zero channel adds nothing.
    """

    def __init__(self, latent_channels: int, out_channels: int, shortcut: bool = True):
        super().__init__()
        if shortcut and out_channels % latent_channels != 0:
            raise ValueError(f"decoder width {out_channels} is not a multiple of latent channels {latent_channels}")
        self.out_channels = out_channels
        self.shortcut = shortcut
        self.conv = nn.Conv2d(latent_channels, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[1] != self.conv.in_channels:
            return F.conv2d(z, self.conv.weight[:, :z.shape[1]], self.conv.bias, padding=1)  # (B, C_last, h, w)
        y = self.conv(z)
        return y + channel_to_space_shortcut(z, self.out_channels, factor=1) if self.shortcut else y
