"""Named model configs, and which published model a checkpoint is.

The registry: the published DC-AE models (1.0 in/mix, Sana 1.0/1.1, DC-AE-Lite, DC-AE 1.1/1.5), tiny CPU models of
the same topologies, and ablation twins. Every preset `NAME` also has `NAME-plain` (the residual-autoencoding
shortcuts switched off: the paper's ablation) and `NAME-conv-shortcut` (a conventional shortcut at each resolution
change: average pooling / nearest upsampling with channels matched by a 1x1 conv; isolates what space-to-channel
itself contributes).

This module also answers the questions about published models that loading a checkpoint asks: their scaling
factors, the name a folder or Hub id hints at, and the config a config-less checkpoint's keys and shapes match.
`dcae.weights` only translates layouts and reads and writes files; `dcae.pretrained` puts the two together.
"""
from __future__ import annotations

import dataclasses
import difflib
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import PurePath
from typing import Any, Callable

from dcae.autoencoder import DCAE, DCAEConfig, DecoderConfig, EncoderConfig
from dcae.errors import DCAEError
from dcae.weights import diffusers_topology, layout_shapes

_PRESETS: dict[str, Callable[[], DCAEConfig]] = {}
_VARIANTS = ("-plain", "-conv-shortcut")


def register_preset(fn: Callable[[], DCAEConfig]) -> Callable[[], DCAEConfig]:
    _PRESETS[fn().name] = fn
    return fn


# ----------------------------------------------------------------------------------------------------------------------
# Published models: where each fact comes from, and its latent scaling factor (None: the authors published none)
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Published:
    hub_id: str  # the original-layout repository; diffusers' copy adds "-diffusers"
    scaling_factor: float | None  # 1 / RMS of the latents as published; None where the authors published none
    source: str  # where the topology and the factor were read


_PUBLISHED: dict[str, Published] = {}
_ALIASES: dict[str, str] = {}  # other published names of the same weights (Hub repository names)
_EVIT_1_0 = "mit-han-lab/efficientvit dc_ae.py; factor: diffusers convert_dcae_to_diffusers.py"
_DCGEN = "dc-ai-projects/DC-Gen dc_gen/aecore/models/dc_ae.py + ae_model_zoo.py"


def _publish(name: str, hub_id: str, scaling_factor: float | None, source: str) -> None:
    _PUBLISHED[name] = Published(hub_id, scaling_factor, source)


# ----------------------------------------------------------------------------------------------------------------------
# DC-AE 1.0 in/mix (efficientvit)
# ----------------------------------------------------------------------------------------------------------------------
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


_F32 = (128, 256, 512, 512, 1024, 1024)
_F64 = _F32 + (2048,)
_F128 = _F64 + (2048,)


def _published_1_0(name: str, widths: tuple[int, ...], latent_channels: int, scaling_factor: float | None,
                   source: str = _EVIT_1_0) -> None:
    extra = len(widths) - 6
    enc, dec = (0, 4, 8, 2, 2, 2) + (2,) * extra, (0, 5, 10, 2, 2, 2) + (2,) * extra
    _publish(name, f"mit-han-lab/{name}", scaling_factor, source)
    fn = lambda: _reference_config(name, widths, latent_channels, _PUBLISHED[name].scaling_factor, enc, dec)  # noqa
    fn.__name__ = name
    register_preset(fn)


_published_1_0("dc-ae-f32c32-in-1.0", _F32, 32, 0.3189)
_published_1_0("dc-ae-f32c32-mix-1.0", _F32, 32, 0.4552)
_published_1_0("dc-ae-f64c128-in-1.0", _F64, 128, 0.2889)
_published_1_0("dc-ae-f64c128-mix-1.0", _F64, 128, 0.4538)
_published_1_0("dc-ae-f128c512-in-1.0", _F128, 512, 0.4883)
_published_1_0("dc-ae-f128c512-mix-1.0", _F128, 512, 0.3620)
# The in-1.0 model fine-tuned at 256 px (DC-Gen registers it with the in-1.0 config and no factor).
_published_1_0("dc-ae-f32c32-in-1.0-256px", _F32, 32, None, source=_DCGEN)


# ----------------------------------------------------------------------------------------------------------------------
# Sana (1.0, 1.1) and DC-AE-Lite
# ----------------------------------------------------------------------------------------------------------------------
def _sana_encoder() -> EncoderConfig:
    """Sana's encoder: stage 0 not empty (a plain conv stem), strided-conv down-sampling (efficientvit `Conv`) with
    the averaging shortcut, 5x5 multi-scale attention in stages 3-5, RMSNorm + SiLU."""
    return EncoderConfig(width_list=_F32, depth_list=(2, 2, 2, 3, 3, 3),
                         block_type=("ResBlock",) * 3 + ("EViTS5_GLU",) * 3, downsample_block="conv")


