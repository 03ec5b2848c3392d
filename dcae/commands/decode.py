"""`dcae decode LATENT... -o OUTDIR`: .safetensors latents written by `dcae encode` -> images of the original size."""
from __future__ import annotations

import argparse
import time

import torch

from dcae.commands.options import add_max_pixels_argument, add_model_arguments, add_output_arguments, prepare
from dcae.images import from_model_range, write_image
from dcae.runtime import Item, Progress, check_finite, plan_jobs, read_latents, run_batches
from dcae.tiling import decode_latent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="LATENT", help=".safetensors files or folders (recursive)")
    parser.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder for the decoded images")
    add_max_pixels_argument(parser, "refuse to decode larger images")
    add_model_arguments(parser)
    add_output_arguments(parser, keep_alpha=False)  # an alpha plane stored by `encode --keep-alpha` is restored


def run(args: argparse.Namespace) -> int:
    command = "decode"
    runtime, model, model_id, budget = prepare(args, command, ("decode",))
    jobs, failures = plan_jobs(args.inputs, args.output, "." + args.format, command, extensions=(".safetensors",))
    progress = Progress.start(len(jobs), "file")
    start = time.perf_counter()

    def work(batch: list[Item]) -> torch.Tensor:
        z = torch.cat([item.data for item in batch])  # (B, c, h, w)
        y = check_finite(decode_latent(model, z, plan=batch[0].plan), "the decoded image")
        return from_model_range(y).cpu()  # (B, 3, H, W) uint8

    def finish(item: Item, i: int, images: torch.Tensor) -> str:
        image = images[i] if item.alpha is None else torch.cat([images[i], item.alpha])  # (3|4, H, W)
        write_image(item.job.output, image, format=args.format, quality=args.quality)
        return f"{item.job.source} -> {item.job.output}  {item.plan.size[1]}x{item.plan.size[0]}"

    items = read_latents(jobs, model, args.tile, args.overlap, args.max_pixels, budget, command, progress.fail)
    done = run_batches(items, args.batch_size, runtime, command, progress, work, finish)
    failures += len(progress.failed)
    elapsed = time.perf_counter() - start
    rate = f" in {elapsed:.1f} s ({done / elapsed:.2f} latents/s)" if done else ""
    print(f"decoded {done}/{done + failures} latents{rate} with {model_id}")
    return 1 if failures else 0
