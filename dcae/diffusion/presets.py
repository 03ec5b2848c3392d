"""Named diffusion-transformer presets (DiT-XL/1, UViT-H/1, ...) and building a model from a name or a config."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.nn as nn

from dcae.config import config_from_dict, is_finite_number, is_integer
from dcae.diffusion.dit import DiT, DiT_models, DiTConfig
from dcae.diffusion.uvit import UViT, UViT_models, UViTConfig
from dcae.errors import DCAEError

ModelConfig = DiTConfig | UViTConfig

# name -> function(**overrides) -> config; the keys are the CLI's --preset choices.
DIFFUSION_PRESETS: dict[str, Callable[..., ModelConfig]] = {**DiT_models, **UViT_models}
ARCHITECTURES: dict[str, tuple[type, type[nn.Module]]] = {"dit": (DiTConfig, DiT), "uvit": (UViTConfig, UViT)}


def list_diffusion_presets() -> list[str]:
    return list(DIFFUSION_PRESETS)


def get_diffusion_config(name: str, **overrides: Any) -> ModelConfig:
    """Preset name -> config, with field overrides (in_channels, input_size, num_classes, ...)."""
    if name not in DIFFUSION_PRESETS:
        raise DCAEError(f"unknown diffusion preset {name!r}; choose from {', '.join(DIFFUSION_PRESETS)}")
    return DIFFUSION_PRESETS[name](**overrides)


def create_diffusion_model(config: ModelConfig | str, **overrides: Any) -> nn.Module:
    """A DiT or UViT from a config or a preset name, randomly initialised (the caller seeds torch)."""
    if isinstance(config, str):
        config = get_diffusion_config(config, **overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    return ARCHITECTURES[config.arch][1](config)


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Rebuild a model config from `dataclasses.asdict`; unknown keys are an error."""
    arch = d.get("arch")
    if arch not in ARCHITECTURES:
        raise ValueError(f"model config has unknown arch {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    return config_from_dict(ARCHITECTURES[arch][0], d, "model config")


# Bounds far beyond every published model (DiT-XL and UViT-H: width 1152, 28 blocks, 16 heads; latents up to 64x64)
# that keep a typo (hidden_size=2**57) from reaching an allocation.
MODEL_LIMITS = {"input_size": 1024, "in_channels": 4096, "patch_size": 64, "hidden_size": 16384, "depth": 512,
                "num_heads": 512, "num_classes": 10 ** 6}


def check_model_config(m: ModelConfig, prefix: str = "model") -> None:
    """Every architecture field in range, as a one-line DCAEError naming the key (`prefix.field=value`)."""
    for name, high in MODEL_LIMITS.items():
        value, low = getattr(m, name), 0 if name == "num_classes" else 1
        if not is_integer(value, low, high):
            raise DCAEError(f"{prefix}.{name}={value!r}: expected an integer from {low} to {high}")
    if m.hidden_size % 4:
        raise DCAEError(f"{prefix}.hidden_size={m.hidden_size}: must be a multiple of 4 (the 2-D sin-cos position "
                        f"embedding)")
    if m.hidden_size % m.num_heads:
        raise DCAEError(f"{prefix}.hidden_size={m.hidden_size} does not split into "
                        f"{prefix}.num_heads={m.num_heads} heads")
    ratio = m.mlp_ratio
    if not (is_finite_number(ratio) and 0 < ratio <= 64):
        raise DCAEError(f"{prefix}.mlp_ratio={ratio!r}: expected a number in (0, 64]")
    if int(m.hidden_size * ratio) < 1:
        raise DCAEError(f"{prefix}.mlp_ratio={ratio}: the MLP of width {m.hidden_size} would have no hidden units")
    if m.input_size % m.patch_size:
        raise DCAEError(f"{prefix}.patch_size={m.patch_size} does not divide {prefix}.input_size={m.input_size}")


def count_parameters(m: ModelConfig) -> int:
    """Parameters of the model a config builds, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in create_diffusion_model(m).parameters())


def check_fits_memory(m: ModelConfig, device: torch.device, copies: int, what: str) -> None:
    """Refuse a model whose fp32 `copies` (weights, EMA, gradient, AdamW's two moments: 5 to train, 1 to sample)
    need more than `device` has free: a clear line instead of an allocation failure or the OOM killer."""
    from dcae.tiling import available_memory

    params = count_parameters(m)
    need, free = params * 4 * copies, available_memory(torch.device(device))
    if need > free:
        raise DCAEError(f"{what}: the model has {params / 1e6:,.1f}M parameters; {copies} fp32 copies need "
                        f"{need / 2 ** 30:.1f} GiB but {torch.device(device).type} has {free / 2 ** 30:.1f} GiB free")