def _sana(name: str) -> DCAEConfig:
    """Sana's f32c32: its decoder up-samples by interpolation + conv (efficientvit `InterpolateConv`) and uses
    RMSNorm + SiLU throughout, with ReLU before the output conv."""
    return DCAEConfig(
        name=name,
        latent_channels=32,
        scaling_factor=_PUBLISHED[name].scaling_factor,
        encoder=_sana_encoder(),
        decoder=DecoderConfig(width_list=_F32, depth_list=(3, 3, 3, 3, 3, 3),
                              block_type=("ResBlock",) * 3 + ("EViTS5_GLU",) * 3,
                              norm=("rms2d",) * 6, act=("silu",) * 6, upsample_block="interpolate"),
    )


_publish("dc-ae-f32c32-sana-1.0", "mit-han-lab/dc-ae-f32c32-sana-1.0", 0.41407, _EVIT_1_0)
_publish("dc-ae-f32c32-sana-1.1", "mit-han-lab/dc-ae-f32c32-sana-1.1", 0.41407, _DCGEN)
_publish("dc-ae-lite-f32c32-sana-1.1", "dc-ai/dc-ae-lite-f32c32", 0.41407, _DCGEN + "; projects/DC-AE-Lite.md")
_ALIASES["dc-ae-lite-f32c32"] = "dc-ae-lite-f32c32-sana-1.1"


@register_preset
def dc_ae_f32c32_sana_1_0() -> DCAEConfig:
    return _sana("dc-ae-f32c32-sana-1.0")


@register_preset
def dc_ae_f32c32_sana_1_1() -> DCAEConfig:
    # Same architecture and latent space as 1.0; 1.1 is a decoder fine-tune.
    return _sana("dc-ae-f32c32-sana-1.1")


@register_preset
def dc_ae_lite_f32c32_sana_1_1() -> DCAEConfig:
    """DC-AE-Lite (diffusers calls it "turbo"): Sana 1.0's encoder, so Sana's latents decode unchanged, and a faster
    decoder of ResBlocks only: empty stage 0 (conv + pixel shuffle head), RMSNorm + SiLU, SiLU before the output
    conv, conv + pixel-shuffle up-sampling (DC-Gen's default: its config sets no upsample_block_type)."""
    name = "dc-ae-lite-f32c32-sana-1.1"
    return DCAEConfig(
        name=name,
        latent_channels=32,
        scaling_factor=_PUBLISHED[name].scaling_factor,
        encoder=_sana_encoder(),
        decoder=DecoderConfig(width_list=_F32, depth_list=(0, 3, 5, 4, 4, 4), block_type=("ResBlock",) * 6,
                              norm=("rms2d",) * 6, act=("silu",) * 6, out_act="silu"),
    )


# ----------------------------------------------------------------------------------------------------------------------
# DC-AE 1.1 / 1.5 (DC-Gen): ResBlocks only, no latent shortcuts; 1.5 has the structured latent
# ----------------------------------------------------------------------------------------------------------------------
def _dc_ae_1_x(name: str, widths: tuple[int, ...], depths: tuple[int, ...], latent_channels: int,
               scaling_factor: float | None, structured: bool) -> DCAEConfig:
    """DC-Gen `dc_ae_f32_1_1` / `dc_ae_f32_1_5` / `dc_ae_f64_1_5`: encoder and decoder of ResBlocks with RMSNorm +
    SiLU, pixel-(un)shuffle resampling with the averaging/duplicating shortcuts, but no encoder-output and no
    decoder-input shortcut (the latent is free of the channel-group structure they impose), SiLU before the output
    conv. 1.5 builds its latent projections as DC-Gen's Adaptive{Output,Input}ConvLayer: same tensors, plus the
    ability to use a prefix of the latent channels."""
    n = len(widths)
    return DCAEConfig(
        name=name,
        latent_channels=latent_channels,
        scaling_factor=scaling_factor,
        structured_latent=structured,
        encoder=EncoderConfig(width_list=widths, depth_list=depths, block_type=("ResBlock",) * n, out_shortcut=False),
        decoder=DecoderConfig(width_list=widths, depth_list=depths, block_type=("ResBlock",) * n,
                              norm=("rms2d",) * n, act=("silu",) * n, in_shortcut=False, out_act="silu"),
    )


