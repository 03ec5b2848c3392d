"""`dcae bench ae ...` and `dcae bench diffusion ...`: each target owns its own arguments."""
from __future__ import annotations

import argparse
import importlib

TARGETS = {
    "ae": ("dcae.bench", "autoencoder encode/decode throughput, side by side with diffusers"),
    "diffusion": ("dcae.diffusion.bench", "diffusion transformer throughput on f8p2 / f32p1 / f64p1 latents, and "
                  "dcae's DiT against diffusers' DiTTransformer2DModel"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="target", required=True, metavar="TARGET")
    for name, (module_name, help_text) in TARGETS.items():
        if importlib.util.find_spec(module_name) is None:
            continue
        target_parser = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module_name).add_arguments(target_parser)


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(TARGETS[args.target][0]).run(args)
