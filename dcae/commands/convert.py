"""`dcae convert SRC DST --to diffusers|efficientvit|dcae`."""
from __future__ import annotations

import argparse

from dcae.weights import FORMATS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="checkpoint file or directory (any layout), or a Hugging Face Hub id")
    parser.add_argument("dst", help="output directory")
    parser.add_argument("--to", choices=FORMATS, required=True, help="layout to write")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read a .pt/.bin/.ckpt source with torch.load(weights_only=True)")
    parser.add_argument("--fp16", action="store_true", help="store floating-point tensors as float16")


def run(args: argparse.Namespace) -> int:
    import torch

    from dcae.autoencoder import DCAE
    from dcae.weights import save_pretrained

    model = DCAE.from_pretrained(args.src, allow_pickle=args.allow_pickle)
    save_pretrained(model, args.dst, format=args.to, dtype=torch.float16 if args.fp16 else None)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.dst} ({args.to} layout, {model.config.name}, {params / 1e6:.1f}M parameters)")
    return 0
