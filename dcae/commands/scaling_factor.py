"""`dcae scaling-factor --model M --data DIR [--data DIR ...] [--limit N]`: measure a model's latent scaling factor.

The factor diffusers (`AutoencoderDC.config.scaling_factor`) and efficientvit multiply raw latents by before a
diffusion model sees them: 1 / RMS of the latent values, the root of the mean square over every value of every
latent (diffusers documents AutoencoderDC's factor as "the multiplicative inverse of the root mean square of the
latent features"). 1 / std, SD-VAE's convention, is printed beside it: the two agree when the latents' mean is
near zero, and differ when it is not. See docs/models.md.

Images are center crops at `--resolution` (the training crops' size; a shorter side below it is upscaled first), so a
run is reproducible; accumulation is in float64, so the order of images does not matter.
"""
from __future__ import annotations

import argparse
import json
import math
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="M", help="checkpoint directory/file, Hub id or preset")
    parser.add_argument("--data", required=True, action="append", metavar="DIR",
                        help="image folder or file (repeat for several, e.g. train and test)")
    parser.add_argument("--resolution", type=int, default=256, help="center-crop size in pixels (default 256)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="use at most the first N images")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print the measurement as one JSON object")


def latent_statistics(model, images, batch_size: int = 8) -> dict[str, float]:
    """Count, mean, mean square and std of all latent values of an iterable of (3, R, R) uint8 crops."""
    import torch

    from dcae.images import to_model_range

    total = total_sq = 0.0
    count = 0
    batch: list = []

    def flush() -> None:
        nonlocal total, total_sq, count
        with torch.inference_mode():
            z = model.encode(to_model_range(torch.stack(batch))).double()  # (B, c, h, w)
        total += z.sum().item()
        total_sq += z.square().sum().item()
        count += z.numel()
        batch.clear()

    for image in images:
        batch.append(image)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if count == 0:
        return {"count": 0}
    mean, mean_sq = total / count, total_sq / count
    return {"count": count, "mean": mean, "rms": math.sqrt(mean_sq), "std": math.sqrt(max(mean_sq - mean**2, 0.0))}


def run(args: argparse.Namespace) -> int:
    import torch

    from dcae.runtime import load_model
    from dcae.data import SkippedImage, center_crop, load_image_file
    from dcae.errors import DCAEError
    from dcae.images import find_images

    if args.resolution < 1 or (args.limit is not None and args.limit < 1) or args.batch_size < 1:
        raise DCAEError("--resolution, --limit and --batch-size must be positive")
    files = [path for path, _ in find_images(args.data)][: args.limit]
    if not files:
        raise DCAEError(f"{', '.join(args.data)}: no images found")
    model, model_id = load_model(args.model, torch.device("cpu"), "scaling-factor")
    f = model.spatial_factor
    if args.resolution % f:
        raise DCAEError(f"--resolution {args.resolution} is not a multiple of the model's spatial factor {f}")
    skipped: list[str] = []

    def crops():
        for path in files:
            try:
                yield center_crop(load_image_file(path), args.resolution)
            except SkippedImage as error:
                skipped.append(f"{path}: {error}")

    stats = latent_statistics(model, crops(), args.batch_size)
    for line in skipped:
        print(f"dcae scaling-factor: skipped {line}", file=sys.stderr)
    if stats["count"] == 0 or stats["rms"] == 0:
        raise DCAEError(f"{', '.join(args.data)}: no usable images (all skipped) or an all-zero latent")
    result = {
        "model": model_id,
        "config_name": model.config.name,
        "images": len(files) - len(skipped),
        "resolution": args.resolution,
        "latent_values": stats["count"],
        "latent_mean": stats["mean"],
        "latent_rms": stats["rms"],
        "latent_std": stats["std"],
        "scaling_factor": 1.0 / stats["rms"],  # the convention: 1 / RMS (docs/models.md)
        "inverse_std": 1.0 / stats["std"] if stats["std"] > 0 else None,
        "published_or_stored": model.config.scaling_factor,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{model_id} ({model.config.name}) on {result['images']} images, {args.resolution} px center crops: "
          f"latent mean {stats['mean']:.4g}, RMS {stats['rms']:.4g}, std {stats['std']:.4g}")
    print(f"scaling_factor = 1 / RMS = {result['scaling_factor']:.6g}   (1 / std = {result['inverse_std']:.6g}; "
          f"stored in the model: {model.config.scaling_factor})")
    return 0
