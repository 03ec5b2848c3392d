"""`dcae eval`: reconstruction PSNR/SSIM/LPIPS/rFID of an autoencoder on an image folder, as DC-AE reports them.

Pipeline (efficientvit's evaluator): ADM centre crop to R, reconstruct (in fp32 unless --dtype auto finds native bf16,
or --dtype asks for another; the JSON records which), round both images through uint8,
per-image PSNR/SSIM/LPIPS(alex) averaged, rFID between Inception features of the references and the reconstructions.
Reference statistics are cached on disk. Under `torchrun` the files are split across ranks and the sums all-reduced.
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from dcae.commands.options import add_dtype_argument
from dcae.errors import DCAEError
from dcae.files import write_json
from dcae.images import find_images, read_image
from dcae.metrics import (
    FeatureStats, MeanAccumulator, adm_center_crop, fid_from_stats, psnr, quantize, ssim, sum_across_ranks, to_uint8,
)
from dcae.perceptual import LPIPS, InceptionFeatures
from dcae.runs import init_distributed
from dcae.runtime import Runtime, load_model

CACHE_VERSION = "dcae-fid-ref-v1"  # bump when the crop or the Inception preprocessing changes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="checkpoint dir/.safetensors, Hub id, or preset name (random weights)")
    parser.add_argument("--data", required=True, type=Path, help="folder of images (searched recursively)")
    parser.add_argument("--resolution", required=True, type=int, help="ADM centre-crop size R")
    parser.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    add_pipeline_arguments(parser)
    parser.add_argument("--html", type=Path, default=None, metavar="DIR",
                        help="also write a static comparison page (images, error maps, per-image metrics) here")


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """--batch-size, --limit, --device, --dtype, --stats-cache: the evaluation pipeline's options (eval, compare)."""
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images (sorted by path)")
    parser.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    add_dtype_argument(parser)
    parser.add_argument("--stats-cache", type=Path, default=None,
                        help="folder for cached reference Inception statistics (default: ~/.cache/dcae/fid_stats)")


def find_eval_images(args: argparse.Namespace) -> list[tuple[Path, Path]]:
    """Checked options -> the first --limit images under --data, as (path, relative path), sorted by path."""
    if args.resolution <= 0 or args.batch_size <= 0 or (args.limit is not None and args.limit <= 0):
        raise DCAEError("--resolution, --batch-size and --limit must be positive")
    if not args.data.is_dir():
        raise DCAEError(f"{args.data}: not a folder")
    found = find_images([args.data])[: args.limit]
    if not found:
        raise DCAEError(f"{args.data}: no images found")
    return found


