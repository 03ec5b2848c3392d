"""Named diffusion-transformer presets (DiT-XL/1, UViT-H/1, ...) and building a model from a name or a config."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch.nn as nn

from dcae.config import config_from_dict
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
