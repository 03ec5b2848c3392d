"""`dcae metrics A B`: PSNR, SSIM, LPIPS (and FID for folders) between two images or two folders of same-named ones."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from dcae.errors import DCAEError
from dcae.files import write_json
from dcae.images import find_images, read_image
from dcae.metrics import FeatureStats, fid_from_stats, psnr, ssim
from dcae.perceptual import LPIPS, InceptionFeatures
from dcae.runtime import Runtime, resolve_device

MAX_TABLE_ROWS = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", type=Path, help="reference image or folder")
    parser.add_argument("b", type=Path, help="compared image or folder (matched to A by relative path, any extension)")
    parser.add_argument("--json", type=Path, default=None, help="write means and per-image rows to this JSON file")
    parser.add_argument("--lpips-net", choices=["alex", "vgg"], default="alex", help="LPIPS trunk (default: alex)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def _index(folder: Path) -> dict[str, Path]:
    """Images under `folder` keyed by relative path without extension."""
    index: dict[str, Path] = {}
    for path, rel in find_images([folder]):
        key = rel.with_suffix("").as_posix()
        if key in index:
            raise DCAEError(f"{folder}: two images share the name {key!r} ({index[key].name}, {path.name})")
        index[key] = path
    return index


def _names(keys: list[str], limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def pair_images(a: Path, b: Path) -> list[tuple[str, Path, Path]]:
    """Two files or two folders -> sorted (name, path_a, path_b); any image without a counterpart is an error."""
    for p in (a, b):
        if not p.exists():
            raise DCAEError(f"{p}: no such file or directory")
    if a.is_file() and b.is_file():
        return [(a.stem if a.stem == b.stem else f"{a.name} vs {b.name}", a, b)]
    if not (a.is_dir() and b.is_dir()):
        raise DCAEError(f"{a} and {b}: give two image files or two folders, not one of each")
    index_a, index_b = _index(a), _index(b)
    if not index_a:
        raise DCAEError(f"{a}: no images found")
    only_a, only_b = sorted(set(index_a) - set(index_b)), sorted(set(index_b) - set(index_a))
    if only_a or only_b:
        problems = [f"{len(only_a)} in {a} missing from {b} ({_names(only_a)})" if only_a else "",
                    f"{len(only_b)} in {b} missing from {a} ({_names(only_b)})" if only_b else ""]
        raise DCAEError("images without a counterpart: " + "; ".join(p for p in problems if p))
    return [(key, index_a[key], index_b[key]) for key in sorted(index_a)]


def _oriented_size(path: Path) -> tuple[int, int] | None:
    """(width, height) after EXIF rotation, from the header only; None if unreadable (read_image reports why)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(0x0112) in (5, 6, 7, 8):  # orientations that swap width and height
                width, height = height, width
            return width, height
    except Exception:  # noqa: BLE001 - any decoder error is reported with context by read_image later
        return None


def check_sizes(pairs: list[tuple[str, Path, Path]]) -> None:
    """Fail fast, before any network runs, if a pair differs in size."""
    for _, path_a, path_b in pairs:
        size_a, size_b = _oriented_size(path_a), _oriented_size(path_b)
        if size_a and size_b and size_a != size_b:
            raise DCAEError(f"{path_a} is {size_a[0]}x{size_a[1]} but {path_b} is {size_b[0]}x{size_b[1]}")


SSIM_MIN_SIDE = 11  # the Gaussian window
LPIPS_MIN_SIDE = {"alex": 31, "vgg": 16}  # smaller inputs vanish in the trunk's pooling layers


def compare(pairs: list[tuple[str, Path, Path]], lpips_net: str, device: torch.device, with_fid: bool) -> dict:
    """Per-image PSNR/SSIM/LPIPS of each pair (images read as 8-bit RGB), their means, and FID if asked."""
    lpips = LPIPS(lpips_net).to(device)
    inception = InceptionFeatures().to(device) if with_fid else None
    stats_a, stats_b = FeatureStats(), FeatureStats()
    rows = []
    for name, path_a, path_b in tqdm(pairs, desc="metrics", unit="img", disable=None if len(pairs) > 1 else True):
        img_a, img_b = read_image(path_a)[None].to(device), read_image(path_b)[None].to(device)  # (1, 3, H, W) uint8
        if img_a.shape != img_b.shape:
            raise DCAEError(f"{path_a} is {img_a.shape[-1]}x{img_a.shape[-2]} but {path_b} is "
                            f"{img_b.shape[-1]}x{img_b.shape[-2]}")
        need = max(SSIM_MIN_SIDE, LPIPS_MIN_SIDE[lpips_net])
        if min(img_a.shape[-2:]) < need:
            raise DCAEError(f"{path_a}: image is {img_a.shape[-1]}x{img_a.shape[-2]}; SSIM and LPIPS({lpips_net}) "
                            f"need at least {need}x{need} pixels")
        x, y = img_a.float() / 255, img_b.float() / 255  # (1, 3, H, W) in [0, 1]
        with torch.no_grad():
            d = lpips(x * 2 - 1, y * 2 - 1)
        rows.append({"name": name, "psnr": psnr(x, y).item(), "ssim": ssim(x, y).item(), "lpips": d.item()})
        if inception is not None:
            stats_a.update(inception(img_a))
            stats_b.update(inception(img_b))
    result: dict = {"n": len(rows)}
    for key in ("psnr", "ssim", "lpips"):
        result[key] = sum(r[key] for r in rows) / len(rows)
    if with_fid:
        result["fid"] = fid_from_stats(stats_a, stats_b)
    result["rows"] = rows
    return result


def format_table(result: dict) -> str:
    """A short text table: up to MAX_TABLE_ROWS rows, then the means (and FID)."""
    rows = result["rows"]
    width = max([len("mean"), *(len(r["name"]) for r in rows[:MAX_TABLE_ROWS])])
    lines = [f"{'name':<{width}}  {'psnr':>7}  {'ssim':>6}  {'lpips':>6}"]
    for r in rows[:MAX_TABLE_ROWS]:
        lines.append(f"{r['name']:<{width}}  {r['psnr']:7.3f}  {r['ssim']:6.4f}  {r['lpips']:6.4f}")
    if len(rows) > MAX_TABLE_ROWS:
        lines.append(f"... {len(rows) - MAX_TABLE_ROWS} more rows (see --json)")
    if len(rows) > 1:
        lines.append(f"{'mean':<{width}}  {result['psnr']:7.3f}  {result['ssim']:6.4f}  {result['lpips']:6.4f}"
                     f"  (n={result['n']})")
    if "fid" in result:
        lines.append(f"fid: {result['fid']:.4f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    pairs = pair_images(args.a, args.b)
    check_sizes(pairs)
    with_fid = args.a.is_dir() and len(pairs) >= 2
    runtime = Runtime(resolve_device(args.device), "fp32", "fp32")  # the metrics' networks always run in fp32
    result = compare(pairs, args.lpips_net, runtime.device, with_fid)
    print(format_table(result))
    if args.json is not None:
        write_json(args.json, {**result, "runtime": runtime.record()})
    return 0