def reference_key(files: list[Path], resolution: int) -> str:
    """sha256 of the sorted file list with sizes and mtimes, the resolution, and the preprocessing version."""
    h = hashlib.sha256(f"{CACHE_VERSION}\n{resolution}\n".encode())
    for path in sorted(files):
        st = path.stat()
        h.update(f"{path.resolve()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def load_batch(paths: list[Path], resolution: int) -> torch.Tensor:
    """Read and ADM-centre-crop a batch: (B, 3, R, R) uint8."""
    return torch.stack([adm_center_crop(read_image(p), resolution) for p in paths])


def evaluate(model: torch.nn.Module, files: list[Path], resolution: int, batch_size: int, device: torch.device,
             reference: FeatureStats | None, rank: int = 0, world: int = 1, runtime: Runtime | None = None,
             on_batch=None) -> tuple[dict, FeatureStats]:
    """Metrics over `files` (this rank's share); computes the reference statistics too when `reference` is None.

    The autoencoder runs under `runtime`'s autocast (fp32 when None); the metric networks always in fp32.
    `on_batch(paths, images, reconstructions, {"psnr"|"ssim"|"lpips": per-image values})` sees each batch (uint8).
    """
    runtime = runtime or Runtime(torch.device(device), "fp32", "fp32")
    lpips, inception = LPIPS("alex").to(device), InceptionFeatures().to(device)
    acc = {name: MeanAccumulator() for name in ("psnr", "ssim", "lpips")}
    recon_stats, ref_stats = FeatureStats(), reference or FeatureStats()
    shard = files[rank::world]
    batches = [shard[i : i + batch_size] for i in range(0, len(shard), batch_size)]
    model.eval().to(device)
    for paths in tqdm(batches, desc="eval", unit="batch", disable=None if rank == 0 else True):
        images = load_batch(paths, resolution).to(device)  # (B, 3, R, R) uint8
        x = (images.float() / 255 - 0.5) / 0.5  # (B, 3, R, R) in [-1, 1], as ToTensor + Normalize(0.5, 0.5)
        with torch.no_grad(), runtime.autocast():
            y = model(x).float()  # (B, 3, R, R), not clamped
        ref01, rec01 = images.float() / 255, quantize(y)  # both hold exact uint8 values
        with torch.no_grad():
            values = {"psnr": psnr(ref01, rec01), "ssim": ssim(ref01, rec01),
                      "lpips": lpips(ref01 * 2 - 1, rec01 * 2 - 1).flatten()}
        for name, value in values.items():
            acc[name].update(value)
        if on_batch is not None:
            on_batch(paths, images, to_uint8(y), values)
        recon_stats.update(inception(to_uint8(y)))
        if reference is None:
            ref_stats.update(inception(images))
    for a in acc.values():
        a.all_reduce()
    recon_stats.all_reduce()
    if reference is None:
        ref_stats.all_reduce()
    n = int(acc["psnr"].count.item())
    result = {name: a.mean for name, a in acc.items()}
    result["rfid"] = fid_from_stats(ref_stats, recon_stats) if n >= 2 and rank == 0 else None  # sqrtm once
    result["n"] = n
    return result, ref_stats


def run(args: argparse.Namespace) -> int:
    found = find_eval_images(args)
    files = [path for path, _ in found]
    runtime = Runtime.choose(args.device, args.dtype)
    started = not dist.is_initialized()
    d = init_distributed(runtime.device.type)  # under torchrun: gloo on CPU, nccl on this rank's GPU
    started = started and dist.is_initialized()
    rank, world, device = d.rank, d.world_size, d.device
    model, _ = load_model(args.model, device, "eval")
    factor = int(getattr(model, "spatial_factor", 1))
    if args.resolution % factor:
        raise DCAEError(f"--resolution {args.resolution} is not a multiple of the model's spatial factor {factor}")
    if rank == 0:
        runtime.announce("eval")

    cache_dir = args.stats_cache or Path.home() / ".cache" / "dcae" / "fid_stats"
    cache = cache_dir / f"{reference_key(files, args.resolution)}.npz"
    have = torch.tensor(float(cache.is_file()), dtype=torch.float64)
    reference = FeatureStats.load(cache) if sum_across_ranks(have)[0].item() == world else None  # all ranks agree
    report = None
    if args.html is not None and rank == 0:
        from dcae.report_html import ComparisonReport

        report = ComparisonReport(args.html, [str(args.model)], title=f"dcae eval: {args.model}",
                                  settings={"data": args.data, "resolution": args.resolution})
    on_batch = report.batch_writer(0, {p: str(rel) for p, rel in found}) if report else None
    result, ref_stats = evaluate(model, files, args.resolution, args.batch_size, device, reference, rank, world,
                                 runtime, on_batch=on_batch)
    if rank == 0 and reference is None and ref_stats.n >= 2:
        ref_stats.save(cache)
    result.update(resolution=args.resolution, model=str(args.model), reference_stats=str(cache),
                  runtime=runtime.record())
    if rank == 0:
        rfid = "n/a (needs 2+ images)" if result["rfid"] is None else f"{result['rfid']:.4f}"
        print(f"{args.model} on {args.data} at {args.resolution}px, n={result['n']}: psnr {result['psnr']:.3f}  "
              f"ssim {result['ssim']:.4f}  lpips {result['lpips']:.4f}  rfid {rfid}")
        if args.json is not None:
            write_json(args.json, result)
        if report is not None:
            print(f"wrote {report.write([result])}")
    if started:
        dist.destroy_process_group()
    return 0
