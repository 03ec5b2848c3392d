"""DiT: a transformer on latent patches, conditioned by adaLN-Zero (Peebles & Xie 2023, arXiv 2212.09748)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint

from dcae.diffusion.layers import (
    Attention,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    sincos_pos_embed_2d,
    unpatchify,
)


@dataclass
class DiTConfig:
    arch: str = "dit"  # tells a checkpoint which class to build
    input_size: int = 16  # latent height = width (512px through an f32 autoencoder)
    in_channels: int = 32  # latent channels (DC-AE f32c32)
    patch_size: int = 1  # DC-AE's latents are already small: the paper uses p=1 (SD-VAE f8 latents use p=2)
    hidden_size: int = 1152  # DiT-XL
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # 0 = unconditional; otherwise row num_classes of the label table is the null class
    grad_checkpointing: bool = False  # recompute blocks in backward: memory for compute on big models


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    """Attention + MLP whose LayerNorm shift/scale and residual gates come from the condition (adaLN-Zero)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, T, D)
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, T, p*p*C)


class DiT(nn.Module):
    """`forward(x, t, y)`: latent (B, C, H, W), time (B,) in [0, 1000], labels (B,) or None -> (B, C, H, W)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        c = config
        if c.input_size % c.patch_size:
            raise ValueError(f"input size {c.input_size} is not a multiple of patch size {c.patch_size}")
        self.x_embedder = PatchEmbed(c.in_channels, c.hidden_size, c.patch_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size)
        self.y_embedder = LabelEmbedder(c.num_classes, c.hidden_size) if c.num_classes > 0 else None
        grid = c.input_size // c.patch_size
        # Fixed, so rebuilt from the config rather than stored in checkpoints.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(c.hidden_size, grid, grid)[None], persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(c.hidden_size, c.num_heads, c.mlp_ratio) for _ in range(c.depth)])
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, c.in_channels)
        self.initialize_weights()

    @property
    def null_class(self) -> int | None:
        return self.config.num_classes if self.config.num_classes > 0 else None

    def initialize_weights(self) -> None:
        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic_init)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like nn.Linear over the flattened patch
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity and the output as zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        H, W = x.shape[-2:]
        x = self.x_embedder(x) + self.pos_embed  # (B, T, D), T = H * W / p^2
        c = self.t_embedder(t)  # (B, D)
        if self.y_embedder is not None:
            if y is None:
                raise ValueError("this DiT is class-conditional: pass labels y (the null class for unconditional)")
            c = c + self.y_embedder(y)  # (B, D)
        for block in self.blocks:
            if self.config.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)  # (B, T, D)
        x = self.final_layer(x, c)  # (B, T, p*p*C)
        return unpatchify(x, self.config.patch_size, self.config.in_channels, H, W)  # (B, C, H, W)


# Presets: (depth, hidden, heads) from DiT's `DiT_models`; patch sizes 1, 2, 4. T is a tiny CPU size for tests.
_DIT_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6), "T": (2, 64, 2)}


def _dit_preset(size: str, patch_size: int):
    depth, hidden, heads = _DIT_SIZES[size]

    def preset(**overrides) -> DiTConfig:
        return DiTConfig(**{"depth": depth, "hidden_size": hidden, "num_heads": heads, "patch_size": patch_size,
                            **overrides})

    preset.__doc__ = f"DiT-{size}/{patch_size}: depth {depth}, hidden {hidden}, {heads} heads, patch {patch_size}."
    return preset


DiT_models = {f"DiT-{size}/{p}": _dit_preset(size, p) for size in _DIT_SIZES for p in (1, 2, 4)}