_DEPTHS_1_X = (0, 5, 10, 4, 4, 4)
for _name, _widths, _structured in (("dc-ae-f32c128-1.1", _F32, False), ("dc-ae-f32c128-1.5", _F32, True),
                                    ("dc-ae-f64c128-1.5", _F32 + (1024,), True)):
    _publish(_name, f"dc-ai/{_name}", None, _DCGEN)

    def _fn(name=_name, widths=_widths, structured=_structured) -> DCAEConfig:
        depths = _DEPTHS_1_X + (4,) * (len(widths) - 6)
        return _dc_ae_1_x(name, widths, depths, 128, _PUBLISHED[name].scaling_factor, structured)

    register_preset(_fn)


# ----------------------------------------------------------------------------------------------------------------------
# Tiny presets, trainable on a CPU
# ----------------------------------------------------------------------------------------------------------------------
# The in/mix topology at 3/16 width with shallow stages (6-11M parameters).
_TINY_F32 = (24, 48, 96, 96, 192, 192)


@register_preset
def dc_ae_tiny_f32c32() -> DCAEConfig:
    return _reference_config("dc-ae-tiny-f32c32", _TINY_F32, 32, None, (0, 1, 2, 1, 1, 1), (0, 2, 3, 1, 1, 1))


@register_preset
def dc_ae_tiny_f64c128() -> DCAEConfig:
    return _reference_config("dc-ae-tiny-f64c128", _TINY_F32 + (256,), 128, None,
                             (0, 1, 2, 1, 1, 1, 1), (0, 2, 3, 1, 1, 1, 1))


# The DC-AE 1.5 topology (structured latent, ResBlocks only) at 3/16 width with shallow stages, for training a
# structured latent on a CPU; f64 adds one more stage of the last width, as the published f64c128-1.5 does.
_TINY_1_5_DEPTHS = (0, 1, 2, 1, 1, 1)


@register_preset
def dc_ae_tiny_f32c128_1_5() -> DCAEConfig:
    return _dc_ae_1_x("dc-ae-tiny-f32c128-1.5", _TINY_F32, _TINY_1_5_DEPTHS, 128, None, structured=True)


@register_preset
def dc_ae_tiny_f64c128_1_5() -> DCAEConfig:
    return _dc_ae_1_x("dc-ae-tiny-f64c128-1.5", _TINY_F32 + (192,), _TINY_1_5_DEPTHS + (1,), 128, None,
                      structured=True)


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
# Names
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
    # A twin is a new model: nobody measured its latent scale.
    return dataclasses.replace(config, name=config.name + suffix, encoder=encoder, decoder=decoder)


def list_presets(include_variants: bool = True) -> list[str]:
    """All preset names; with `include_variants`, also each `-plain` and `-conv-shortcut` twin."""
    names = list(_PRESETS)
    if include_variants:
        names += [name + suffix for suffix in _VARIANTS for name in _PRESETS]
    return names


def get_config(name: str, **overrides: Any) -> DCAEConfig:
    """The config of a preset, with top-level fields overridden (e.g. latent_channels=64, scaling_factor=0.5).

    An unknown name is a DCAEError that names the closest presets.
    """
    name = _ALIASES.get(name, name) if isinstance(name, str) else name
    for suffix in _VARIANTS:
        if isinstance(name, str) and name.endswith(suffix) and name[: -len(suffix)] in _PRESETS:
            config = _variant(_PRESETS[name[: -len(suffix)]](), suffix)
            break
    else:
        if name not in _PRESETS:
            close = difflib.get_close_matches(str(name), list_presets(), n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(close)}?" if close else "`dcae info` lists them"
            raise DCAEError(f"unknown preset {name!r}; {hint}")
        config = _PRESETS[name]()
    return dataclasses.replace(config, **overrides) if overrides else config


def create_model(name: str, **overrides: Any) -> DCAE:
    """A randomly initialised model of a preset (seed torch before calling for reproducible weights)."""
    return DCAE(get_config(name, **overrides))


def published_presets() -> list[str]:
    """The presets whose weights were published by the DC-AE authors."""
    return list(_PUBLISHED)


def published(name: str) -> Published | None:
    """Hub id, scaling factor and sources of a published model (None for other presets)."""
    return _PUBLISHED.get(_ALIASES.get(name, name))


def published_scaling_factor(name: str) -> float | None:
    entry = published(name)
    return entry.scaling_factor if entry else None


SCALING_FACTOR_COMMAND = "dcae scaling-factor --model MODEL --data IMAGES"


