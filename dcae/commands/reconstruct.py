"""`dcae reconstruct INPUT... -o OUTDIR`: encode and decode images, write the reconstructions, print PSNR/SSIM.

Also holds what `dcae encode` and `dcae decode` share: model loading, device/dtype options, output planning,
batching and one-line error reporting. A bad file costs one line on stderr and exit status 1; the run goes on.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import TypeVar

import torch
from tqdm import tqdm

from dcae.errors import DCAEError
from dcae.images import (DEFAULT_MAX_PIXELS, find_images, from_model_range, read_image_with_alpha, to_model_range,
                         write_image)
from dcae.tiling import MemoryBudget, decode_latent, encode_image, memory_budget, padding_for, resolve_tile

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROGRESS_ABOVE = 3  # a progress bar for more than this many files
T = TypeVar("T")


# --- options shared by reconstruct / encode / decode --------------------------------------------------------------
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --device, --dtype, --tile, --overlap, --max-memory, --batch-size."""
    parser.add_argument("--model", metavar="M", default=None,
                        help="directory written by save_pretrained, a checkpoint file, a Hub id, or a preset name "
                             "(random weights); default: the model shipped with dcae")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the model runs (default: cuda if available)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                        help="autocast compute dtype; attention stays fp32 (default: fp32)")
    parser.add_argument("--tile", default="auto", metavar="auto|none|SIZE",
                        help="tile side in pixels (a multiple of the spatial factor); auto tiles images over 1 Mpx")
    parser.add_argument("--overlap", type=int, default=None, metavar="PX",
                        help="pixels shared by neighbouring tiles (multiple of the spatial factor; default tile/8)")
    parser.add_argument("--max-memory", type=float, default=None, metavar="GB",
                        help="memory one pass may use: auto tiles shrink to fit it, and an untiled pass or tile "
                             "that would not fit is refused (default: 80%% of the device's free memory)")
    parser.add_argument("--batch-size", type=int, default=1, metavar="N",
                        help="images of the same size run together (default: 1)")


def add_output_arguments(parser: argparse.ArgumentParser, keep_alpha: bool = True) -> None:
    """--format, --quality (+ --keep-alpha) for commands that write images."""
    parser.add_argument("--format", choices=("png", "jpg", "webp"), default="png",
                        help="output format (default: png, lossless)")
    parser.add_argument("--quality", type=int, default=95, help="jpg/webp quality 1-100; webp 100 is lossless")
    if keep_alpha:
        parser.add_argument("--keep-alpha", action="store_true",
                            help="carry an input's alpha channel unchanged into the output (png/webp)")


