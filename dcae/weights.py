"""Checkpoints: safetensors load/save in three layouts, and the key maps between them.

- `dcae`:        `model.safetensors` with dcae's own parameter names and the config in the safetensors metadata
                 (a checkpoint alone rebuilds its model); `config.json` beside it for people.
- `efficientvit`: the original release (`mit-han-lab/dc-ae-*-1.0`: `model.safetensors`, efficientvit key names).
- `diffusers`:   `config.json` + `diffusion_pytorch_model.safetensors`, loadable by `diffusers.AutoencoderDC`.

The key maps are generated from the model's own structure (not string-replaced from a list), so every key of every
preset maps one to one, and loading is strict: a missing, unexpected or mis-shaped tensor is an error naming the keys.
Pickle checkpoints are refused unless `allow_pickle=True`, and then read with `torch.load(weights_only=True)`.

This module translates layouts and reads and writes files; it knows nothing of published models. Which published
model a file is (and its scaling factor) is `dcae.presets`' question; `dcae.pretrained` loads, using both.
"""
from __future__ import annotations

import json
import re
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dcae.autoencoder import DCAE, DCAEConfig, DecoderConfig, EncoderConfig
from dcae.errors import DCAEError, first_line
from dcae.files import atomic_write, atomic_write_text

FORMATS = ("dcae", "diffusers", "efficientvit")
DCAE_WEIGHTS = "model.safetensors"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DIFFUSERS_VERSION = "0.32.0"  # the first diffusers release with AutoencoderDC
MAX_CONFIG_BYTES = 1 << 20  # a config.json larger than this is not a config


# ----------------------------------------------------------------------------------------------------------------------
# Key maps: dcae name -> efficientvit name, dcae name -> diffusers name(s)
# ----------------------------------------------------------------------------------------------------------------------
_STAGE_KEY = re.compile(r"^(encoder|decoder)\.stages\.(\d+)\.(\d+)\.(.+)$")

# Inside a block: dcae suffix prefix -> (efficientvit, diffusers) replacement.
_BLOCK_RENAMES = [
    ("conv1.", "main.conv1.conv.", "conv1."),
    ("conv2.", "main.conv2.conv.", "conv2."),
    ("norm.", "main.conv2.norm.", "norm."),
    ("attn.qkv.", "context_module.main.qkv.conv.", None),  # diffusers splits it into to_q / to_k / to_v
    ("attn.proj.", "context_module.main.proj.conv.", "attn.to_out."),
    ("attn.norm.", "context_module.main.proj.norm.", "attn.norm_out."),
    ("mlp.inverted_conv.", "local_module.main.inverted_conv.conv.", "conv_out.conv_inverted."),
    ("mlp.depth_conv.", "local_module.main.depth_conv.conv.", "conv_out.conv_depth."),
    ("mlp.point_conv.", "local_module.main.point_conv.conv.", "conv_out.conv_point."),
    ("mlp.norm.", "local_module.main.point_conv.norm.", "conv_out.norm."),
]
_AGGREG = re.compile(r"^attn\.aggreg\.(\d+)\.([01])\.(.+)$")


def _unsupported(key: str, layout: str) -> DCAEError:
    return DCAEError(f"parameter {key!r} has no counterpart in the {layout} layout (a dcae-only ablation block)")


