"""`dcae export MODEL --format onnx -o DIR`: the encoder and/or decoder as ONNX files that ONNX Runtime runs."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from dcae.errors import DCAEError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint dir/.safetensors, Hub id, or preset name (random weights)")
    parser.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default: onnx)")
    parser.add_argument("--part", choices=["encoder", "decoder", "both"], default="both")
    parser.add_argument("--dynamic-size", action="store_true",
                        help="any image size (sides multiples of the spatial factor); default: --size only")
    parser.add_argument("--size", default="256", metavar="H[xW]",
                        help="image size of the example, and the only size without --dynamic-size (default: 256)")
    parser.add_argument("--channels", type=int, default=None, metavar="K",
                        help="export the decoder for the first K latent channels (structured-latent models)")
    parser.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime parity check")
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="DIR", help="folder for the .onnx files")


def parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d{1,9})(?:x(\d{1,9}))?", text.strip())
    if not match:
        raise DCAEError(f"--size {text!r}: expected H or HxW in pixels, e.g. 512 or 512x768")
    height = int(match.group(1))
    return height, int(match.group(2) or height)


def run(args: argparse.Namespace) -> int:
    from dcae.runtime import load_model
    from dcae.export import export_onnx, require_exporter

    size = parse_size(args.size)
    require_exporter(runtime=not args.no_check)
    import torch

    model, model_id = load_model(args.model, torch.device("cpu"), "export")
    parts = ("encoder", "decoder") if args.part == "both" else (args.part,)
    if args.channels is not None and "decoder" not in parts:
        raise DCAEError("--channels applies to the decoder; use --part decoder or both")
    written = export_onnx(model, args.output, parts, image_size=size, dynamic_size=args.dynamic_size,
                          channels=args.channels, check=not args.no_check)
    sizes = "any size" if args.dynamic_size else f"{size[0]}x{size[1]} images only"
    for item in written:
        check = "" if item.max_abs_diff is None else \
            (f"; ONNX Runtime vs dcae max abs diff {item.max_abs_diff:.2e} (tolerance {item.tolerance:.1e}) "
             f"on {'x'.join(map(str, item.input_shape))}")
        print(f"wrote {item.path} ({model_id} {item.part}, {sizes}{check})")
    return 0