def select_device(name: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' -> a device that exists."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DCAEError("--device cuda: no CUDA device is available")
    return torch.device(name)


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Autocast context for --dtype (a no-op for fp32)."""
    if DTYPES[dtype] == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def check_options(args: argparse.Namespace) -> None:
    """Refuse bad numeric options before the model is loaded or any file touched (exit status 2)."""
    if args.batch_size < 1 or args.max_pixels < 1:
        raise DCAEError("--batch-size and --max-pixels must be positive")
    if args.max_memory is not None and not (0 < args.max_memory < math.inf):
        raise DCAEError(f"--max-memory {args.max_memory}: expected a positive number of GB")
    if not 1 <= getattr(args, "quality", 95) <= 100:
        raise DCAEError(f"--quality {args.quality}: expected 1 to 100")


def check_tile_options(args: argparse.Namespace, factor: int) -> None:
    """Refuse a --tile/--overlap that does not fit the model's spatial factor (exit status 2)."""
    huge = 1 << 20  # large enough that any valid tile size is used
    resolve_tile(args.tile, huge, huge, factor, args.overlap)


def warn(command: str, message: str) -> None:
    tqdm.write(f"dcae {command}: warning: {message}", file=sys.stderr)


def report_error(command: str, message: str) -> None:
    """One line on stderr, safe to call while a progress bar is shown."""
    from dcae.cli import printable

    tqdm.write(f"dcae {command}: error: {printable(message)}", file=sys.stderr)


def load_model(spec: str | None, device: torch.device, command: str) -> tuple[torch.nn.Module, str]:
    """--model value -> (model in eval mode on `device`, short model id for metadata and messages)."""
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
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DCAEError(f"{spec}: cannot load model: {message}") from None
        model_id = Path(spec).name if Path(spec).exists() else spec
    return model.to(device).eval(), model_id


# --- inputs and outputs -------------------------------------------------------------------------------------------
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


def prepare(args: argparse.Namespace, command: str, ops: tuple[str, ...]
            ) -> tuple[torch.device, torch.nn.Module, str, MemoryBudget]:
    """Check the options, pick the device, load the model and set the memory budget of one image of a batch
    for `ops` ("encode", "decode"): the start every image command shares."""
    check_options(args)
    device = select_device(args.device)
    model, model_id = load_model(args.model, device, command)
    check_tile_options(args, model.spatial_factor)
    return device, model, model_id, memory_budget(model, device, args.max_memory, ops, args.batch_size)


@dataclass
class Progress:
    """The progress bar over the planned jobs, and the jobs that failed after planning."""
    bar: tqdm
    failed: list[Job]

    @classmethod
    def start(cls, total: int, unit: str) -> "Progress":
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


def one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@dataclass
class Loaded:
    """An image read from disk, ready for the model."""

    job: Job
    rgb: torch.Tensor  # (3, H, W) uint8, alpha composited onto white
    alpha: torch.Tensor | None  # (1, H, W) uint8
    key: Hashable  # images with equal keys may share a batch


def load_images(jobs: list[Job], factor: int, args: argparse.Namespace, budget: MemoryBudget, command: str,
                on_error: Callable[[Job], None]) -> Iterator[Loaded]:
    """Read each job's image and plan its tiles; unreadable files and images over the budget are reported, skipped."""
    for job in jobs:
        try:
            rgb, alpha = read_image_with_alpha(job.source, max_pixels=args.max_pixels)
            height, width = rgb.shape[-2:]
            pad_h, pad_w = padding_for(height, width, factor)
            try:
                tiled = resolve_tile(args.tile, height + pad_h, width + pad_w, factor, args.overlap, budget) is not None
            except DCAEError as error:
                raise DCAEError(f"{job.source}: {error}") from None
        except DCAEError as error:
            report_error(command, str(error))
            on_error(job)
            continue
        key = ("tiled", id(job)) if tiled else (height, width)  # tiled images run alone
        yield Loaded(job, rgb, alpha, key)


# --- reconstruct --------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders (searched recursively)")
    parser.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder for the reconstructions")
    parser.add_argument("--side-by-side", action="store_true", help="write input | reconstruction side by side")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"refuse larger images, a decompression-bomb guard (default {DEFAULT_MAX_PIXELS})")
    add_model_arguments(parser)
    add_output_arguments(parser)
    parser.add_argument("--channels", type=int, default=None, metavar="K",
                        help="decode only the first K latent channels (structured-latent models: DC-AE 1.5)")


def reconstruct(model: torch.nn.Module, rgb: torch.Tensor, device: torch.device, tile: str, overlap: int | None,
                budget: MemoryBudget | None = None, channels: int | None = None
                ) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(B, 3, H, W) uint8 -> ((B, 3, H, W) uint8 reconstruction, latent shape (c, h, w)); call under inference_mode."""
    height, width = rgb.shape[-2:]
    x = to_model_range(rgb)
    if resolve_tile(tile, *(s + p for s, p in zip((height, width), padding_for(height, width, model.spatial_factor))),
                    model.spatial_factor, overlap, budget) is None:
        x = x.to(device)  # whole image on the device; tiled runs move one tile at a time
    z = encode_image(model, x, tile=tile, overlap=overlap, budget=budget)[:, :channels]  # (B, c or K, h, w)
    if not torch.isfinite(z).all():
        raise DCAEError("the latent has NaN/Inf values (fp16 overflow? try --dtype bf16 or fp32)")
    y = decode_latent(model, z, size=(height, width), tile=tile, overlap=overlap, budget=budget)  # (B, 3, H, W)
    if not torch.isfinite(y).all():
        raise DCAEError("the decoded image has NaN/Inf values (fp16 overflow? try --dtype bf16 or fp32)")
    return from_model_range(y).cpu(), tuple(z.shape[1:])


def image_metrics(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) uint8 pairs -> per-image (PSNR dB, SSIM); SSIM is NaN below its 11x11 window."""
    from dcae.metrics import psnr, ssim

    fa, fb = a.float() / 255, b.float() / 255
    p = psnr(fa, fb).float()
    s = ssim(fa, fb).float() if min(a.shape[-2:]) >= 11 else torch.full((a.shape[0],), math.nan)
    return p, s


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def _output_image(rgb: torch.Tensor, out: torch.Tensor, alpha: torch.Tensor | None, args: argparse.Namespace
                  ) -> torch.Tensor:
    if args.side_by_side:
        return torch.cat([rgb, out], dim=-1)  # (3, H, 2W)
    if args.keep_alpha and alpha is not None and args.format != "jpg":  # JPEG has no alpha: keep the composite
        return torch.cat([out, alpha], dim=0)  # (4, H, W)
    return out