def efficientvit_key(key: str, config: DCAEConfig) -> str:
    """The efficientvit name of a dcae state-dict key."""
    enc, dec = config.encoder, config.decoder
    if key.startswith("encoder.project_in."):
        if enc.depth_list[0] == 0 and enc.downsample_block == "conv":
            return key  # efficientvit's strided ConvLayer stem: project_in.conv.{weight,bias}, as in dcae
        return "encoder.project_in.conv." + key[len("encoder.project_in."):]
    if key.startswith("encoder.project_out.conv."):
        wrap = "main." if enc.out_shortcut else ""
        return f"encoder.project_out.{wrap}op_list.0.conv." + key[len("encoder.project_out.conv."):]
    if key.startswith("decoder.project_in.conv."):
        wrap = "main." if dec.in_shortcut else ""
        return f"decoder.project_in.{wrap}conv." + key[len("decoder.project_in.conv."):]
    if key.startswith("decoder.norm_out."):
        return "decoder.project_out.op_list.0." + key[len("decoder.norm_out."):]
    if key.startswith("decoder.project_out."):
        return "decoder.project_out.op_list.2.conv." + key[len("decoder.project_out."):]
    m = _STAGE_KEY.match(key)
    if not m:
        raise _unsupported(key, "efficientvit")
    side, stage, index, rest = m.groups()
    prefix = f"{side}.stages.{stage}.op_list.{index}."
    if rest.startswith("conv."):  # a down/up-sampling block, wrapped in ResidualBlock when it has a shortcut
        shortcut = enc.downsample_shortcut if side == "encoder" else dec.upsample_shortcut
        if shortcut not in ("averaging", "duplicating", None):
            raise _unsupported(key, "efficientvit")
        # ConvPixelUnshuffle / ConvPixelShuffle / InterpolateConv layers hold a ConvLayer (`.conv.conv.`); the
        # strided `Conv` down-sampling block is a ConvLayer itself (`.conv.`).
        strided = side == "encoder" and enc.downsample_block == "conv"
        return prefix + ("main." if shortcut else "") + ("" if strided else "conv.") + rest
    a = _AGGREG.match(rest)
    if a:
        return prefix + f"context_module.main.aggreg.{a.group(1)}.{a.group(2)}.{a.group(3)}"
    for ours, theirs, _ in _BLOCK_RENAMES:
        if rest.startswith(ours):
            return prefix + theirs + rest[len(ours):]
    raise _unsupported(key, "efficientvit")


def diffusers_keys(key: str) -> list[str]:
    """The diffusers name(s) of a dcae state-dict key (the fused qkv conv becomes three linear layers)."""
    simple = {
        "encoder.project_in.": "encoder.conv_in.",
        "encoder.project_out.conv.": "encoder.conv_out.",
        "decoder.project_in.conv.": "decoder.conv_in.",
        "decoder.norm_out.": "decoder.norm_out.",
        "decoder.project_out.": "decoder.conv_out.",
    }
    for ours, theirs in simple.items():
        if key.startswith(ours):
            return [theirs + key[len(ours):]]
    m = _STAGE_KEY.match(key)
    if not m:
        raise _unsupported(key, "diffusers")
    side, stage, index, rest = m.groups()
    prefix = f"{side}.{'down_blocks' if side == 'encoder' else 'up_blocks'}.{stage}.{index}."
    if rest.startswith("conv."):
        return [prefix + rest]
    if rest.startswith("attn.qkv."):
        suffix = rest[len("attn.qkv."):]
        return [prefix + f"attn.to_{p}.{suffix}" for p in "qkv"]
    a = _AGGREG.match(rest)
    if a:
        part = "proj_in" if a.group(2) == "0" else "proj_out"
        return [prefix + f"attn.to_qkv_multiscale.{a.group(1)}.{part}.{a.group(3)}"]
    for ours, _, theirs in _BLOCK_RENAMES:
        if theirs is not None and rest.startswith(ours):
            return [prefix + theirs + rest[len(ours):]]
    raise _unsupported(key, "diffusers")


def to_efficientvit(state: dict[str, torch.Tensor], config: DCAEConfig) -> dict[str, torch.Tensor]:
    return {efficientvit_key(k, config): v for k, v in state.items()}


def from_efficientvit(state: dict[str, torch.Tensor], config: DCAEConfig, source: str) -> dict[str, torch.Tensor]:
    inverse = {efficientvit_key(k, config): k for k in _meta_state(config)}
    _check_key_sets(set(state), set(inverse), source)
    return {inverse[k]: v for k, v in state.items()}


def to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        names = diffusers_keys(key)
        if len(names) == 3:  # qkv conv (3C, C, 1, 1) -> three (C, C) linear weights
            for name, part in zip(names, value.chunk(3, dim=0)):
                out[name] = part.flatten(1).contiguous()
        elif key.endswith("attn.proj.weight"):  # 1x1 conv -> linear
            out[names[0]] = value.flatten(1).contiguous()
        else:
            out[names[0]] = value
    return out


