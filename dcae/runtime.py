"""Where and how model work runs, decided once per command: device, dtype (with `auto`), autocast, loading the model
a command names, and the loop over files (plan outputs, batch same-size inputs, progress, one line per failure).

Precision: bf16/fp16 run under autocast (convolutions and 1x1 projections in low precision); the linear attention
always runs in fp32 (see `dcae.nn.relu_linear_attention`), so fp16 cannot overflow in its sums over thousands of
tokens. `--dtype auto` (every command's default, and training's `precision=auto`) picks bf16 only where the hardware
runs it natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX) and fp32 elsewhere; fp16 is never picked for you.
Explicit bf16 or fp16 on a CPU that emulates them is honoured with one warning per process (about 10x slower than
fp32, and fp16's range is small). The choice is printed once on stderr and recorded in every results JSON.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, TypeVar

import torch
from tqdm import tqdm

from dcae.errors import DCAEError, first_line, printable
from dcae.images import find_images, read_image_with_alpha
from dcae.latent_file import read_latent
from dcae.tiling import MemoryBudget, TilePlan, TileSpec, plan_tiles

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)  # what every --dtype / precision= accepts
DEVICE_CHOICES = ("auto", "cpu", "cuda")
PROGRESS_ABOVE = 3  # a progress bar for more than this many files
T = TypeVar("T")


# --- hardware and precision ---------------------------------------------------------------------------------------
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

    An explicit bf16 or fp16 on a CPU is honoured; where the CPU emulates it, one warning per process says so
    (bf16 runs about 10x slower than fp32 there; CPU fp16 is emulated on all but AMX-FP16 parts and overflows easily).
    """
    device = torch.device(device)
    if name == "auto":
        return "bf16" if bf16_is_native(device) else "fp32"
    if name not in DTYPES:
        raise DCAEError(f"unknown dtype {name!r}; choose from {', '.join(DTYPE_CHOICES)}")
    if name == "bf16" and device.type == "cpu" and not bf16_is_native(device):
        _warn_once(f"dcae: warning: bf16 is emulated on this CPU ({cpu_isa()}, no AVX512-BF16/AMX): expect it to run "
                   "about 10x slower than fp32; --dtype auto picks fp32 here")
    if name == "fp16" and device.type == "cpu" and "amx_fp16" not in _cpu_flags():
        _warn_once(f"dcae: warning: fp16 is emulated on this CPU ({cpu_isa()}): expect it to run slower than fp32; "
                   "--dtype auto picks fp32 here")
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


def resolve_device(name: str | None = "auto") -> torch.device:
    """'auto' (or None) | 'cpu' | 'cuda' | 'cuda:N' -> a device that exists; under torchrun, 'cuda' is LOCAL_RANK's."""
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):  # meta, mps, xla...: nothing here runs on them
        raise DCAEError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DCAEError(f"--device {name}: no CUDA device is available")
        if device.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Autocast to a DTYPES name on `device` (a no-op for fp32)."""
    if DTYPES[dtype] == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


@dataclass(frozen=True)
class Runtime:
    """Where a command's model work runs and in which precision: chosen once (`Runtime.choose`), shown once."""

    device: torch.device
    dtype: str  # the resolved compute dtype: fp32 | bf16 | fp16
    requested: str = "auto"  # what was asked for (auto | fp32 | bf16 | fp16)

    @classmethod
    def choose(cls, device: str | None = "auto", dtype: str = "auto") -> Runtime:
        chosen = resolve_device(device)
        return cls(chosen, resolve_dtype(dtype, chosen), dtype)

    def describe(self) -> str:
        where = f"{self.device} ({cpu_isa()})" if self.device.type == "cpu" else str(self.device)
        return f"running on {where} in {self.dtype}" + (" (--dtype auto)" if self.requested == "auto" else "")

    def announce(self, command: str) -> None:
        """The one stderr line that says what was chosen."""
        tqdm.write(f"dcae {command}: {self.describe()}", file=sys.stderr)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.dtype)

    def record(self) -> dict[str, Any]:
        """For results JSON: the dtype asked for and used, and the hardware (device, CPU ISA, bf16 support)."""
        return {"dtype": self.dtype, "dtype_requested": self.requested, **hardware_record(self.device)}


# --- fast paths for benchmarks: precision, memory layout and compilation, chosen once -------------------------------
PASSES = ("encode", "decode")
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
NCHW_FP32_ENCODE_MAX_PIXELS = 256 * 256  # see memory_format: the largest fp32 encode that runs NCHW on a CPU


