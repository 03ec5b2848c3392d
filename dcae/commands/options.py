"""The options `dcae reconstruct`, `encode` and `decode` share, and their checks (before any model work)."""
from __future__ import annotations

import argparse
import math

import torch

from dcae.errors import DCAEError
from dcae.images import DEFAULT_MAX_PIXELS
from dcae.runtime import DEVICE_CHOICES, DTYPE_CHOICES, Runtime, load_model
from dcae.tiling import MemoryBudget, memory_budget, resolve_tile


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, --dtype: where the model runs and in which precision (resolved by dcae.runtime.Runtime.choose)."""
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                        help="where the model runs (default: cuda if available)")
    add_dtype_argument(parser)


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="autocast compute dtype; attention stays fp32 (default: auto, bf16 where the hardware "
                             "runs it natively, else fp32)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --device, --dtype, --tile, --overlap, --max-memory, --batch-size."""
    parser.add_argument("--model", metavar="M", default=None,
                        help="directory written by save_pretrained, a checkpoint file, a Hub id, or a preset name "
                             "(random weights); default: the model shipped with dcae")
    add_device_arguments(parser)
    parser.add_argument("--tile", default="auto", metavar="auto|none|SIZE",
                        help="tile side in pixels (a multiple of the spatial factor); auto tiles images over 1 Mpx")
    parser.add_argument("--overlap", type=int, default=None, metavar="PX",
                        help="pixels shared by neighbouring tiles (multiple of the spatial factor; default tile/8)")
    parser.add_argument("--max-memory", type=float, default=None, metavar="GB",
                        help="memory one pass may use: auto tiles shrink to fit it, and an untiled pass or tile "
                             "that would not fit is refused (default: 80%% of the device's free memory)")
    parser.add_argument("--batch-size", type=int, default=1, metavar="N",
                        help="images of the same size run together (default: 1)")


def add_max_pixels_argument(parser: argparse.ArgumentParser, help_text: str = "refuse larger images, a "
                            "decompression-bomb guard") -> None:
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"{help_text} (default {DEFAULT_MAX_PIXELS})")


def add_output_arguments(parser: argparse.ArgumentParser, keep_alpha: bool = True) -> None:
    """--format, --quality (+ --keep-alpha) for commands that write images."""
    parser.add_argument("--format", choices=("png", "jpg", "webp"), default="png",
                        help="output format (default: png, lossless)")
    parser.add_argument("--quality", type=int, default=95, help="jpg/webp quality 1-100; webp 100 is lossless")
    if keep_alpha:
        parser.add_argument("--keep-alpha", action="store_true",
                            help="carry an input's alpha channel unchanged into the output (png/webp)")


def check_options(args: argparse.Namespace) -> None:
    """Refuse bad numeric options before the model is loaded or any file touched (exit status 2)."""
    if args.batch_size < 1 or args.max_pixels < 1:
        raise DCAEError("--batch-size and --max-pixels must be positive")
    if args.max_memory is not None and not (0 < args.max_memory < math.inf):
        raise DCAEError(f"--max-memory {args.max_memory}: expected a positive number of GB")
    if not 1 <= getattr(args, "quality", 95) <= 100:
        raise DCAEError(f"--quality {args.quality}: expected 1 to 100")


def check_tile_options(args: argparse.Namespace, factor: int) -> None:
    """Refuse a --tile/--overlap that does not fit the model's spatial factor (exit status 2)."""
    huge = 1 << 20  # large enough that any valid tile size is used
    resolve_tile(args.tile, huge, huge, factor, args.overlap)


def prepare(args: argparse.Namespace, command: str, ops: tuple[str, ...]
            ) -> tuple[Runtime, torch.nn.Module, str, MemoryBudget]:
    """The start every image command shares: check the options, choose device and dtype, load the model, set the
    memory budget of one image of a batch for `ops` ("encode", "decode"), and say on stderr what was chosen."""
    check_options(args)
    runtime = Runtime.choose(args.device, args.dtype)
    model, model_id = load_model(args.model, runtime.device, command)
    check_tile_options(args, model.spatial_factor)
    runtime.announce(command)
    return runtime, model, model_id, memory_budget(model, runtime.device, args.max_memory, ops, args.batch_size)