def from_diffusers(state: dict[str, torch.Tensor], config: DCAEConfig, source: str) -> dict[str, torch.Tensor]:
    reference = _meta_state(config)
    expected = {name for key in reference for name in diffusers_keys(key)}
    _check_key_sets(set(state), expected, source)
    out: dict[str, torch.Tensor] = {}
    for key, ref in reference.items():
        names = diffusers_keys(key)
        if len(names) == 3:
            out[key] = torch.cat([state[n] for n in names], dim=0).reshape(ref.shape) if _numel_ok(state, names, ref) \
                else _shape_error(source, key, [tuple(state[n].shape) for n in names], ref)
        elif key.endswith("attn.proj.weight"):
            value = state[names[0]]
            out[key] = value.reshape(ref.shape) if value.numel() == ref.numel() else _shape_error(
                source, names[0], tuple(value.shape), ref)
        else:
            out[key] = state[names[0]]
    return out


def _numel_ok(state: dict[str, torch.Tensor], names: list[str], ref: torch.Tensor) -> bool:
    return sum(state[n].numel() for n in names) == ref.numel()


def _shape_error(source: str, key: str, shape: Any, ref: torch.Tensor):
    raise DCAEError(f"{source}: tensor {key!r} has shape {shape}, the model expects {tuple(ref.shape)}")


def _check_key_sets(found: set[str], expected: set[str], source: str) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (e.g. {', '.join(unexpected[:3])})")
        raise DCAEError(f"{source}: checkpoint does not match the model: {'; '.join(parts)}")


# ----------------------------------------------------------------------------------------------------------------------
# diffusers config <-> DCAEConfig
# ----------------------------------------------------------------------------------------------------------------------
_NORM_TO_DIFFUSERS = {"rms2d": "rms_norm", "trms2d": "rms_norm", "bn2d": "batch_norm"}
# diffusers builds a strided conv for any downsample_block_type but "pixel_unshuffle" and interpolates only for
# "interpolate"; the published Sana config says "Conv" (diffusers' conversion script "conv").
_DOWNSAMPLE_TO_DIFFUSERS = {"pixel_unshuffle": "pixel_unshuffle", "conv": "Conv"}
_DOWNSAMPLE_FROM_DIFFUSERS = {"pixel_unshuffle": "pixel_unshuffle", "Conv": "conv", "conv": "conv"}
_UPSAMPLE_TO_DIFFUSERS = {"pixel_shuffle": "pixel_shuffle", "interpolate": "interpolate"}