def memory_format(op: str, dtype: str, pixels: int, device: torch.device | str = "cpu") -> str:
    """The memory layout ("nchw" | "channels_last") of one encode or decode pass of an image of `pixels` pixels.

    The rule: channels_last everywhere except fp32 encodes of images up to 256x256 pixels, which run NCHW. Measured
    with both layouts in the same rounds on a quiet machine (`dcae bench ae --layouts`,
    results/bench_ae_layouts_cpu*.json, docs/speed.md "Memory layout"): channels_last is ahead in every bf16 pass
    (1-10%) and at 512 px fp32 on AVX-512 (7-8%); at 256 px fp32 the two are within 2-4%, and the small encode is 2%
    faster in NCHW on AVX512-BF16 (2% slower on AVX2).
    CUDA keeps channels_last (cuDNN's preferred layout; not measured here).
    """
    if op not in PASSES:
        raise ValueError(f"unknown pass {op!r}; expected one of {', '.join(PASSES)}")
    if torch.device(device).type == "cpu" and op == "encode" and dtype == "fp32" \
            and pixels <= NCHW_FP32_ENCODE_MAX_PIXELS:
        return "nchw"
    return "channels_last"


def other_layout(layout: str) -> str:
    """nchw <-> channels_last."""
    return "nchw" if layout == "channels_last" else "channels_last"


@dataclass
class InferenceOptions:
    dtype: str = "fp32"  # fp32 | bf16 | fp16 (autocast; attention stays fp32); resolve "auto" with resolve_dtype
    device: str = "cpu"
    channels_last: bool | None = None  # None: per pass, by `memory_format`; True / False force one layout
    compile: bool = False  # torch.compile the encoder and decoder (first call pays the compile time)

    def layout(self, op: str, pixels: int) -> str:
        """The layout of one pass: the forced one, else `memory_format`'s rule."""
        if self.channels_last is not None:
            return "channels_last" if self.channels_last else "nchw"
        return memory_format(op, self.dtype, pixels, self.device)


def prepare_model(model: torch.nn.Module, options: InferenceOptions) -> torch.nn.Module:
    """Eval mode, device, memory layout (when forced; else each pass sets its own) and (optionally) compilation.
    The weights stay fp32."""
    if options.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {options.dtype!r}; choose from {', '.join(DTYPES)}")
    model = model.eval().to(resolve_device(options.device))
    if options.channels_last is not None:
        for part in (model.encoder, model.decoder):
            set_layout(part, "channels_last" if options.channels_last else "nchw")
    if options.compile:
        model.encoder = torch.compile(model.encoder, dynamic=False)
        model.decoder = torch.compile(model.decoder, dynamic=False)
    return model


def set_layout(module: torch.nn.Module, layout: str) -> None:
    """Put a module's 4-d weights in `layout`, if they are not already (a copy of the weights, once per change).

    The weights and the input must agree: a convolution whose weight or input is channels_last runs channels_last, and
    one whose weight is NCHW while the input is channels_last pays a weight copy on every call.
    """
    if getattr(module, "_dcae_layout", "nchw") == layout:
        return
    with torch.inference_mode(False), torch.no_grad():
        module.to(memory_format=LAYOUTS[layout])
    module._dcae_layout = layout


def layout_of(module: torch.nn.Module) -> str:
    """The layout `set_layout` last gave the module's weights ("nchw" for a module it never touched)."""
    return getattr(module, "_dcae_layout", "nchw")


@contextlib.contextmanager
def precision(options: InferenceOptions) -> Iterator[None]:
    """inference_mode plus autocast for bf16/fp16."""
    with torch.inference_mode(), autocast(resolve_device(options.device), options.dtype):
        yield


def to_input(x: torch.Tensor, options: InferenceOptions, layout: str = "nchw") -> torch.Tensor:
    x = x.to(resolve_device(options.device), torch.float32)
    return x.contiguous(memory_format=LAYOUTS[layout]) if x.ndim == 4 else x


def encode(model, x: torch.Tensor, options: InferenceOptions) -> torch.Tensor:
    """Encode with the chosen fast path, in the pass's layout; returns an fp32, contiguous latent."""
    layout = options.layout("encode", x.shape[-2] * x.shape[-1])
    set_layout(model.encoder, layout)
    with precision(options):
        return model.encode(to_input(x, options, layout)).float().contiguous()


def decode(model, z: torch.Tensor, options: InferenceOptions) -> torch.Tensor:
    """Decode with the chosen fast path, in the pass's layout; returns an fp32, contiguous image tensor."""
    layout = options.layout("decode", z.shape[-2] * z.shape[-1] * model.spatial_factor**2)
    set_layout(model.decoder, layout)
    with precision(options):
        return model.decode(to_input(z, options, layout)).float().contiguous()


