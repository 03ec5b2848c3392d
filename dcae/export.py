"""ONNX export of the encoder and decoder, and an ONNX Runtime runner to check and time the exported files.

Two traps sit between a DC-AE and a correct ONNX file; both are handled here or in `dcae.nn`, and
tests/test_export.py fails if either comes back:

- LiteMLA chooses its attention path with a Python branch on the token count (N x N ReLU attention when H*W <= 32,
  linear attention above). An exporter freezes that branch at the example's size. `dcae.nn.LiteMLA` takes the linear
  path while exporting: the same function at every size, O(N) memory.
- The attention divides by (sum + 1e-15). onnxscript's graph optimizer (run by `torch.onnx.export(dynamo=True)` by
  default) rewrites `x + c` to `x` whenever |c| <= 1e-8 (its `add_0` rule compares with math.isclose), so the eps
  vanishes: a query whose ReLU features barely meet any key then gets the value average instead of ~0 (an O(1) error
  that the following blocks spread), or 0/0 = NaN when they meet none. We export unoptimized; ONNX Runtime runs its
  own graph optimizations at load, which keep the eps.

`channels` exports a decoder for the first-k latent channels of a structured-latent model (DC-AE 1.5), one file per
channel count; a model whose decoder takes only its full latent refuses any other count.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import secrets
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn

from dcae.errors import DCAEError, write_failure

PARTS = ("encoder", "decoder")
OPSET = 18  # onnxruntime >= 1.16 runs it everywhere; torch.onnx's dynamo exporter translates to it natively
PARITY_TOLERANCE = 1e-4  # max abs difference between ONNX Runtime and dcae, fp32, per unit of output scale
MAX_LATENT_SIDE = 4096  # upper bound of a dynamic latent side (a 131k px image at f32): a bound, not a promise
MAX_EXAMPLE_PIXELS = 4096 * 4096  # the example is traced and run (batch 2): larger is memory, not a better export
ONNX_METADATA_PREFIX = "dcae."


class _Encode(nn.Module):
    """`model.encode` as a module: the graph starts at the image in [-1, 1]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.encode(image)  # (B, c, H/f, W/f)


