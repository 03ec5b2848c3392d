"""`dcae eval`: reconstruction PSNR/SSIM/LPIPS/rFID of an autoencoder on an image folder, as DC-AE reports them.

Pipeline (efficientvit's evaluator): ADM centre crop to R, reconstruct (in fp32 unless --dtype auto finds native bf16,
or --dtype asks for another; the JSON records which), round both images through uint8,
per-image PSNR/SSIM/LPIPS(alex) averaged, rFID between Inception features of the references and the reconstructions.
Reference statistics are cached on disk. Under `torchrun` the files are split across ranks and the sums all-reduced.

`--channels K1 K2 ...` (structured-latent models, DC-AE 1.5): each image is encoded once and decoded from its first K
latent channels for each K; the JSON then holds one entry of metrics per K (`by_channels`) and `--plot FILE` draws
them (docs/structured_latent.md).
"""
from __future__ import annotations

import argparse
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from dcae.autoencoder import check_latent_channels
from dcae.commands.options import add_dtype_argument
from dcae.errors import DCAEError
from dcae.files import write_json
from dcae.images import find_images, read_image
from dcae.metrics import (
    FeatureStats, MeanAccumulator, adm_center_crop, fid_from_stats, psnr, quantize, ssim, sum_across_ranks, to_uint8,
)
from dcae.perceptual import LPIPS, InceptionFeatures
from dcae.provenance import provenance
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
    parser.add_argument("--channels", type=int, nargs="+", default=None, metavar="K",
                        help="metrics of reconstructions from the first K latent channels, for each K (structured-"
                             "latent models, e.g. --channels 16 32 64 128); default: all channels")
    parser.add_argument("--no-rfid", dest="rfid", action="store_false",
                        help="skip rFID (no InceptionV3: PSNR/SSIM/LPIPS only; rfid is null in the JSON)")
    parser.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                        help="with --channels: draw quality against K here (needs matplotlib, the experiments extra)")


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
    results, ref_stats = evaluate_channels(model, files, resolution, batch_size, device, reference, [None], rank,
                                           world, runtime, on_batch=[on_batch])
    return results[0], ref_stats


def evaluate_channels(model: torch.nn.Module, files: list[Path], resolution: int, batch_size: int,
                      device: torch.device, reference: FeatureStats | None, channels: Sequence[int | None],
                      rank: int = 0, world: int = 1, runtime: Runtime | None = None,
                      on_batch: Sequence[Callable | None] | None = None, rfid: bool = True
                      ) -> tuple[list[dict], FeatureStats]:
    """`evaluate` for reconstructions from the first k latent channels, one result per k in `channels` (None: the
    plain model(x)). Each batch is encoded once and decoded once per k; `on_batch[i]` sees the i-th k's batches.
    rfid=False: no InceptionV3 is loaded or run, and every result's rfid is None."""
    runtime = runtime or Runtime(torch.device(device), "fp32", "fp32")
    lpips, inception = LPIPS("alex").to(device), InceptionFeatures().to(device) if rfid else None
    acc = [{name: MeanAccumulator() for name in ("psnr", "ssim", "lpips")} for _ in channels]
    recon_stats, ref_stats = [FeatureStats() for _ in channels], reference or FeatureStats()
    callbacks = list(on_batch or [None] * len(channels))
    shard = files[rank::world]
    batches = [shard[i : i + batch_size] for i in range(0, len(shard), batch_size)]
    model.eval().to(device)
    for paths in tqdm(batches, desc="eval", unit="batch", disable=None if rank == 0 else True):
        images = load_batch(paths, resolution).to(device)  # (B, 3, R, R) uint8
        x = (images.float() / 255 - 0.5) / 0.5  # (B, 3, R, R) in [-1, 1], as ToTensor + Normalize(0.5, 0.5)
        ref01 = images.float() / 255
        with torch.no_grad(), runtime.autocast():
            z = model.encode(x) if channels != [None] else None  # (B, c, h, w), shared by every k
        for i, k in enumerate(channels):
            with torch.no_grad(), runtime.autocast():
                y = (model(x) if z is None else model.decode(z[:, :k])).float()  # (B, 3, R, R), not clamped
            rec01 = quantize(y)  # both hold exact uint8 values
            with torch.no_grad():
                values = {"psnr": psnr(ref01, rec01), "ssim": ssim(ref01, rec01),
                          "lpips": lpips(ref01 * 2 - 1, rec01 * 2 - 1).flatten()}
            for name, value in values.items():
                acc[i][name].update(value)
            if callbacks[i] is not None:
                callbacks[i](paths, images, to_uint8(y), values)
            if inception is not None:
                recon_stats[i].update(inception(to_uint8(y)))
        if reference is None and inception is not None:
            ref_stats.update(inception(images))
    for stats, accumulators in zip(recon_stats, acc):
        for a in accumulators.values():
            a.all_reduce()
        stats.all_reduce()
    if reference is None:
        ref_stats.all_reduce()
    results = []
    for stats, accumulators in zip(recon_stats, acc):
        n = int(accumulators["psnr"].count.item())
        result = {name: a.mean for name, a in accumulators.items()}
        result["rfid"] = fid_from_stats(ref_stats, stats) if rfid and n >= 2 and rank == 0 else None  # sqrtm once
        result["n"] = n
        results.append(result)
    return results, ref_stats


