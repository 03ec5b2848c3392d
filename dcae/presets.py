"""Named model configs: the published DC-AE models, tiny CPU models of the same topology, and ablation twins.

Every preset `NAME` also has `NAME-plain` (the residual-autoencoding shortcuts switched off: the paper's ablation) and
`NAME-conv-shortcut` (a conventional shortcut at each resolution change: average pooling / nearest upsampling with
channels matched by a 1x1 conv; isolates what space-to-channel itself contributes).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from dcae.autoencoder import DCAE, DCAEConfig, DecoderConfig, EncoderConfig

_PRESETS: dict[str, Callable[[], DCAEConfig]] = {}
_VARIANTS = ("-plain", "-conv-shortcut")


def register_preset(fn: Callable[[], DCAEConfig]) -> Callable[[], DCAEConfig]:
    _PRESETS[fn().name] = fn
    return fn


def _reference_config(name: str, widths: tuple[int, ...], latent_channels: int, scaling_factor: float | None,
                      encoder_depths: tuple[int, ...], decoder_depths: tuple[int, ...]) -> DCAEConfig:
    """The in/mix topology: empty stage 0, ResBlocks in stages 0-2, EfficientViT blocks deeper; BatchNorm + ReLU in
    the decoder's convolutional stages."""
    n = len(widths)
    blocks = ("ResBlock",) * 3 + ("EViT_GLU",) * (n - 3)
    return DCAEConfig(
        name=name,
        latent_channels=latent_channels,
        scaling_factor=scaling_factor,
        encoder=EncoderConfig(width_list=widths, depth_list=encoder_depths, block_type=blocks),
        decoder=DecoderConfig(width_list=widths, depth_list=decoder_depths, block_type=blocks,
                              norm=("bn2d",) * 3 + ("rms2d",) * (n - 3), act=("relu",) * 3 + ("silu",) * (n - 3)),
    )


# Published models (mit-han-lab/efficientvit dc_ae.py; scaling factors from the diffusers configs).
_F32 = (128, 256, 512, 512, 1024, 1024)
_F64 = _F32 + (2048,)
_F128 = _F64 + (2048,)
_PUBLISHED_SCALING = {
    "dc-ae-f32c32-in-1.0": 0.3189, "dc-ae-f32c32-mix-1.0": 0.4552,
    "dc-ae-f64c128-in-1.0": 0.2889, "dc-ae-f64c128-mix-1.0": 0.4538,
    "dc-ae-f128c512-in-1.0": 0.4883, "dc-ae-f128c512-mix-1.0": 0.3620,
    "dc-ae-f32c32-sana-1.0": 0.41407, "dc-ae-f32c32-sana-1.1": 0.41407,
}


def _published(name: str, widths: tuple[int, ...], latent_channels: int) -> Callable[[], DCAEConfig]:
    extra = len(widths) - 6
    enc, dec = (0, 4, 8, 2, 2, 2) + (2,) * extra, (0, 5, 10, 2, 2, 2) + (2,) * extra
    fn = lambda: _reference_config(name, widths, latent_channels, _PUBLISHED_SCALING[name], enc, dec)  # noqa: E731
    fn.__name__ = name
    return register_preset(fn)


for _data in ("in", "mix"):
    _published(f"dc-ae-f32c32-{_data}-1.0", _F32, 32)
    _published(f"dc-ae-f64c128-{_data}-1.0", _F64, 128)
    _published(f"dc-ae-f128c512-{_data}-1.0", _F128, 512)


def _sana(name: str) -> DCAEConfig:
    """Sana's f32c32: stage 0 is not empty (a plain conv stem), 5x5 multi-scale attention, RMSNorm + SiLU throughout."""
    blocks = ("ResBlock",) * 3 + ("EViTS5_GLU",) * 3
    return DCAEConfig(
        name=name,
        latent_channels=32,
        scaling_factor=_PUBLISHED_SCALING[name],
        encoder=EncoderConfig(width_list=_F32, depth_list=(2, 2, 2, 3, 3, 3), block_type=blocks),
        decoder=DecoderConfig(width_list=_F32, depth_list=(3, 3, 3, 3, 3, 3), block_type=blocks,
                              norm=("rms2d",) * 6, act=("silu",) * 6),
    )