class _Decode(nn.Module):
    """`model.decode` as a module: the graph starts at the raw latent (not multiplied by the scaling factor)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.model.decode(latent)  # (B, 3, h*f, w*f)


@dataclass(frozen=True)
class ExportedPart:
    """One written ONNX file, with its parity against the PyTorch model at the example size (None if not checked)."""

    part: str
    path: Path
    input_shape: tuple[int, ...]
    max_abs_diff: float | None
    tolerance: float | None = None


def onnx_filename(part: str, channels: int | None = None) -> str:
    """`encoder.onnx`, `decoder.onnx`, or `decoder-c16.onnx` for a decoder of the first 16 latent channels."""
    return f"{part}.onnx" if channels is None else f"{part}-c{channels}.onnx"


def example_input(model: nn.Module, part: str, image_size: tuple[int, int], batch: int = 2,
                  channels: int | None = None) -> torch.Tensor:
    """A fixed-seed example for tracing and the parity check: an image in [-1, 1], or a latent of unit scale."""
    height, width = image_size
    factor = model.spatial_factor
    if height % factor or width % factor or height < factor or width < factor:
        raise DCAEError(f"--size {height}x{width}: expected positive multiples of the model's spatial factor {factor}")
    if height * width > MAX_EXAMPLE_PIXELS or max(height, width) > MAX_LATENT_SIDE * factor:
        raise DCAEError(f"--size {height}x{width}: larger than the example export traces and checks (at most "
                        f"{MAX_EXAMPLE_PIXELS / 1e6:.1f} Mpx, sides up to {MAX_LATENT_SIDE * factor}); export at a "
                        f"small --size with --dynamic-size, which takes any size")
    generator = torch.Generator().manual_seed(0)
    if part == "encoder":
        return torch.rand(batch, model.config.in_channels, height, width, generator=generator) * 2 - 1
    c = model.latent_channels if channels is None else channels
    return torch.randn(batch, c, height // factor, width // factor, generator=generator)


def dynamic_shapes(part: str, factor: int, dynamic_size: bool) -> tuple[dict[int, object]]:
    """torch.export dims: the batch always; with `dynamic_size` the sides too (an image side a multiple of f)."""
    dims: dict[int, object] = {0: torch.export.Dim("batch", min=1, max=1024)}
    if dynamic_size:
        height = torch.export.Dim("latent_height", min=1, max=MAX_LATENT_SIDE)
        width = torch.export.Dim("latent_width", min=1, max=MAX_LATENT_SIDE)
        scale = factor if part == "encoder" else 1
        dims[2], dims[3] = (scale * height, scale * width) if scale > 1 else (height, width)
    return (dims,)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch.onnx prints progress lines and warns about torchvision ops it does not need; keep the CLI's output ours."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(open(os.devnull, "w")):  # noqa: SIM115
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def to_onnx_program(model: nn.Module, part: str, example: torch.Tensor, dynamic_size: bool):
    """The torch.onnx (dynamo) export of one part, unoptimized (see the module docstring), with dcae metadata."""
    if part not in PARTS:
        raise DCAEError(f"unknown part {part!r}; choose from {', '.join(PARTS)} or both")
    module = (_Encode if part == "encoder" else _Decode)(model).eval()
    names = ("image", "latent") if part == "encoder" else ("latent", "image")
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            module, (example,), dynamo=True, optimize=False, opset_version=OPSET,
            input_names=[names[0]], output_names=[names[1]],
            dynamic_shapes=dynamic_shapes(part, model.spatial_factor, dynamic_size),
        )
    metadata = {
        "part": part,
        "config": json.dumps(model.config.to_dict()),
        "spatial_factor": str(model.spatial_factor),
        "latent_channels": str(example.shape[1] if part == "decoder" else model.latent_channels),
        "scaling_factor": json.dumps(model.config.scaling_factor),
        "dynamic_size": json.dumps(dynamic_size),
        "input_range": "image in [-1, 1]" if part == "encoder" else "raw latent (not scaled)",
    }
    for key, value in metadata.items():  # on the IR model that `save` serializes (model_proto is a fresh copy)
        program.model.metadata_props[ONNX_METADATA_PREFIX + key] = value
    return program


def write_onnx(program, path: Path) -> None:
    """Write atomically; a model over protobuf's 2 GB limit gets its weights beside it in `NAME.data`."""
    path = Path(path)
    staging = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        staging.mkdir(parents=True)
        large = program.model_proto.ByteSize() > 2**31 - 2**26
        program.save(staging / path.name, external_data=large)
        for written in sorted(staging.iterdir(), key=lambda p: p.name == path.name):  # the .onnx last
            os.replace(written, path.parent / written.name)
    except OSError as error:
        raise DCAEError(f"{path}: cannot write: {write_failure(error, path.parent)}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def onnx_runner(path: str | os.PathLike, threads: int | None = None,
                providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> Callable[[torch.Tensor], torch.Tensor]:
    """An ONNX Runtime session as a function of a float32 tensor: `run(x) -> torch.Tensor`. `threads` sets
    intra-op threads (None: onnxruntime's default). This is what `dcae bench ae` times for its onnxruntime rows."""
    ort = _onnxruntime()
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
    except Exception as error:  # onnxruntime raises its own exception types for unreadable files
        raise DCAEError(f"{path}: cannot load ONNX model: {str(error).strip().splitlines()[0]}") from None
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(session.run(None, {name: array})[0])

    return run


def onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The dcae.* metadata of an exported file (part, config, spatial factor, ...), prefix removed."""
    onnx = _onnx()
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as error:
        raise DCAEError(f"{path}: not an ONNX model: {str(error).strip().splitlines()[0]}") from None
    return {p.key[len(ONNX_METADATA_PREFIX):]: p.value for p in proto.metadata_props
            if p.key.startswith(ONNX_METADATA_PREFIX)}


def tolerance_for(reference: torch.Tensor) -> float:
    """PARITY_TOLERANCE for outputs within [-1, 1] (images), scaled by the largest magnitude beyond that: a trained
    encoder's raw latents reach several hundred, where fp32 itself is only good to ~1e-4 (its own error against
    fp64 there is 2e-4), so an absolute 1e-4 would fail a correct export."""
    return PARITY_TOLERANCE * max(1.0, float(reference.abs().max()))


def parity(model: nn.Module, part: str, path: Path, x: torch.Tensor) -> tuple[float, float]:
    """(max abs difference between ONNX Runtime on `path` and the PyTorch model in fp32 on input `x`, tolerance)."""
    with torch.no_grad():
        reference = (model.encode if part == "encoder" else model.decode)(x.float())
    return float((onnx_runner(path)(x) - reference).abs().max()), tolerance_for(reference)


def export_onnx(model: nn.Module, directory: str | os.PathLike, parts: tuple[str, ...] = PARTS,
                image_size: tuple[int, int] = (256, 256), dynamic_size: bool = False,
                channels: int | None = None, check: bool = True) -> list[ExportedPart]:
    """Export `parts` of `model` (fp32, CPU, eval mode; the caller's model is left as it was) to
    DIRECTORY/{encoder,decoder}.onnx.

    Without `dynamic_size` the files take images of `image_size` (latents of image_size / f) only; with it, any size
    (sides multiples of f). The batch is always free. `channels` exports the decoder for the first-k latent channels
    (a structured-latent model); `check` runs ONNX Runtime on the example and records the max abs difference.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DCAEError(f"{directory}: cannot create output directory ({error.strerror})") from None
    if channels is not None and not 1 <= channels <= model.latent_channels:
        raise DCAEError(f"--channels {channels}: expected 1 to the model's {model.latent_channels} latent channels")
    tensors = [*model.parameters(), *model.buffers()]
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in tensors) or any(t.device.type != "cpu"
                                                                                          for t in tensors):
        model = copy.deepcopy(model).to("cpu", torch.float32)  # the caller's bf16/GPU model stays as it was
    was_training = model.training
    try:
        return _export_parts(model.eval(), directory, parts, image_size, dynamic_size, channels, check)
    finally:
        model.train(was_training)


