"""`dcae decode LATENT... -o OUTDIR`: .safetensors latents written by `dcae encode` -> images of the original size."""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass

import torch
from tqdm import tqdm

from dcae.commands.reconstruct import (Job, Progress, add_model_arguments, add_output_arguments, autocast, batches,
                                       one_line, plan_jobs, prepare, report_error)
from dcae.errors import DCAEError
from dcae.images import DEFAULT_MAX_PIXELS, from_model_range, write_image
from dcae.tiling import MemoryBudget, decode_latent, read_latent, resolve_tile


@dataclass
class LoadedLatent:
    """A checked latent file, ready for the model."""

    job: Job
    latent: torch.Tensor  # (1, c, h, w) float32
    size: tuple[int, int]  # original (H, W) to crop to
    alpha: torch.Tensor | None  # (1, H, W) uint8
    key: Hashable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="LATENT", help=".safetensors files or folders (recursive)")
    parser.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder for the decoded images")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"refuse to decode larger images (default {DEFAULT_MAX_PIXELS})")
    add_model_arguments(parser)
    add_output_arguments(parser, keep_alpha=False)  # an alpha plane stored by `encode --keep-alpha` is restored


def load_latents(jobs: list[Job], model: torch.nn.Module, args: argparse.Namespace, budget: MemoryBudget,
                 command: str, on_error: Callable[[Job], None]) -> Iterator[LoadedLatent]:
    """Read and check each latent file and plan its tiles; bad files and latents over the budget are skipped."""
    factor = model.spatial_factor
    for job in jobs:
        try:
            latent, size, alpha, _ = read_latent(job.source, model, max_pixels=args.max_pixels)
            full = (latent.shape[-2] * factor, latent.shape[-1] * factor)
            size = size or full
            if size[0] * size[1] > args.max_pixels:
                raise DCAEError(f"{job.source}: decodes to {size[1]}x{size[0]} = {size[0] * size[1] / 1e6:.1f} Mpx, "
                                f"over the limit of {args.max_pixels / 1e6:.1f} Mpx (raise it with --max-pixels)")
            try:
                tiled = resolve_tile(args.tile, *full, factor, args.overlap, budget) is not None
            except DCAEError as error:
                raise DCAEError(f"{job.source}: {error}") from None
        except DCAEError as error:
            report_error(command, str(error))
            on_error(job)
            continue
        key = ("tiled", id(job)) if tiled else (tuple(latent.shape), size)
        yield LoadedLatent(job, latent, size, alpha, key)


def run(args: argparse.Namespace) -> int:
    command = "decode"
    device, model, model_id, budget = prepare(args, command, ("decode",))
    jobs, failures = plan_jobs(args.inputs, args.output, "." + args.format, command, extensions=(".safetensors",))
    progress = Progress.start(len(jobs), "file")
    done = 0
    start = time.perf_counter()

    with torch.inference_mode():
        latents = load_latents(jobs, model, args, budget, command, progress.fail)
        for batch in batches(latents, lambda item: item.key, args.batch_size):
            try:
                z = torch.cat([item.latent for item in batch])  # (B, c, h, w)
                if batch[0].key[0] != "tiled":
                    z = z.to(device)
                with autocast(device, args.dtype):
                    y = decode_latent(model, z, size=batch[0].size, tile=args.tile, overlap=args.overlap,
                                      budget=budget)
                if not torch.isfinite(y).all():
                    raise DCAEError("the decoded image has NaN/Inf values (fp16 overflow? try --dtype bf16 or fp32)")
                images = from_model_range(y).cpu()  # (B, 3, H, W) uint8
            except (DCAEError, RuntimeError, MemoryError, ValueError) as error:
                for item in batch:
                    report_error(command, f"{item.job.source}: {one_line(error)}")
                    progress.fail(item.job)
                continue
            for i, item in enumerate(batch):
                image = images[i]
                if item.alpha is not None:
                    image = torch.cat([image, item.alpha])  # (4, H, W)
                try:
                    write_image(item.job.output, image, format=args.format, quality=args.quality)
                except DCAEError as error:
                    report_error(command, str(error))
                    progress.fail(item.job)
                    continue
                tqdm.write(f"{item.job.source} -> {item.job.output}  {item.size[1]}x{item.size[0]}", file=sys.stdout)
                done += 1
                progress.bar.update(1)
    progress.bar.close()
    failures += len(progress.failed)
    elapsed = time.perf_counter() - start
    rate = f" in {elapsed:.1f} s ({done / elapsed:.2f} latents/s)" if done else ""
    print(f"decoded {done}/{done + failures} latents{rate} with {model_id}")
    return 1 if failures else 0
