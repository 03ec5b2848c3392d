"""Evaluate a model on Kodak24 at native size against the equal-size bicubic baseline.

    python experiments/eval_default.py --model dcae/assets/default-f32c32 --out results/default_model.json

The baseline keeps as many numbers as the latent: each image is downscaled by sqrt(3 f^2 / c) per side
(sqrt(96) for f32c32), then upscaled back, both bicubic (PIL). Metrics on uint8-quantised outputs.

`--tile T` encodes and decodes in T x T tiles (blended overlap `--overlap`) instead of whole images: a model that
does better in tiles of its training size than on whole images shows the generalization penalty (the image's
content is the same; only the number of latent tokens changes).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dcae.autoencoder import DCAE
from dcae.images import find_images, read_image, to_model_range
from dcae.metrics import psnr, quantize, ssim
from dcae.perceptual import LPIPS
from dcae.provenance import provenance
from dcae.tiling import tiled_decode, tiled_encode

KODAK = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kodak24"


def bicubic_baseline(image: torch.Tensor, shrink: float) -> torch.Tensor:
    """uint8 (3, H, W) -> downscale by `shrink` per side and back up, bicubic; returns [0, 1] floats."""
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    w, h = pil.size
    small = pil.resize((max(1, round(w / shrink)), max(1, round(h / shrink))), Image.BICUBIC)
    back = np.asarray(small.resize((w, h), Image.BICUBIC))
    return torch.from_numpy(back.copy()).permute(2, 0, 1).float() / 255


def evaluate_image(model: DCAE, lpips: LPIPS, image: torch.Tensor, shrink: float, tile: int | None = None,
                   overlap: int | None = None) -> dict[str, float]:
    """PSNR/SSIM/LPIPS of the model's reconstruction (through uint8) and of the bicubic baseline, of one uint8 image."""
    reference = image.float().unsqueeze(0) / 255
    with torch.inference_mode():
        x = to_model_range(image).unsqueeze(0)
        if tile:
            overlap = tile // 4 if overlap is None else overlap
            x = tiled_decode(model, tiled_encode(model, x, tile, overlap), tile, overlap)
        else:
            x = model(x)
        recon = quantize(x)  # [0, 1], through uint8
        bicubic = bicubic_baseline(image, shrink).unsqueeze(0)
        row = {}
        for name, out in (("dcae", recon), ("bicubic", bicubic)):
            row[f"{name}_psnr"] = psnr(out, reference).item()
            row[f"{name}_ssim"] = ssim(out, reference).item()
            row[f"{name}_lpips"] = lpips(out * 2 - 1, reference * 2 - 1).item()
    return row


def _relative(path: str) -> str:
    """A data folder as a path under the shared data root when it is one (machine-independent)."""
    resolved = Path(path).resolve()
    return resolved.relative_to(KODAK.parent).as_posix() if resolved.is_relative_to(KODAK.parent) else path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dcae/assets/default-f32c32")
    parser.add_argument("--data", default=str(KODAK))
    parser.add_argument("--out", default="results/default_model.json")
    parser.add_argument("--weights", choices=("model", "ema"), default="model",
                        help="a training run's raw or EMA weights")
    parser.add_argument("--tile", type=int, default=None, help="code in tiles of this size (default: whole images)")
    parser.add_argument("--overlap", type=int, default=None, help="tile overlap in pixels (default: tile / 4)")
    args = parser.parse_args()

    model = DCAE.from_pretrained(args.model, weights=args.weights).eval()
    lpips = LPIPS("alex")
    config = model.config
    shrink = math.sqrt(3 * config.spatial_factor**2 / config.latent_channels)
    rows, start = [], time.time()
    for path, rel in find_images([args.data]):
        row = {"image": str(rel), **evaluate_image(model, lpips, read_image(path), shrink, args.tile, args.overlap)}
        rows.append(row)
        print(f"{rel}: dcae {row['dcae_psnr']:.2f} dB / bicubic {row['bicubic_psnr']:.2f} dB", flush=True)
    summary = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "image"}
    result = {"model": args.model, "weights": args.weights, "tile": args.tile, "preset": config.name,
              "latent": f"f{config.spatial_factor}c{config.latent_channels}",
              "bicubic_shrink_per_side": shrink, "n": len(rows), "seconds": time.time() - start,
              "data": _relative(args.data), "mean": summary, "rows": rows,
              "provenance": provenance({"model": args.model}, weights=args.weights)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