def sweep_channels(model: torch.nn.Module, channels: list[int] | None) -> list[int] | None:
    """--channels checked against the model (the one-line error of `check_latent_channels`), sorted, duplicates
    dropped; None when not given."""
    if channels is None:
        return None
    for k in channels:
        check_latent_channels(model.config, k)
    return sorted(set(channels))


def run(args: argparse.Namespace) -> int:
    found = find_eval_images(args)
    files = [path for path, _ in found]
    if args.plot is not None:
        if args.channels is None:
            raise DCAEError("--plot draws quality against --channels: give --channels K1 K2 ... too")
        from dcae.report_plots import require_matplotlib

        require_matplotlib("--plot")  # before the evaluation, not after it
    runtime = Runtime.choose(args.device, args.dtype)
    started = not dist.is_initialized()
    d = init_distributed(runtime.device.type)  # under torchrun: gloo on CPU, nccl on this rank's GPU
    started = started and dist.is_initialized()
    rank, world, device = d.rank, d.world_size, d.device
    model, _ = load_model(args.model, device, "eval")
    factor = int(getattr(model, "spatial_factor", 1))
    if args.resolution % factor:
        raise DCAEError(f"--resolution {args.resolution} is not a multiple of the model's spatial factor {factor}")
    channels = sweep_channels(model, args.channels)
    if rank == 0:
        runtime.announce("eval")

    cache_dir = args.stats_cache or Path.home() / ".cache" / "dcae" / "fid_stats"
    cache = cache_dir / f"{reference_key(files, args.resolution)}.npz"
    have = torch.tensor(float(cache.is_file()), dtype=torch.float64)
    reference = FeatureStats.load(cache) if sum_across_ranks(have)[0].item() == world else None  # all ranks agree
    if not args.rfid:
        reference = FeatureStats()  # never computed nor saved: no Inception runs
    labels = [str(args.model)] if channels is None else [f"{args.model} @ {k} channels" for k in channels]
    report = None
    if args.html is not None and rank == 0:
        from dcae.report_html import ComparisonReport

        report = ComparisonReport(args.html, labels, title=f"dcae eval: {args.model}",
                                  settings={"data": args.data, "resolution": args.resolution})
    names = {p: str(rel) for p, rel in found}
    on_batch = [report.batch_writer(i, names) for i in range(len(labels))] if report else None
    results, ref_stats = evaluate_channels(model, files, args.resolution, args.batch_size, device, reference,
                                           channels or [None], rank, world, runtime, on_batch=on_batch, rfid=args.rfid)
    if rank == 0 and reference is None and ref_stats.n >= 2:
        ref_stats.save(cache)
    if channels is None:
        result = dict(results[0])
    else:
        result = {"channels": channels, "latent_channels": model.latent_channels, "n": results[0]["n"],
                  "by_channels": [{"channels": k, **r} for k, r in zip(channels, results)]}
    result.update(resolution=args.resolution, model=str(args.model), reference_stats=str(cache) if args.rfid else None,
                  runtime=runtime.record())
    if rank == 0:
        result["provenance"] = provenance({"model": args.model}, device=device.type)
        for label, r in zip(labels, results):
            rfid = ("skipped (--no-rfid)" if not args.rfid else "n/a (needs 2+ images)") if r["rfid"] is None \
                else f"{r['rfid']:.4f}"
            print(f"{label} on {args.data} at {args.resolution}px, n={r['n']}: psnr {r['psnr']:.3f}  "
                  f"ssim {r['ssim']:.4f}  lpips {r['lpips']:.4f}  rfid {rfid}")
        if args.json is not None:
            write_json(args.json, result)
        if report is not None:
            print(f"wrote {report.write(results)}")
        if args.plot is not None:
            from dcae.report_plots import plot_channel_sweep

            title = f"{args.model} on {args.data.name} at {args.resolution}px (n={result['n']})"
            print(f"wrote {plot_channel_sweep({str(args.model): result}, args.plot, title=title)}")
    if started:
        dist.destroy_process_group()
    return 0