def diffusers_topology(config: DCAEConfig) -> dict[str, Any]:
    """The `AutoencoderDC` arguments that fix the architecture (all but the scaling factor); DCAEError names whatever
    diffusers cannot represent. A structured latent is not among them: diffusers runs such a model at full width."""
    enc, dec = config.encoder, config.decoder
    n = len(enc.width_list)
    problems = []
    if enc.norm not in ("rms2d", "trms2d") or enc.act != "silu":
        problems.append("the encoder must use rms2d norm and silu")
    if enc.downsample_shortcut != "averaging" or dec.upsample_shortcut != "duplicating":
        problems.append("down/up-sampling blocks must have the residual-autoencoding shortcuts")
    if enc.downsample_block not in _DOWNSAMPLE_TO_DIFFUSERS or dec.upsample_block not in _UPSAMPLE_TO_DIFFUSERS:
        problems.append("unknown down/up-sampling block")
    if dec.out_norm not in ("rms2d", "trms2d"):
        problems.append("the decoder head norm must be rms2d")

    def block_types(cfg) -> tuple[list[str], list[list[int]]]:
        types = cfg.block_type if isinstance(cfg.block_type, (tuple, list)) else (cfg.block_type,) * n
        kinds = ["ResBlock" if t == "ResBlock" else "EfficientViTBlock" for t in types]
        scales = [[5] if t == "EViTS5_GLU" else [] for t in types]
        return kinds, scales

    dec_norms = dec.norm if isinstance(dec.norm, (tuple, list)) else (dec.norm,) * n
    dec_acts = dec.act if isinstance(dec.act, (tuple, list)) else (dec.act,) * n
    dec_kinds, dec_scales = block_types(dec)
    for kind, norm, act in zip(dec_kinds, dec_norms, dec_acts):
        if kind == "EfficientViTBlock" and (norm not in ("rms2d", "trms2d") or act != "silu"):
            problems.append("decoder EfficientViT blocks must use rms2d and silu")
            break
    if problems:
        raise DCAEError(f"model {config.name!r} cannot be written in the diffusers layout: {'; '.join(problems)}")
    enc_kinds, enc_scales = block_types(enc)
    return {
        "in_channels": config.in_channels,
        "latent_channels": config.latent_channels,
        "attention_head_dim": config.attention_head_dim,
        "encoder_block_types": enc_kinds,
        "decoder_block_types": dec_kinds,
        "encoder_block_out_channels": list(enc.width_list),
        "decoder_block_out_channels": list(dec.width_list),
        "encoder_layers_per_block": list(enc.depth_list),
        "decoder_layers_per_block": list(dec.depth_list),
        "encoder_qkv_multiscales": enc_scales,
        "decoder_qkv_multiscales": dec_scales,
        "upsample_block_type": _UPSAMPLE_TO_DIFFUSERS[dec.upsample_block],
        "downsample_block_type": _DOWNSAMPLE_TO_DIFFUSERS[enc.downsample_block],
        "decoder_norm_types": [_NORM_TO_DIFFUSERS[x] for x in dec_norms],
        "decoder_act_fns": list(dec_acts),
        "encoder_out_shortcut": enc.out_shortcut,
        "decoder_in_shortcut": dec.in_shortcut,
        "decoder_conv_act_fn": dec.out_act,
    }


def diffusers_config(config: DCAEConfig) -> dict[str, Any]:
    """The `AutoencoderDC` config.json of a dcae config; an error names whatever diffusers cannot represent.

    An unmeasured scaling factor (None) is written as 1.0, AutoencoderDC's own default (latents pass unscaled),
    with `_dcae_unmeasured_scaling_factor: true` beside it (diffusers ignores `_` keys; dcae reads it back as None),
    and a warning that names the command that measures it.
    """
    out = {"_class_name": "AutoencoderDC", "_diffusers_version": DIFFUSERS_VERSION, **diffusers_topology(config)}
    if config.scaling_factor is None:
        warnings.warn(f"model {config.name!r} has no measured scaling_factor: its diffusers config says 1.0 (latents "
                      "unscaled) and _dcae_unmeasured_scaling_factor: true; measure it with `dcae scaling-factor "
                      "--model DIR --data IMAGES` (docs/models.md)", stacklevel=2)
        return {**out, "scaling_factor": 1.0, "_dcae_unmeasured_scaling_factor": True}
    return {**out, "scaling_factor": config.scaling_factor}


