"""`dcae encode INPUT... -o OUTDIR`: one .safetensors latent per image, with what `dcae decode` needs to undo it."""
from __future__ import annotations

import argparse
import sys
import time

import torch
from tqdm import tqdm

from dcae.commands.reconstruct import (DTYPES, Progress, add_model_arguments, autocast, batches, load_images,
                                       one_line, plan_jobs, prepare, report_error)
from dcae.autoencoder import check_latent_channels
from dcae.errors import DCAEError
from dcae.images import DEFAULT_MAX_PIXELS, to_model_range
from dcae.tiling import encode_image, latent_metadata, padding_for, resolve_tile, write_latent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders (searched recursively)")
    parser.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder for the .safetensors latents")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"refuse larger images, a decompression-bomb guard (default {DEFAULT_MAX_PIXELS})")
    parser.add_argument("--keep-alpha", action="store_true",
                        help="store an input's alpha channel (uint8) beside the latent; decode restores it")
    parser.add_argument("--channels", type=int, default=None, metavar="K",
                        help="keep only the first K latent channels (structured-latent models: DC-AE 1.5)")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    command = "encode"
    device, model, model_id, budget = prepare(args, command, ("encode",))
    factor = model.spatial_factor
    if args.channels is not None:
        check_latent_channels(model.config, args.channels)
    jobs, failures = plan_jobs(args.inputs, args.output, ".safetensors", command)
    progress = Progress.start(len(jobs), "img")
    done = 0
    start = time.perf_counter()

    loaded = load_images(jobs, factor, args, budget, command, progress.fail)
    with torch.inference_mode():
        for batch in batches(loaded, lambda item: item.key, args.batch_size):
            height, width = batch[0].rgb.shape[-2:]
            try:
                x = to_model_range(torch.stack([item.rgb for item in batch]))  # (B, 3, H, W)
                pad_h, pad_w = padding_for(height, width, factor)
                if resolve_tile(args.tile, height + pad_h, width + pad_w, factor, args.overlap, budget) is None:
                    x = x.to(device)
                with autocast(device, args.dtype):
                    z = encode_image(model, x, tile=args.tile, overlap=args.overlap, budget=budget).cpu()  # (B,c,h,w)
                z = z[:, :args.channels]  # structured latent: the first K channels are what encode(channels=K) gives
                if not torch.isfinite(z).all():
                    raise DCAEError("the latent has NaN/Inf values (fp16 overflow? try --dtype bf16 or fp32)")
            except (DCAEError, RuntimeError, MemoryError, ValueError) as error:
                for item in batch:
                    report_error(command, f"{item.job.source}: {one_line(error)}")
                    progress.fail(item.job)
                continue
            dtype = DTYPES[args.dtype]
            for i, item in enumerate(batch):
                metadata = latent_metadata(model, model_id, (height, width), dtype, source=str(item.job.relative),
                                           tile=str(args.tile), latent_channels=str(z.shape[1]))
                alpha = item.alpha if args.keep_alpha else None
                try:
                    write_latent(item.job.output, z[i].to(dtype), metadata, alpha)
                except DCAEError as error:
                    report_error(command, str(error))
                    progress.fail(item.job)
                    continue
                c, h, w = z.shape[1:]
                tqdm.write(f"{item.job.source}  {width}x{height} -> {item.job.output}  latent {c}x{h}x{w} "
                           f"{args.dtype}", file=sys.stdout)
                done += 1
                progress.bar.update(1)
    progress.bar.close()
    failures += len(progress.failed)
    elapsed = time.perf_counter() - start
    rate = f" in {elapsed:.1f} s ({done / elapsed:.2f} images/s)" if done else ""
    print(f"encoded {done}/{done + failures} images{rate} with {model_id}")
    return 1 if failures else 0
