"""The `dcae` command: one subcommand per module under `dcae.commands`, imported only when used."""
from __future__ import annotations

import argparse
import importlib
import sys

from dcae.errors import DCAEError, printable

# name -> (module, one-line help). Each module defines `add_arguments(parser)` and `run(args) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("dcae.commands.info", "list presets, or describe a model or checkpoint"),
    "convert": ("dcae.commands.convert", "convert a checkpoint between dcae, diffusers and efficientvit layouts"),
    "reconstruct": ("dcae.commands.reconstruct", "encode and decode images, write reconstructions and metrics"),
    "encode": ("dcae.commands.encode", "encode images to .safetensors latents"),
    "decode": ("dcae.commands.decode", "decode .safetensors latents to images"),
    "metrics": ("dcae.commands.metrics", "PSNR/SSIM/LPIPS(/FID) between two images or two folders"),
    "eval": ("dcae.commands.eval", "reconstruction metrics (PSNR/SSIM/LPIPS/rFID) of a model on a folder"),
    "train": ("dcae.commands.train", "train an autoencoder (phase 1/2/3 or the three-phase recipe)"),
    "cache-latents": ("dcae.commands.cache_latents", "encode a dataset once into latent shards"),
    "train-diffusion": ("dcae.commands.train_diffusion", "train a latent diffusion transformer on cached latents"),
    "sample": ("dcae.commands.sample", "sample images from a latent diffusion transformer"),
    "bench": ("dcae.commands.bench", "throughput benchmarks side by side with peers"),
    "scaling-factor": ("dcae.commands.scaling_factor", "measure a model's latent scaling factor (1 / RMS) on images"),
    "compare": ("dcae.commands.compare", "one static HTML page comparing models' reconstructions image by image"),
    "report": ("dcae.commands.report", "a static HTML page for a training run (curves, samples over time)"),
    "export": ("dcae.commands.export", "export the encoder/decoder to ONNX, checked against ONNX Runtime"),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but its usage errors quote the user's text with line breaks escaped: one error line stays one."""

    def error(self, message: str):  # type: ignore[override]
        super().error(printable(message))


def _available() -> dict[str, tuple[str, str]]:
    return {name: entry for name, entry in COMMANDS.items() if importlib.util.find_spec(entry[0]) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="dcae", description="Deep Compression Autoencoder toolkit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in _available().items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    available = _available()
    if not argv or argv[0] not in available:
        parser = build_parser()
        if argv and not argv[0].startswith("-"):
            parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(available)}")
        parser.parse_args(argv or ["--help"])
        return 0
    name, rest = argv[0], argv[1:]
    module_name, help_text = available[name]
    module = importlib.import_module(module_name)
    parser = ArgumentParser(prog=f"dcae {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except DCAEError as error:
        print(f"dcae {name}: error: {printable(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dcae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
