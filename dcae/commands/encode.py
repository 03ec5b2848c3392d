"""`dcae encode INPUT... -o OUTDIR`: one .safetensors latent per image, with what `dcae decode` needs to undo it."""
from __future__ import annotations

import argparse
import time

import torch

from dcae.autoencoder import check_latent_channels
from dcae.commands.options import add_max_pixels_argument, add_model_arguments, prepare
from dcae.images import to_model_range
from dcae.latent_file import latent_metadata, write_latent
from dcae.runtime import DTYPES, Item, Progress, check_finite, plan_jobs, read_images, run_batches
from dcae.tiling import encode_image


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders (searched recursively)")
    parser.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder for the .safetensors latents")
    add_max_pixels_argument(parser)
    parser.add_argument("--keep-alpha", action="store_true",
                        help="store an input's alpha channel (uint8) beside the latent; decode restores it")
    parser.add_argument("--channels", type=int, default=None, metavar="K",
                        help="keep only the first K latent channels (structured-latent models: DC-AE 1.5)")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    command = "encode"
    runtime, model, model_id, budget = prepare(args, command, ("encode",))
    if args.channels is not None:
        check_latent_channels(model.config, args.channels)
    jobs, failures = plan_jobs(args.inputs, args.output, ".safetensors", command)
    progress = Progress.start(len(jobs), "img")
    # an explicit --dtype bf16/fp16 also stores latents in it (half the bytes); auto never changes the file: float32
    dtype = torch.float32 if runtime.requested == "auto" else DTYPES[runtime.dtype]
    start = time.perf_counter()

    def work(batch: list[Item]) -> torch.Tensor:
        x = to_model_range(torch.stack([item.data for item in batch]))  # (B, 3, H, W)
        z = encode_image(model, x, plan=batch[0].plan)[:, :args.channels]  # (B, c or K, h, w) on the CPU
        return check_finite(z, "the latent")  # the first K channels are what encode(channels=K) gives

    def finish(item: Item, i: int, z: torch.Tensor) -> str:
        height, width = item.plan.size
        metadata = latent_metadata(model, model_id, (height, width), dtype, source=str(item.job.relative),
                                   tile=str(args.tile), latent_channels=str(z.shape[1]))
        write_latent(item.job.output, z[i].to(dtype), metadata, item.alpha if args.keep_alpha else None)
        c, h, w = z.shape[1:]
        stored = str(dtype).removeprefix("torch.")
        return f"{item.job.source}  {width}x{height} -> {item.job.output}  latent {c}x{h}x{w} {stored}"

    items = read_images(jobs, model.spatial_factor, args.tile, args.overlap, args.max_pixels, budget, command,
                        progress.fail)
    done = run_batches(items, args.batch_size, runtime, command, progress, work, finish)
    failures += len(progress.failed)
    elapsed = time.perf_counter() - start
    rate = f" in {elapsed:.1f} s ({done / elapsed:.2f} images/s)" if done else ""
    print(f"encoded {done}/{done + failures} images{rate} with {model_id}")
    return 1 if failures else 0
