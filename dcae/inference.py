"""Inference fast paths: precision, memory layout and compilation, chosen once and applied the same way everywhere.

bf16/fp16 run under autocast (convolutions and 1x1 projections in low precision); the linear attention always runs
in fp32 (see `dcae.nn.relu_linear_attention`), so fp16 cannot overflow in its sums over thousands of tokens.
"""
from __future__ import annotations

import contextlib
import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)  # what every --dtype / precision= accepts


@functools.lru_cache(maxsize=None)
def cpu_isa() -> str:
    """The best matrix ISA this CPU offers torch: amx | avx512_bf16 | avx512 | avx2 | default | other arch name.

    Read from torch's own view (ATen's dispatch capability and oneDNN's bf16 check), so a capped ISA
    (ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA) reads as the machine it imitates.
    """
    capability = torch.backends.cpu.get_cpu_capability().lower()  # "AVX512", "AVX2", "DEFAULT", "ZVECTOR", ...
    if capability == "avx512" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        flags = _cpu_flags()  # oneDNN also "supports" bf16 on plain AVX-512 (by conversion): ask the CPU itself
        if "amx_bf16" in flags:
            return "amx"
        if "avx512_bf16" in flags or not flags:
            return "avx512_bf16"
    return capability


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def bf16_is_native(device: torch.device | str) -> bool:
    """True where bf16 matrix work runs in hardware: CUDA with bf16, CPUs with AVX512-BF16 or AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_isa() in ("avx512_bf16", "amx")
    return False


def resolve_dtype(name: str, device: torch.device | str) -> str:
    """'auto' -> bf16 where the device runs it natively, else fp32 (fp16 is never chosen for you).

    An explicit bf16 on a CPU that emulates it is honoured, with one warning per process: it runs ~10x slower
    than fp32 there. fp16 is refused off CUDA (CPU autocast fp16 is emulated too and overflows easily).
    """
    device = torch.device(device)
    if name == "auto":
        return "bf16" if bf16_is_native(device) else "fp32"
    if name not in DTYPES:
        from dcae.errors import DCAEError

        raise DCAEError(f"unknown dtype {name!r}; choose from {', '.join(DTYPE_CHOICES)}")
    if name == "bf16" and device.type == "cpu" and not bf16_is_native(device):
        _warn_once(f"dcae: warning: bf16 is emulated on this CPU ({cpu_isa()}, no AVX512-BF16/AMX): expect it to run "
                   "about 10x slower than fp32; --dtype auto picks fp32 here")
    return name


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    print(message, file=sys.stderr)


def hardware_record(device: torch.device | str = "cpu") -> dict:
    """What every results JSON and log records about the machine a number came from."""
    device = torch.device(device)
    record = {"device": device.type, "cpu_isa": cpu_isa(), "bf16_native": bf16_is_native(device),
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record


@dataclass
class InferenceOptions:
    dtype: str = "fp32"  # fp32 | bf16 | fp16 (autocast; attention stays fp32); resolve "auto" with resolve_dtype
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