def run(args: argparse.Namespace) -> int:
    command = "reconstruct"
    device, model, model_id, budget = prepare(args, command, ("encode", "decode"))
    factor, channels = model.spatial_factor, args.channels or model.latent_channels
    if args.channels is not None:
        from dcae.autoencoder import check_latent_channels
        check_latent_channels(model.config, args.channels)
    jobs, failures = plan_jobs(args.inputs, args.output, "." + args.format, command)
    progress = Progress.start(len(jobs), "img")
    psnrs: list[float] = []
    ssims: list[float] = []
    latent_shapes: set[tuple[int, ...]] = set()
    pixels = latent_values = 0
    start = time.perf_counter()

    loaded = load_images(jobs, factor, args, budget, command, progress.fail)
    with torch.inference_mode():
        for batch in batches(loaded, lambda item: item.key, args.batch_size):
            rgb = torch.stack([item.rgb for item in batch])
            try:
                with autocast(device, args.dtype), warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # e.g. autocast dtype notes, once per batch
                    out, latent_shape = reconstruct(model, rgb, device, args.tile, args.overlap, budget, args.channels)
                batch_psnr, batch_ssim = image_metrics(rgb, out)
            except (DCAEError, RuntimeError, MemoryError, ValueError) as error:
                for item in batch:
                    report_error(command, f"{item.job.source}: {one_line(error)}")
                    progress.fail(item.job)
                continue
            for i, item in enumerate(batch):
                try:
                    write_image(item.job.output, _output_image(item.rgb, out[i], item.alpha, args),
                                format=args.format, quality=args.quality)
                except DCAEError as error:
                    report_error(command, str(error))
                    progress.fail(item.job)
                    continue
                height, width = item.rgb.shape[-2:]
                psnrs.append(float(batch_psnr[i]))
                ssims.append(float(batch_ssim[i]))
                latent_shapes.add(latent_shape)
                pixels += 3 * height * width
                latent_values += math.prod(latent_shape)
                c, h, w = latent_shape
                tqdm.write(f"{item.job.source}  {width}x{height} -> latent {c}x{h}x{w}  "
                           f"PSNR {batch_psnr[i]:.2f} dB  SSIM {_fmt(float(batch_ssim[i]))}", file=sys.stdout)
                progress.bar.update(1)
    progress.bar.close()
    elapsed = time.perf_counter() - start
    done = len(psnrs)
    failures += len(progress.failed)
    summary = f"reconstructed {done}/{done + failures} images"
    if done:
        shape = ("x".join(map(str, latent_shapes.pop())) if len(latent_shapes) == 1
                 else f"{channels}x(H/{factor})x(W/{factor})")
        finite_ssim = [s for s in ssims if not math.isnan(s)]
        mean_ssim = sum(finite_ssim) / len(finite_ssim) if finite_ssim else math.nan
        summary += (f" in {elapsed:.1f} s ({done / elapsed:.2f} images/s) with {model_id} on {device.type} "
                    f"{args.dtype}; mean PSNR {sum(psnrs) / done:.2f} dB, mean SSIM {_fmt(mean_ssim)}; latent {shape} "
                    f"(f{factor}c{channels}), compression {pixels / latent_values:.1f}x (RGB values per latent value)")
    print(summary)
    return 1 if failures else 0
