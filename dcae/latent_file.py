"""The latent file of `dcae encode` / `dcae decode`: one .safetensors file per image (format "dcae-latent/1").

Tensors: `latent` (c, h, w) in the model's latent space, NOT multiplied by the scaling factor, stored as float32,
float16 or bfloat16; `alpha` (1, H, W) uint8 when the image's alpha plane was kept. Metadata (all strings): format,
model id, config name and hash (sha256 of the model's JSON config: a latent decodes only with its own model), spatial
factor, latent channels, scaling factor, the image size before padding, the padding (bottom/right, reflect else
replicate), dtype, and whatever the writer adds (source, tile). `read_latent` refuses anything its model cannot decode.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from dcae.config import config_hash
from dcae.errors import DCAEError, first_line
from dcae.files import atomic_output
from dcae.tiling import padding_for

LATENT_FORMAT = "dcae-latent/1"
LATENT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def autoencoder_config_hash(model: nn.Module, length: int | None = None) -> str:
    """sha256 of the model's JSON config (sorted keys), `length` hex digits if given: which latent space a latent
    (or a latent cache) lives in. A module without `config_dict` is hashed by its repr."""
    config = model.config_dict() if hasattr(model, "config_dict") else {"repr": repr(model)}
    return config_hash(config, length)


def latent_metadata(model: nn.Module, model_id: str, size: tuple[int, int], dtype: torch.dtype,
                    **extra: str) -> dict[str, str]:
    """safetensors metadata (all strings) that lets `read_latent` restore and check a latent."""
    height, width = size
    pad_h, pad_w = padding_for(height, width, model.spatial_factor)
    scaling = getattr(getattr(model, "config", None), "scaling_factor", None)
    return {
        "format": LATENT_FORMAT,
        "model": model_id,
        "config_name": str(getattr(getattr(model, "config", None), "name", model_id)),
        "config_hash": autoencoder_config_hash(model),
        "spatial_factor": str(model.spatial_factor),
        "latent_channels": str(model.latent_channels),
        "scaling_factor": "none" if scaling is None else repr(float(scaling)),  # the tensor is NOT scaled by it
        "height": str(height),
        "width": str(width),
        "padding": json.dumps([0, pad_h, 0, pad_w]),  # top, bottom, left, right (reflect, else replicate)
        "dtype": str(dtype).removeprefix("torch."),
        **extra,
    }


def write_latent(path: str | os.PathLike, latent: torch.Tensor, metadata: dict[str, str],
                 alpha: torch.Tensor | None = None) -> None:
    """Write a (c, h, w) latent (+ optional (1, H, W) uint8 alpha) to .safetensors atomically."""
    tensors = {"latent": latent.detach().cpu().contiguous()}
    if alpha is not None:
        tensors["alpha"] = alpha.cpu().contiguous()
    data = save(tensors, metadata=metadata)  # bytes: a latent is small
    with atomic_output(path) as handle:
        handle.write(data)


def _metadata_int(path: Path, metadata: dict[str, str], key: str) -> int | None:
    if key not in metadata:
        return None
    try:
        value = int(metadata[key])
    except ValueError:
        raise DCAEError(f"{path}: metadata {key}={metadata[key]!r} is not an integer") from None
    if value < 1:
        raise DCAEError(f"{path}: metadata {key}={value} must be positive")
    return value


def read_latent(path: str | os.PathLike, model: nn.Module, max_pixels: int | None = None
                ) -> tuple[torch.Tensor, tuple[int, int] | None, torch.Tensor | None, dict[str, str]]:
    """Read and check a latent file for `model` -> ((1, c, h, w) float32, original (H, W) or None, alpha, metadata).

    Refuses (DCAEError naming the file) anything `model` cannot decode: not safetensors, no `latent` tensor,
    wrong rank or channel count, a non-float dtype, NaN/Inf, another model's config hash, inconsistent sizes.
    """
    path = Path(path)
    f = model.spatial_factor
    if not path.is_file():
        raise DCAEError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DCAEError(f"{path}: file is empty (0 bytes)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            keys = set(handle.keys())
            if "latent" not in keys:
                raise DCAEError(f"{path}: no 'latent' tensor (has {', '.join(sorted(keys)) or 'none'})")
            shape = handle.get_slice("latent").get_shape()  # from the header: nothing read yet
            if max_pixels is not None and len(shape) >= 2 and shape[-2] * shape[-1] * f * f > max_pixels:
                raise DCAEError(f"{path}: latent {'x'.join(map(str, shape))} decodes to "
                                f"{shape[-1] * f}x{shape[-2] * f} pixels, over the limit of {max_pixels / 1e6:.1f} Mpx "
                                f"(raise it with --max-pixels)")
            if "alpha" in keys and math.prod(handle.get_slice("alpha").get_shape()) > math.prod(shape[-2:]) * f * f:
                raise DCAEError(f"{path}: alpha plane is larger than the image the latent decodes to")
            latent = handle.get_tensor("latent")
            alpha = handle.get_tensor("alpha") if "alpha" in keys else None
    except DCAEError:
        raise
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for corrupt files
        raise DCAEError(f"{path}: not a readable .safetensors latent file ({first_line(error)})") from None
    f, c = model.spatial_factor, model.latent_channels
    expected_hash = autoencoder_config_hash(model)
    if "config_hash" in metadata and metadata["config_hash"] != expected_hash:
        raise DCAEError(f"{path}: latent comes from another model ({metadata.get('config_name', '?')}, config hash "
                        f"{metadata['config_hash'][:12]}), not from this one (config hash {expected_hash[:12]})")
    if latent.ndim == 4 and latent.shape[0] == 1:
        latent = latent[0]
    if latent.ndim != 3 or min(latent.shape) < 1:
        raise DCAEError(f"{path}: latent has shape {tuple(latent.shape)}, expected ({c}, h, w)")
    structured = bool(getattr(getattr(model, "config", None), "structured_latent", False))
    if latent.shape[0] != c and not (structured and latent.shape[0] < c):  # DC-AE 1.5 decodes any first k <= c
        raise DCAEError(f"{path}: latent has {latent.shape[0]} channels, this model expects "
                        f"{f'1 to {c} (a structured latent)' if structured else c}")
    if latent.dtype not in LATENT_DTYPES.values():
        raise DCAEError(f"{path}: latent dtype {str(latent.dtype).removeprefix('torch.')} is not one of "
                        f"{', '.join(LATENT_DTYPES)}")
    if not torch.isfinite(latent).all():
        raise DCAEError(f"{path}: latent contains NaN or Inf values")
    height, width = _metadata_int(path, metadata, "height"), _metadata_int(path, metadata, "width")
    size = None
    if height is not None or width is not None:
        if height is None or width is None:
            raise DCAEError(f"{path}: metadata has only one of height/width")
        if math.ceil(height / f) != latent.shape[1] or math.ceil(width / f) != latent.shape[2]:
            raise DCAEError(f"{path}: metadata size {width}x{height} does not match a latent of "
                            f"{latent.shape[2]}x{latent.shape[1]} at f{f}")
        size = (height, width)
    if alpha is not None:
        expected = (1, *(size or (latent.shape[1] * f, latent.shape[2] * f)))
        if alpha.dtype != torch.uint8 or tuple(alpha.shape) != expected:
            raise DCAEError(f"{path}: alpha has shape {tuple(alpha.shape)} {alpha.dtype}, expected {expected} uint8")
    return latent[None].float(), size, alpha, metadata