def config_from_diffusers(d: dict[str, Any], name: str, source: str) -> DCAEConfig:
    """A DCAEConfig from an `AutoencoderDC` config.json (defaults as in diffusers where a key is absent)."""
    try:
        n = len(d.get("encoder_block_out_channels", (128, 256, 512, 512, 1024, 1024)))

        def per_stage(value, default):
            value = default if value is None else value
            return list(value) if isinstance(value, (list, tuple)) else [value] * n

        def types(kinds, scales):
            out = []
            for kind, scale in zip(per_stage(kinds, "ResBlock"), scales):
                if kind == "ResBlock":
                    out.append("ResBlock")
                elif kind == "EfficientViTBlock" and list(scale) in ([], [5]):
                    out.append("EViTS5_GLU" if list(scale) == [5] else "EViT_GLU")
                else:
                    raise ValueError(f"unsupported block {kind!r} with multiscales {scale}")
            return tuple(out)

        default_scales = [[], [], [], [5], [5], [5]]
        down = d.get("downsample_block_type", "pixel_unshuffle")
        up = d.get("upsample_block_type", "pixel_shuffle")
        if down not in _DOWNSAMPLE_FROM_DIFFUSERS:
            raise ValueError(f"downsample_block_type {down!r} is not one of {', '.join(_DOWNSAMPLE_FROM_DIFFUSERS)}")
        if up not in _UPSAMPLE_TO_DIFFUSERS:
            raise ValueError(f"upsample_block_type {up!r} is not one of {', '.join(_UPSAMPLE_TO_DIFFUSERS)}")
        norms = {"rms_norm": "rms2d", "batch_norm": "bn2d"}
        enc = EncoderConfig(
            width_list=tuple(d.get("encoder_block_out_channels", (128, 256, 512, 512, 1024, 1024))),
            depth_list=tuple(d.get("encoder_layers_per_block", (2, 2, 2, 3, 3, 3))),
            block_type=types(d.get("encoder_block_types"), d.get("encoder_qkv_multiscales", default_scales)),
            out_shortcut=bool(d.get("encoder_out_shortcut", True)),
            downsample_block=_DOWNSAMPLE_FROM_DIFFUSERS[down],
        )
        dec = DecoderConfig(
            width_list=tuple(d.get("decoder_block_out_channels", (128, 256, 512, 512, 1024, 1024))),
            depth_list=tuple(d.get("decoder_layers_per_block", (3, 3, 3, 3, 3, 3))),
            block_type=types(d.get("decoder_block_types"), d.get("decoder_qkv_multiscales", default_scales)),
            norm=tuple(norms[x] for x in per_stage(d.get("decoder_norm_types"), "rms_norm")),
            act=tuple(per_stage(d.get("decoder_act_fns"), "silu")),
            in_shortcut=bool(d.get("decoder_in_shortcut", True)),
            out_act=d.get("decoder_conv_act_fn", "relu"),
            upsample_block=up,
        )
        scaling = d.get("scaling_factor", 1.0)
        if d.get("_dcae_unmeasured_scaling_factor"):
            scaling = None
        config = DCAEConfig(name=name, in_channels=int(d.get("in_channels", 3)),
                          latent_channels=int(d.get("latent_channels", 32)),
                          attention_head_dim=int(d.get("attention_head_dim", 32)), encoder=enc, decoder=dec,
                            scaling_factor=None if scaling in (None, 1.0) else float(scaling))
        config.validate()
        return config
    except (KeyError, ValueError, TypeError) as error:
        raise DCAEError(f"{source}: not a supported AutoencoderDC config ({error})") from None


# ----------------------------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------------------------
def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; a broken or non-safetensors file is a one-line DCAEError."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DCAEError(f"{path}: not a readable safetensors file ({reason})") from None
    return tensors, metadata


