"""U-ViT: time, label and patches are all tokens; long skips join shallow and deep blocks (Bao et al. 2023, arXiv 2209.12152)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint

from dcae.diffusion.layers import Attention, LabelEmbedder, Mlp, PatchEmbed, timestep_embedding, unpatchify


@dataclass
class UViTConfig:
    arch: str = "uvit"  # tells a checkpoint which class to build
    input_size: int = 16  # latent height = width (512px through an f32 autoencoder)
    in_channels: int = 32  # latent channels (DC-AE f32c32)
    patch_size: int = 1  # DC-AE's UViT runs use p=1
    hidden_size: int = 1152  # UViT-H as configured in DC-AE (efficientvit dc_ae_uvit_h_in_512px)
    depth: int = 28  # depth // 2 in-blocks, one mid block, depth // 2 out-blocks: 29 blocks for UViT-H
    num_heads: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = False  # U-ViT's choice
    mlp_time_embed: bool = False  # U-ViT feeds the raw sinusoid as the time token
    final_conv: bool = False  # U-ViT's optional 3x3 conv after unpatchify; DC-AE's runs use none
    num_classes: int = 1000  # 0 = unconditional; otherwise row num_classes of the label table is the null class
    grad_checkpointing: bool = False  # recompute blocks in backward: memory for compute on big models


class UViTBlock(nn.Module):
    """Pre-norm transformer block; an out-block first fuses its long skip: Linear(cat[x, skip])."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, skip: bool = False):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))  # (B, T, D)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class UViT(nn.Module):
    """`forward(x, t, y)`: latent (B, C, H, W), time (B,) in [0, 1000], labels (B,) or None -> (B, C, H, W)."""

    def __init__(self, config: UViTConfig):
        super().__init__()
        self.config = config
        c = config
        if c.input_size % c.patch_size:
            raise ValueError(f"input size {c.input_size} is not a multiple of patch size {c.patch_size}")
        D = c.hidden_size
        self.patch_embed = PatchEmbed(c.in_channels, D, c.patch_size)
        self.time_embed = (nn.Sequential(nn.Linear(D, 4 * D), nn.SiLU(), nn.Linear(4 * D, D))
                           if c.mlp_time_embed else nn.Identity())
        self.label_emb = LabelEmbedder(c.num_classes, D) if c.num_classes > 0 else None
        self.extras = 2 if self.label_emb is not None else 1  # label token (if any) and time token
        num_patches = (c.input_size // c.patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_patches, D))

        def block(skip: bool = False) -> UViTBlock:
            return UViTBlock(D, c.num_heads, c.mlp_ratio, c.qkv_bias, skip=skip)

        self.in_blocks = nn.ModuleList([block() for _ in range(c.depth // 2)])
        self.mid_block = block()
        self.out_blocks = nn.ModuleList([block(skip=True) for _ in range(c.depth // 2)])
        self.norm = nn.LayerNorm(D)
        self.decoder_pred = nn.Linear(D, c.patch_size ** 2 * c.in_channels)
        self.final_layer = nn.Conv2d(c.in_channels, c.in_channels, 3, padding=1) if c.final_conv else nn.Identity()
        self.initialize_weights()

    @property
    def null_class(self) -> int | None:
        return self.config.num_classes if self.config.num_classes > 0 else None

    def initialize_weights(self) -> None:
        def init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(init)

    def _run(self, block: UViTBlock, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.config.grad_checkpointing and self.training:
            return torch.utils.checkpoint.checkpoint(block, x, skip, use_reentrant=False)
        return block(x, skip)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        H, W = x.shape[-2:]
        x = self.patch_embed(x)  # (B, L, D)
        tokens = [self.time_embed(timestep_embedding(t, self.config.hidden_size))[:, None]]  # (B, 1, D)
        if self.label_emb is not None:
            if y is None:
                raise ValueError("this UViT is class-conditional: pass labels y (the null class for unconditional)")
            tokens.insert(0, self.label_emb(y)[:, None])  # (B, 1, D)
        x = torch.cat([*tokens, x], dim=1) + self.pos_embed  # (B, extras + L, D)
        skips = []
        for block in self.in_blocks:
            x = self._run(block, x)
            skips.append(x)
        x = self._run(self.mid_block, x)
        for block in self.out_blocks:
            x = self._run(block, x, skips.pop())  # the deepest in-block meets the first out-block
        x = self.decoder_pred(self.norm(x))[:, self.extras:]  # (B, L, p*p*C)
        x = unpatchify(x, self.config.patch_size, self.config.in_channels, H, W)  # (B, C, H, W)
        return self.final_layer(x)


# Presets (depth, hidden, heads): S, H and 2B as DC-AE's efficientvit configs (dc_ae_uvit_{s,h,2b}_in_512px);
# M and L from U-ViT; T is a tiny CPU size for tests.
_UVIT_SIZES = {"S": (12, 512, 8), "M": (16, 768, 12), "L": (20, 1024, 16), "H": (28, 1152, 16),
               "2B": (28, 2048, 32), "T": (2, 64, 2)}


def _uvit_preset(size: str, patch_size: int):
    depth, hidden, heads = _UVIT_SIZES[size]

    def preset(**overrides) -> UViTConfig:
        return UViTConfig(**{"depth": depth, "hidden_size": hidden, "num_heads": heads, "patch_size": patch_size,
                             **overrides})

    preset.__doc__ = (f"UViT-{size}/{patch_size}: {depth // 2}+1+{depth // 2} blocks, hidden {hidden}, {heads} heads, "
                      f"patch {patch_size}.")
    return preset


UViT_models = {f"UViT-{size}/{p}": _uvit_preset(size, p) for size in _UVIT_SIZES for p in (1, 2, 4)}