@register_preset
def dc_ae_f32c32_sana_1_0() -> DCAEConfig:
    return _sana("dc-ae-f32c32-sana-1.0")


@register_preset
def dc_ae_f32c32_sana_1_1() -> DCAEConfig:
    # Same architecture as 1.0; 1.1 is a decoder fine-tune with the same latent space.
    return _sana("dc-ae-f32c32-sana-1.1")


# Tiny presets: the in/mix topology at 3/16 width with shallow stages (6-9M parameters), trainable on a CPU.
_TINY_F32 = (24, 48, 96, 96, 192, 192)


@register_preset
def dc_ae_tiny_f32c32() -> DCAEConfig:
    return _reference_config("dc-ae-tiny-f32c32", _TINY_F32, 32, None, (0, 1, 2, 1, 1, 1), (0, 2, 3, 1, 1, 1))


@register_preset
def dc_ae_tiny_f64c128() -> DCAEConfig:
    return _reference_config("dc-ae-tiny-f64c128", _TINY_F32 + (256,), 128, None,
                             (0, 1, 2, 1, 1, 1, 1), (0, 2, 3, 1, 1, 1, 1))


@register_preset
def dc_ae_tiny_f8c4() -> DCAEConfig:
    """A conventional SD-VAE-like f8c4 baseline (ResBlocks only, 4 latent channels) at the tiny presets' scale."""
    widths = (24, 48, 96, 96)
    return DCAEConfig(
        name="dc-ae-tiny-f8c4", latent_channels=4,
        encoder=EncoderConfig(width_list=widths, depth_list=(0, 1, 2, 2), block_type=("ResBlock",) * 4),
        decoder=DecoderConfig(width_list=widths, depth_list=(0, 2, 3, 2), block_type=("ResBlock",) * 4,
                              norm=("bn2d",) * 4, act=("relu",) * 4),
    )


# ----------------------------------------------------------------------------------------------------------------------
def _variant(config: DCAEConfig, suffix: str) -> DCAEConfig:
    """The ablation twin of a config: identical but for the shortcuts."""
    if suffix == "-plain":
        encoder = dataclasses.replace(config.encoder, downsample_shortcut=None, out_shortcut=False)
        decoder = dataclasses.replace(config.decoder, upsample_shortcut=None, in_shortcut=False)
    elif suffix == "-conv-shortcut":
        encoder = dataclasses.replace(config.encoder, downsample_shortcut="pooling")
        decoder = dataclasses.replace(config.decoder, upsample_shortcut="interpolate")
    else:
        raise ValueError(suffix)
    return dataclasses.replace(config, name=config.name + suffix, encoder=encoder, decoder=decoder)


def list_presets(include_variants: bool = True) -> list[str]:
    """All preset names; with `include_variants`, also each `-plain` and `-conv-shortcut` twin."""
    names = list(_PRESETS)
    if include_variants:
        names += [name + suffix for suffix in _VARIANTS for name in _PRESETS]
    return names


def get_config(name: str, **overrides: Any) -> DCAEConfig:
    """The config of a preset, with top-level fields overridden (e.g. latent_channels=64, scaling_factor=0.5)."""
    for suffix in _VARIANTS:
        if name.endswith(suffix) and name[: -len(suffix)] in _PRESETS:
            config = _variant(_PRESETS[name[: -len(suffix)]](), suffix)
            break
    else:
        if name not in _PRESETS:
            raise KeyError(f"unknown preset {name!r}; choose from: {', '.join(list_presets())}")
        config = _PRESETS[name]()
    return dataclasses.replace(config, **overrides) if overrides else config


def create_model(name: str, **overrides: Any) -> DCAE:
    """A randomly initialised model of a preset (seed torch before calling for reproducible weights)."""
    return DCAE(get_config(name, **overrides))


def published_presets() -> list[str]:
    """The presets whose weights were published by the DC-AE authors."""
    return list(_PUBLISHED_SCALING)