def read_pickle_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A .pt/.bin/.ckpt state dict through torch.load(weights_only=True): tensors and containers only, no code."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for hostile or broken pickles
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DCAEError(f"{path}: refused or unreadable pickle checkpoint ({reason})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # the original efficientvit .pt release wraps the state dict
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DCAEError(f"{path}: pickle checkpoint does not hold a state dict of tensors")
    return obj


def read_json(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise DCAEError(f"{path}: config file is larger than {MAX_CONFIG_BYTES} bytes")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DCAEError(f"{path}: not a readable JSON config ({error})") from None
    except RecursionError:  # [[[[... : within the size limit, deeper than the decoder goes
        raise DCAEError(f"{path}: not a readable JSON config (nested too deeply)") from None
    if not isinstance(data, dict):
        raise DCAEError(f"{path}: JSON config must be an object")
    return data


def config_from_json_text(text: str, source: str) -> DCAEConfig:
    try:
        return DCAEConfig.from_dict(json.loads(text))
    except (json.JSONDecodeError, ValueError, TypeError) as error:
        raise DCAEError(f"{source}: invalid dcae config ({first_line(error)})") from None
    except RecursionError:
        raise DCAEError(f"{source}: invalid dcae config (JSON nested too deeply)") from None


MAX_PARAMETERS = 4_000_000_000  # 16 GB of fp32 weights; the largest published DC-AE (f128c512) has 1.1B


def check_model_size(config: DCAEConfig, source: str) -> None:
    """Validate a config and count its parameters on the meta device: a DCAEError before any weight is allocated."""
    try:
        config.validate()
        count = sum(v.numel() for k, v in _meta_state(config).items() if k not in _meta_buffers(config))
    except (ValueError, TypeError) as error:
        raise DCAEError(f"{source}: invalid dcae config ({first_line(error)})") from None
    if count > MAX_PARAMETERS:
        raise DCAEError(f"{source}: config describes a model of {count / 1e9:.1f}B parameters, over the limit of "
                        f"{MAX_PARAMETERS / 1e9:.0f}B")


def _meta_state(config: DCAEConfig) -> dict[str, torch.Tensor]:
    """The state dict's keys and shapes, without allocating the weights (one meta-device build per config: a load
    asks for it three times). Read-only: callers must not change the dict."""
    return _meta_model(json.dumps(config.to_dict(), sort_keys=True))[0]


def _meta_buffers(config: DCAEConfig) -> frozenset[str]:
    return _meta_model(json.dumps(config.to_dict(), sort_keys=True))[1]


@lru_cache(maxsize=8)
def _meta_model(config_json: str) -> tuple[dict[str, torch.Tensor], frozenset[str]]:
    """(state dict on the meta device, the names of its buffers) of a config given as its sorted JSON."""
    with torch.device("meta"):
        model = DCAE(DCAEConfig.from_dict(json.loads(config_json)))
    return model.state_dict(), frozenset(name for name, _ in model.named_buffers())


def layout_shapes(config: DCAEConfig, layout: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a config's checkpoint in one of FORMATS, from the meta device (nothing allocated)."""
    state = _meta_state(config)
    if layout == "efficientvit":
        return {efficientvit_key(k, config): tuple(v.shape) for k, v in state.items()}
    if layout == "diffusers":
        return {k: tuple(v.shape) for k, v in to_diffusers(state).items()}
    return {k: tuple(v.shape) for k, v in state.items()}


def meta_shapes(config: DCAEConfig) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in _meta_state(config).items()}


def check_shapes(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], source: str) -> None:
    """Key sets and shapes of a checkpoint against a model's (from the meta device): DCAEError naming the first ones."""
    _check_key_sets(set(state), set(expected), source)
    bad = [f"{k} {tuple(v.shape)} != {expected[k]}" for k, v in state.items() if tuple(v.shape) != expected[k]]
    if bad:
        raise DCAEError(f"{source}: {len(bad)} tensor(s) with the wrong shape (e.g. {'; '.join(bad[:3])})")


def load_state_dict_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy tensors into the model; missing, unexpected, mis-shaped or non-numeric tensors are a DCAEError."""
    own = model.state_dict()
    check_shapes(state, {k: tuple(v.shape) for k, v in own.items()}, source)
    converted = {}
    for k, v in state.items():
        target = own[k]
        if target.is_floating_point() != v.is_floating_point() and not (k.endswith("num_batches_tracked")):
            raise DCAEError(f"{source}: tensor {k!r} has dtype {v.dtype}, expected {target.dtype}")
        converted[k] = v.to(target.dtype)
    model.load_state_dict(converted, strict=True)



# ----------------------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------------------
def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def save_pretrained(model: DCAE, directory: str | Path, format: str = "dcae",
                    dtype: torch.dtype | None = None) -> Path:
    """Write `model` to `directory` in one of FORMATS. `dtype` (e.g. torch.float16) stores floats smaller."""
    if format not in FORMATS:
        raise DCAEError(f"unknown checkpoint format {format!r}; choose from {', '.join(FORMATS)}")
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DCAEError(f"{directory}: cannot create output directory ({error.strerror})") from None
    config = model.config
    # `dtype` shrinks parameters only: buffers (BatchNorm running statistics) stay fp32, since running variances of
    # deep ResBlock stacks exceed fp16's range (65504) and would load as inf.
    buffers = {name for name, _ in model.named_buffers()}
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() and k not in buffers else v)
             for k, v in model.state_dict().items()}
    config_text = json.dumps(config.to_dict(), sort_keys=True)
    metadata = {"format": "pt", "dcae_format": format, "dcae_config": config_text}
    try:
        if format == "dcae":
            write_safetensors(directory / DCAE_WEIGHTS, state, metadata)
            write_json(directory / "config.json", config.to_dict())
        elif format == "efficientvit":
            write_safetensors(directory / DCAE_WEIGHTS, to_efficientvit(state, config), metadata)
            write_json(directory / "config.json", config.to_dict())
        else:
            config_json = diffusers_config(config)
            write_safetensors(directory / DIFFUSERS_WEIGHTS, to_diffusers(state), metadata)
            write_json(directory / "config.json", config_json)
        atomic_write_text(directory / "README.md", model_card(model, format))
    except OSError as error:
        raise DCAEError(f"{directory}: cannot write checkpoint ({error.strerror or error})") from None
    return directory


_LOADERS = {
    "dcae": "import dcae\nmodel = dcae.DCAE.from_pretrained(\"{repo}\")",
    "diffusers": "from diffusers import AutoencoderDC\nmodel = AutoencoderDC.from_pretrained(\"{repo}\")",
    "efficientvit": "import dcae  # or efficientvit's DCAE_HF with this folder's config\n"
                    "model = dcae.DCAE.from_pretrained(\"{repo}\")",
}


def model_card(model: DCAE, format: str) -> str:
    """README.md for a saved model: the metadata model hubs read (YAML front matter) and what a user needs to know.

    Every value comes from the config, so the card never claims what the checkpoint does not carry; how the weights
    were trained is the trainer's to add (a run's MODEL_CARD.md), not something a config knows.
    """
    config = model.config
    params = sum(p.numel() for p in model.parameters())
    factor = config.scaling_factor
    scaling = (f"`{factor:.6g}` (multiply latents by it before diffusion; 1 / RMS of the latents, docs/models.md)"
               if factor is not None else "not measured: run `dcae scaling-factor --model THIS_FOLDER --data IMAGES` "
               "before training a diffusion model on these latents")
    tags = ["dc-ae", "autoencoder", "image-compression", f"f{config.spatial_factor}c{config.latent_channels}"]
    if format == "diffusers":
        tags.append("diffusers")
    structured = ("\n- Structured latent (DC-AE 1.5): any first k channels decode (`model.encode(x, channels=k)`)."
                  if config.structured_latent else "")
    front = "\n".join(["---", f"library_name: {'diffusers' if format == 'diffusers' else 'dcae'}", "tags:",
                        *[f"- {tag}" for tag in tags], "---"])
    name = json.dumps(config.name)[1:-1]  # a config string reaches markdown: keep it one plain line
    return f"""{front}
# {name}

A DC-AE (Deep Compression Autoencoder, [arXiv 2410.10733](https://arxiv.org/abs/2410.10733)) saved by dcae in the
`{format}` layout.

- Preset / architecture: `{name}`, {params / 1e6:.1f}M parameters
- Compression: {config.spatial_factor}x per side, {config.latent_channels} latent channels
  (a 3xHxW image becomes {config.latent_channels}x(H/{config.spatial_factor})x(W/{config.spatial_factor}))
- Latent scaling factor: {scaling}{structured}
- Images in [-1, 1]; `decode(encode(x))` reconstructs x.

```python
{_LOADERS[format].format(repo="THIS_FOLDER_OR_HUB_ID")}
```
"""


# ----------------------------------------------------------------------------------------------------------------------
# The embedded default model
# ----------------------------------------------------------------------------------------------------------------------
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "default-f32c32"


def default_model_path() -> Path | None:
    """The small model shipped inside the package (see its MODEL_CARD.md), or None if this install lacks it."""
    return DEFAULT_MODEL_DIR if (DEFAULT_MODEL_DIR / DCAE_WEIGHTS).exists() else None