# --- messages and the model a command names -------------------------------------------------------------------------
def warn(command: str, message: str) -> None:
    tqdm.write(f"dcae {command}: warning: {message}", file=sys.stderr)


def report_error(command: str, message: str) -> None:
    """One line on stderr, safe to call while a progress bar is shown."""
    tqdm.write(f"dcae {command}: error: {printable(message)}", file=sys.stderr)


def load_model(spec: str | None, device: torch.device, command: str) -> tuple[torch.nn.Module, str]:
    """--model value -> (model in eval mode on `device`, short model id for metadata and messages).

    None means the model shipped with dcae; a preset name (not an existing path) gives RANDOM weights (seed 0), with
    a warning; anything else goes to DCAE.from_pretrained (folder, file, Hub id).
    """
    import dcae

    if spec is None:
        try:
            from dcae.weights import default_model_path
        except ImportError:
            default_model_path = None
        path = None
        if default_model_path is not None:
            try:
                path = default_model_path()
            except DCAEError:
                path = None
        if path is None:
            raise DCAEError("no default model is available in this installation; pass --model DIR "
                            "(a directory written by save_pretrained) or a preset name")
        spec = str(path)
    if spec in dcae.list_presets() and not Path(spec).exists():
        warn(command, f"--model {spec} is a preset with RANDOM weights (seed 0): outputs are meaningless "
                      f"except for testing; pass a trained checkpoint for real reconstructions")
        torch.manual_seed(0)  # the same preset name gives the same weights in encode and decode
        model, model_id = dcae.create_model(spec), spec
    else:
        try:
            model = dcae.DCAE.from_pretrained(spec)
        except DCAEError:
            raise
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise DCAEError(f"{spec}: cannot load model: {first_line(error)}") from None
        model_id = Path(spec).name if Path(spec).exists() else spec
    return model.to(device).eval(), model_id


