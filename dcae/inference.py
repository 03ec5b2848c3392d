"""Inference fast paths: precision, memory layout and compilation, chosen once and applied the same way everywhere.

bf16/fp16 run under autocast (convolutions and 1x1 projections in low precision); the linear attention always runs
in fp32 (see `dcae.nn.relu_linear_attention`), so fp16 cannot overflow in its sums over thousands of tokens.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class InferenceOptions:
    dtype: str = "fp32"  # fp32 | bf16 | fp16 (autocast; attention stays fp32)
    device: str = "cpu"
    channels_last: bool = True  # oneDNN and cuDNN convolutions prefer NHWC
    compile: bool = False  # torch.compile the encoder and decoder (first call pays the compile time)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        from dcae.errors import DCAEError

        raise DCAEError("--device cuda was asked for, but torch sees no CUDA device")
    return device


def prepare_model(model: torch.nn.Module, options: InferenceOptions) -> torch.nn.Module:
    """Eval mode, device, memory layout and (optionally) compilation. The weights stay fp32."""
    if options.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {options.dtype!r}; choose from {', '.join(DTYPES)}")
    model = model.eval().to(resolve_device(options.device))
    if options.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if options.compile:
        model.encoder = torch.compile(model.encoder, dynamic=False)
        model.decoder = torch.compile(model.decoder, dynamic=False)
    return model


@contextlib.contextmanager
def precision(options: InferenceOptions) -> Iterator[None]:
    """inference_mode plus autocast for bf16/fp16."""
    device_type = resolve_device(options.device).type
    with torch.inference_mode():
        if options.dtype == "fp32":
            yield
        else:
            with torch.autocast(device_type=device_type, dtype=DTYPES[options.dtype]):
                yield


def to_input(x: torch.Tensor, options: InferenceOptions) -> torch.Tensor:
    x = x.to(resolve_device(options.device), torch.float32)
    return x.contiguous(memory_format=torch.channels_last) if options.channels_last and x.ndim == 4 else x


def encode(model, x: torch.Tensor, options: InferenceOptions) -> torch.Tensor:
    """Encode with the chosen fast path; returns an fp32, contiguous latent."""
    with precision(options):
        return model.encode(to_input(x, options)).float().contiguous()


def decode(model, z: torch.Tensor, options: InferenceOptions) -> torch.Tensor:
    """Decode with the chosen fast path; returns an fp32, contiguous image tensor."""
    with precision(options):
        return model.decode(to_input(z, options)).float().contiguous()
