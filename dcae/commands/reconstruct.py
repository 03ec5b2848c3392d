"""`dcae reconstruct INPUT... -o OUTDIR`: encode and decode images, write the reconstructions, print PSNR/SSIM.

A bad file costs one line on stderr and exit status 1; the run goes on (see dcae.runtime.run_batches).
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from dcae.autoencoder import check_latent_channels
from dcae.commands.options import add_max_pixels_argument, add_model_arguments, add_output_arguments, prepare
from dcae.images import from_model_range, to_model_range, write_image
from dcae.runtime import Item, Progress, check_finite, plan_jobs, read_images, run_batches
from dcae.tiling import TilePlan, decode_latent, encode_image


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders (searched recursively)")
    parser.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder for the reconstructions")
    parser.add_argument("--side-by-side", action="store_true", help="write input | reconstruction side by side")
    add_max_pixels_argument(parser)
    add_model_arguments(parser)
    add_output_arguments(parser)
    parser.add_argument("--channels", type=int, default=None, metavar="K",
                        help="decode only the first K latent channels (structured-latent models: DC-AE 1.5)")


def reconstruct(model: torch.nn.Module, rgb: torch.Tensor, plan: TilePlan, channels: int | None = None
                ) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(B, 3, H, W) uint8 -> ((B, 3, H, W) uint8 reconstruction, latent shape (c, h, w)); call under inference_mode."""
    z = encode_image(model, to_model_range(rgb), plan=plan)[:, :channels]  # (B, c or K, h, w)
    z = check_finite(z, "the latent")
    y = check_finite(decode_latent(model, z, plan=plan), "the decoded image")  # (B, 3, H, W)
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
    runtime, model, model_id, budget = prepare(args, command, ("encode", "decode"))
    factor, channels = model.spatial_factor, args.channels or model.latent_channels
    if args.channels is not None:
        check_latent_channels(model.config, args.channels)
    jobs, failures = plan_jobs(args.inputs, args.output, "." + args.format, command)
    progress = Progress.start(len(jobs), "img")
    psnrs: list[float] = []
    ssims: list[float] = []
    latent_shapes: set[tuple[int, ...]] = set()
    totals = {"pixels": 0, "latent_values": 0}
    start = time.perf_counter()

    def work(batch: list[Item]):
        rgb = torch.stack([item.data for item in batch])
        out, latent_shape = reconstruct(model, rgb, batch[0].plan, args.channels)
        with torch.autocast("cpu", enabled=False):  # the metrics in fp32 whatever the model ran in
            return out, latent_shape, image_metrics(rgb, out)

    def finish(item: Item, i: int, result) -> str:
        out, latent_shape, (batch_psnr, batch_ssim) = result
        write_image(item.job.output, _output_image(item.data, out[i], item.alpha, args), format=args.format,
                    quality=args.quality)
        height, width = item.data.shape[-2:]
        psnrs.append(float(batch_psnr[i]))
        ssims.append(float(batch_ssim[i]))
        latent_shapes.add(latent_shape)
        totals["pixels"] += 3 * height * width
        totals["latent_values"] += math.prod(latent_shape)
        c, h, w = latent_shape
        return (f"{item.job.source}  {width}x{height} -> latent {c}x{h}x{w}  "
                f"PSNR {batch_psnr[i]:.2f} dB  SSIM {_fmt(float(batch_ssim[i]))}")

    items = read_images(jobs, factor, args.tile, args.overlap, args.max_pixels, budget, command, progress.fail)
    done = run_batches(items, args.batch_size, runtime, command, progress, work, finish)
    elapsed = time.perf_counter() - start
    failures += len(progress.failed)
    summary = f"reconstructed {done}/{done + failures} images"
    if done:
        shape = ("x".join(map(str, latent_shapes.pop())) if len(latent_shapes) == 1
                 else f"{channels}x(H/{factor})x(W/{factor})")
        finite_ssim = [s for s in ssims if not math.isnan(s)]
        mean_ssim = sum(finite_ssim) / len(finite_ssim) if finite_ssim else math.nan
        summary += (f" in {elapsed:.1f} s ({done / elapsed:.2f} images/s) with {model_id} on {runtime.device.type} "
                    f"{runtime.dtype}; mean PSNR {sum(psnrs) / done:.2f} dB, mean SSIM {_fmt(mean_ssim)}; latent "
                    f"{shape} (f{factor}c{channels}), compression {totals['pixels'] / totals['latent_values']:.1f}x "
                    f"(RGB values per latent value)")
    print(summary)
    return 1 if failures else 0