def scaling_factor_note(config: DCAEConfig) -> str:
    """One line for `dcae info`: the factor and where it comes from, or how to measure it."""
    if config.scaling_factor is not None:
        entry = published(config.name)
        origin = "published" if entry and entry.scaling_factor == config.scaling_factor else "measured"
        return f"{config.scaling_factor} ({origin})"
    entry = published(config.name)
    who = "not published by the authors" if entry else "not measured"
    return f"none ({who}; measure it on the training data: {SCALING_FACTOR_COMMAND})"


def name_hint(path_or_id: str | PurePath) -> str | None:
    """The published model a Hub id or folder names, e.g. mit-han-lab/dc-ae-f32c32-in-1.0-diffusers; a file inside
    such a folder counts too. None if it names none."""
    parts = PurePath(str(path_or_id).rstrip("/")).parts
    for part in reversed(parts[-2:]):
        base = part.removesuffix("-diffusers")
        base = _ALIASES.get(base, base)
        if base in _PUBLISHED:
            return base
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Which published model do these keys and shapes make?
# ----------------------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _layout_shapes(name: str, layout: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The (key, shape) list of a preset in a layout, from the meta device (nothing allocated); cached by name."""
    return tuple(sorted(layout_shapes(get_config(name), layout).items()))


def _candidates() -> list[str]:
    """Published presets first (they are what config-less files are), then the tiny ones; twins share shapes."""
    return published_presets() + [n for n in list_presets(include_variants=False) if n not in _PUBLISHED]


def infer_config(shapes: dict[str, tuple[int, ...]], layout: str, hint: str | None, source: str) -> DCAEConfig:
    """The preset whose keys and shapes in `layout` match `shapes` exactly.

    Published models that share a topology (in/mix, sana-1.0/1.1, f32c128-1.1/1.5) match together: the folder or Hub
    name (`hint`) picks one; without it the topology is kept but the scaling factor is left unknown (None) rather
    than guessed. No match: a DCAEError naming the nearest preset and how it differs.
    """
    shapes = {k: tuple(v) for k, v in shapes.items()}
    matches = [n for n in _candidates() if dict(_layout_shapes(n, layout)) == shapes]
    if matches:
        if hint in matches:
            return get_config(hint)
        if len(matches) == 1:
            return get_config(matches[0])
        configs = [get_config(n) for n in matches]
        warnings.warn(f"{source}: keys and shapes fit {', '.join(matches)}; loaded without a scaling factor (name "
                      "the folder after the model, e.g. .../{matches[0]}/, to get its published one)", stacklevel=2)
        structured = all(c.structured_latent for c in configs)
        return dataclasses.replace(configs[0], name="/".join(matches), scaling_factor=None,
                                   structured_latent=structured)
    nearest, reason = _nearest(shapes, layout)
    raise DCAEError(f"{source}: {layout} checkpoint matches no known model and carries no config; nearest is "
                    f"{nearest} ({reason}); pass config=DCAEConfig(...) or put a config.json beside it")


def _nearest(shapes: dict[str, tuple[int, ...]], layout: str) -> tuple[str, str]:
    best: tuple[int, str, str] | None = None
    for name in _candidates():
        reference = dict(_layout_shapes(name, layout))
        missing = sorted(set(reference) - set(shapes))
        unexpected = sorted(set(shapes) - set(reference))
        misshaped = sorted(k for k in set(reference) & set(shapes) if reference[k] != shapes[k])
        score = len(missing) + len(unexpected) + len(misshaped)
        if best is None or score < best[0]:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing, e.g. {missing[0]}")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
            if misshaped:
                k = misshaped[0]
                parts.append(f"{len(misshaped)} of other shape, e.g. {k} {shapes[k]} vs {reference[k]}")
            best = (score, name, "; ".join(parts))
    assert best is not None
    return best[1], best[2]


def match_published(config: DCAEConfig, hint: str | None) -> DCAEConfig:
    """A config read from a diffusers config.json, replaced by the published preset it is when that is certain: the
    hint names a preset of the same topology, or exactly one such preset has the config's scaling factor."""
    try:
        topology = diffusers_topology(config)
    except DCAEError:
        return config
    same = [n for n in published_presets() if diffusers_topology(get_config(n)) == topology]
    if hint in same:
        return get_config(hint)
    by_factor = [n for n in same if config.scaling_factor is not None
                 and published_scaling_factor(n) == config.scaling_factor]
    return get_config(by_factor[0]) if len(by_factor) == 1 else config