def _export_parts(model: nn.Module, directory: Path, parts: tuple[str, ...], image_size: tuple[int, int],
                  dynamic_size: bool, channels: int | None, check: bool) -> list[ExportedPart]:
    written = []
    for part in parts:
        x = example_input(model, part, image_size, channels=channels if part == "decoder" else None)
        if part == "decoder" and channels not in (None, model.latent_channels):
            try:
                with torch.no_grad():
                    model.decode(x[:1, :, :1, :1])
            except (ValueError, RuntimeError) as error:
                raise DCAEError(f"{getattr(model.config, 'name', 'model')}: the decoder does not take "
                                f"{channels} latent channels ({str(error).splitlines()[0]})") from None
        program = to_onnx_program(model, part, x, dynamic_size)
        path = directory / onnx_filename(part, channels if part == "decoder" else None)
        write_onnx(program, path)
        diff, tolerance = parity(model, part, path, x) if check else (None, None)
        if diff is not None and not diff <= tolerance:  # NaN fails too
            raise DCAEError(f"{path}: ONNX Runtime differs from dcae by {diff:.3g} (max abs, fp32) on the example "
                            f"input, above {tolerance:.3g}: the export is wrong, please report it")
        written.append(ExportedPart(part, path, tuple(x.shape), diff, tolerance))
    return written


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise DCAEError("onnxruntime is not installed: pip install 'dcae[export]'") from None
    return onnxruntime


def _onnx():
    try:
        import onnx
    except ImportError:
        raise DCAEError("onnx is not installed: pip install 'dcae[export]'") from None
    return onnx


def require_exporter(runtime: bool = True) -> None:
    """A one-line error before any model work when the export extra is missing."""
    _onnx()
    if runtime:
        _onnxruntime()
    try:
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter translates through it)
    except ImportError:
        raise DCAEError("onnxscript is not installed: pip install 'dcae[export]'") from None