# --- the loop over files --------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One input file and where its result goes."""

    source: Path
    relative: PurePath
    output: Path


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def plan_jobs(inputs: list[str], outdir: str, suffix: str, command: str,
              extensions: tuple[str, ...] | None = None) -> tuple[list[Job], int]:
    """Inputs -> (jobs, number of failures already reported): missing inputs, name clashes, outputs over inputs."""
    failures = 0
    out_root = Path(outdir).resolve()
    pairs: list[tuple[Path, PurePath]] = []
    for item in inputs:
        try:
            found = find_images([item]) if extensions is None else find_images([item], extensions)
        except DCAEError as error:
            report_error(command, str(error))
            failures += 1
            continue
        folder = Path(item).resolve()
        if folder.is_dir() and out_root != folder and _is_within(out_root, folder):
            found = [(p, r) for p, r in found if not _is_within(p.resolve(), out_root)]  # not last run's outputs
        if not found:
            report_error(command, f"{item}: no {'/'.join(extensions or ('image',))} files found")
            failures += 1
        pairs.extend(found)
    sources = {p.resolve() for p, _ in pairs}
    source_inodes = {(st.st_dev, st.st_ino) for st in (p.stat() for p, _ in pairs)}  # hard links too
    claimed: dict[Path, Path] = {}
    jobs: list[Job] = []
    for source, relative in pairs:
        output = out_root / relative.with_suffix(suffix)
        existing = output.stat() if output.exists() else None
        if output.resolve() in sources or (existing and (existing.st_dev, existing.st_ino) in source_inodes):
            report_error(command, f"{source}: output {output} would overwrite an input; choose another -o")
            failures += 1
        elif output in claimed:
            report_error(command, f"{source}: output {output} is already written for {claimed[output]}")
            failures += 1
        else:
            claimed[output] = source
            jobs.append(Job(source, relative, output))
    if jobs:
        try:  # fail fast, before any model work, when the output folder cannot exist or be written
            out_root.mkdir(parents=True, exist_ok=True)
            if not os.access(out_root, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied")
        except OSError as error:
            for job in jobs:
                report_error(command, f"{job.source}: cannot write {job.output}: {error.strerror or error}")
            return [], failures + len(jobs)
    return jobs, failures


@dataclass
class Item:
    """One job's input, read, checked and planned: what the batch loop carries."""

    job: Job
    data: torch.Tensor  # (3, H, W) uint8 image (alpha composited onto white), or (1, c, h, w) float32 latent
    alpha: torch.Tensor | None  # (1, H, W) uint8
    plan: TilePlan  # decided once, used by encode and decode

    @property
    def key(self) -> Hashable:
        """Items with equal keys may share a batch; a tiled item runs alone."""
        return ("tiled", id(self.job)) if self.plan.tiled else (tuple(self.data.shape), self.plan.size)


def _plan_for(job: Job, size: tuple[int, int], factor: int, tile: TileSpec, overlap: int | None,
              budget: MemoryBudget) -> TilePlan:
    """The job's tile plan; a plan that cannot be made (tile too big for the memory budget, ...) names the file."""
    try:
        return plan_tiles(tile, *size, factor, overlap, budget)
    except DCAEError as error:
        raise DCAEError(f"{job.source}: {error}") from None


def read_images(jobs: list[Job], factor: int, tile: TileSpec, overlap: int | None, max_pixels: int,
                budget: MemoryBudget, command: str, on_error: Callable[[Job], None]) -> Iterator[Item]:
    """Read each job's image and plan its tiles; unreadable files and images over the budget are reported, skipped."""
    for job in jobs:
        try:
            rgb, alpha = read_image_with_alpha(job.source, max_pixels=max_pixels)
            plan = _plan_for(job, rgb.shape[-2:], factor, tile, overlap, budget)
        except DCAEError as error:
            report_error(command, str(error))
            on_error(job)
            continue
        yield Item(job, rgb, alpha, plan)


def read_latents(jobs: list[Job], model: torch.nn.Module, tile: TileSpec, overlap: int | None, max_pixels: int,
                 budget: MemoryBudget, command: str, on_error: Callable[[Job], None]) -> Iterator[Item]:
    """Read and check each latent file and plan its tiles; bad files and latents over the budget are skipped."""
    factor = model.spatial_factor
    for job in jobs:
        try:
            latent, size, alpha, _ = read_latent(job.source, model, max_pixels=max_pixels)
            size = size or (latent.shape[-2] * factor, latent.shape[-1] * factor)
            if size[0] * size[1] > max_pixels:
                raise DCAEError(f"{job.source}: decodes to {size[1]}x{size[0]} = {size[0] * size[1] / 1e6:.1f} Mpx, "
                                f"over the limit of {max_pixels / 1e6:.1f} Mpx (raise it with --max-pixels)")
            plan = _plan_for(job, size, factor, tile, overlap, budget)
        except DCAEError as error:
            report_error(command, str(error))
            on_error(job)
            continue
        yield Item(job, latent, alpha, plan)


@dataclass
class Progress:
    """The progress bar over the planned jobs, and the jobs that failed after planning."""

    bar: tqdm
    failed: list[Job]

    @classmethod
    def start(cls, total: int, unit: str) -> Progress:
        return cls(tqdm(total=total, unit=unit, disable=total <= PROGRESS_ABOVE, file=sys.stderr, leave=False), [])

    def fail(self, job: Job) -> None:
        self.failed.append(job)
        self.bar.update(1)


def batches(items: Iterable[T], key: Callable[[T], Hashable], batch_size: int) -> Iterator[list[T]]:
    """Consecutive items with equal keys, at most `batch_size` at a time."""
    batch: list[T] = []
    for item in items:
        if batch and (key(item) != key(batch[0]) or len(batch) >= batch_size):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def run_batches(items: Iterable[Item], batch_size: int, runtime: Runtime, command: str, progress: Progress,
                work: Callable[[list[Item]], T], finish: Callable[[Item, int, T], str]) -> int:
    """The loop of encode, decode and reconstruct; returns how many items were done.

    Same-key items are batched; `work(batch)` runs the model under inference_mode and the runtime's autocast (an
    error fails the whole batch, one line per file); then `finish(item, i, result)` writes item i's output and
    returns the line to print (a DCAEError fails that item only). Closes the progress bar.
    """
    done = 0
    with torch.inference_mode():
        for batch in batches(items, lambda item: item.key, batch_size):
            try:
                with runtime.autocast(), warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # e.g. autocast dtype notes, once per batch
                    result = work(batch)
            except (DCAEError, RuntimeError, MemoryError, ValueError) as error:
                for item in batch:
                    report_error(command, f"{item.job.source}: {first_line(error)}")
                    progress.fail(item.job)
                continue
            for i, item in enumerate(batch):
                try:
                    line = finish(item, i, result)
                except DCAEError as error:
                    report_error(command, str(error))
                    progress.fail(item.job)
                    continue
                tqdm.write(line, file=sys.stdout)
                done += 1
                progress.bar.update(1)
    progress.bar.close()
    return done


def check_finite(x: torch.Tensor, what: str) -> torch.Tensor:
    """Refuse NaN/Inf model outputs with the hint that fits (fp16's small range is the usual cause)."""
    if not torch.isfinite(x).all():
        raise DCAEError(f"{what} has NaN/Inf values (fp16 overflow? try --dtype bf16 or fp32)")
    return x
