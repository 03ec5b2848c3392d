"""`dcae sample --diffusion RUN --model AE -n N -o OUT`: sample latents, decode them, write PNGs, grid.png (+ gFID).

Sample i depends only on (--seed, i), not on --batch-size or the device's batch order; the class labels are drawn
from the seed too (or fixed by --class). A model trained with --latent-channels K makes K-channel latents, the first K
channels of the autoencoder's latent, which a structured-latent autoencoder decodes as they are.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dcae.commands.options import add_device_arguments
from dcae.diffusion.latents import cache_hash
from dcae.diffusion.objectives import get_objective
from dcae.diffusion.pipeline import gfid, image_grid, sample_images, sample_labels, sample_noise
from dcae.diffusion.samplers import SAMPLERS
from dcae.diffusion.train import load_diffusion_checkpoint
from dcae.errors import DCAEError
from dcae.images import write_image
from dcae.metrics import to_uint8
from dcae.runtime import Runtime, load_model, warn


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--diffusion", required=True, metavar="RUN_OR_CKPT",
                        help="a train-diffusion run dir (newest checkpoint), a checkpoints/step_N dir or a .safetensors")
    parser.add_argument("--model", required=True, metavar="AE",
                        help="the autoencoder the latents were cached with (a checkpoint, or the same preset name)")
    parser.add_argument("-n", "--num-images", type=int, default=16, help="images to sample (default: 16)")
    parser.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = off; default 1)")
    parser.add_argument("--class", dest="class_", metavar="C", help="class index or name (default: random classes)")
    parser.add_argument("--steps", type=int, help="sampler steps (default: 25 Heun for flow, 30 DPM-Solver++ for eps)")
    parser.add_argument("--sampler", choices=tuple(SAMPLERS), help="default: heun (flow) / dpmpp_2m (eps)")
    parser.add_argument("--spacing", choices=("logsnr", "linear"), default="logsnr",
                        help="eps objective: noise levels evenly in log-SNR (default) or in DDPM timestep")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-ema", action="store_true", help="sample with the raw weights instead of the EMA")
    add_device_arguments(parser)
    parser.add_argument("--fid-ref", metavar="DIR", help="also report gFID against this image folder")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")


def class_index(value: str | None, class_names: list[str], num_classes: int) -> int | None:
    """--class as an index or a class name -> index (None: random classes)."""
    if value is None:
        return None
    if num_classes == 0:
        raise DCAEError("--class: this model is unconditional")
    if value in class_names:
        return class_names.index(value)
    try:
        index = int(value)
    except ValueError:
        raise DCAEError(f"--class {value!r}: not a class name of this model or an integer") from None
    if not 0 <= index < num_classes:
        raise DCAEError(f"--class {index}: must be in [0, {num_classes})")
    return index


def check_decodes(autoencoder: Any, name: str, info: dict[str, Any]) -> None:
    """Refuse an autoencoder that cannot decode the model's latents: another latent width than the cache's, or an
    unstructured latent when the model makes a prefix of it (trained with --latent-channels K < C)."""
    channels, made = int(autoencoder.latent_channels), info["latent_shape"][0]
    cached = (info.get("cache_latent_shape") or info["latent_shape"])[0]  # older checkpoints: made == cached
    prefix = f"the first {made} channels of " if made < cached else ""
    if channels != cached:
        raise DCAEError(f"--model {name}: has {channels} latent channels, the diffusion model was trained on "
                        f"{prefix}{cached}-channel latents of {info['autoencoder'].get('name')}")
    if made < cached and not getattr(getattr(autoencoder, "config", None), "structured_latent", False):
        raise DCAEError(f"--model {name}: the diffusion model makes {prefix}its latent (--latent-channels {made}); "
                        f"this autoencoder has no structured latent to decode them")


def run(args: argparse.Namespace) -> int:
    if args.num_images < 1 or args.batch_size < 1 or (args.steps is not None and args.steps < 1):
        raise DCAEError("-n, --batch-size and --steps must be positive")
    runtime = Runtime.choose(args.device, args.dtype)
    device = runtime.device
    ckpt = load_diffusion_checkpoint(args.diffusion, ema=not args.no_ema, device=device)
    info, net = ckpt.info, ckpt.model
    num_classes = net.config.num_classes
    if args.cfg != 1.0 and num_classes == 0:
        raise DCAEError("--cfg: this model is unconditional; classifier-free guidance needs a class-conditional one")
    options = {"spacing": args.spacing} if info["objective"] == "eps" else {}
    objective = get_objective(info["objective"], **options)
    sampler = args.sampler or objective.default_sampler
    if sampler not in objective.samplers:
        raise DCAEError(f"--sampler {sampler}: does not fit the {objective.name} objective; "
                        f"choose from {', '.join(objective.samplers)}")
    autoencoder, model_id = load_model(args.model, device, "sample")
    check_decodes(autoencoder, args.model, info)
    if cache_hash(autoencoder) != info["autoencoder_config_hash"]:
        warn("sample", f"--model {args.model} is not the autoencoder the latents were cached with "
                       f"({info['autoencoder'].get('name')}); the images will be wrong")
    labels = sample_labels(args.num_images, num_classes, args.seed,
                           class_index(args.class_, info["class_names"], num_classes))
    noise = sample_noise(args.num_images, info["latent_shape"], args.seed)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    runtime.announce("sample")
    bar = tqdm(total=args.num_images, unit="img", desc="sample")

    def write_batch(start: int, images) -> None:
        for i, image in enumerate(to_uint8(images)):
            write_image(out / f"{start + i:06d}.png", image)
        bar.update(len(images))

    began = time.perf_counter()
    with runtime.autocast():
        images = sample_images(net, autoencoder, objective, noise, labels, info["scaling_factor"], args.cfg, sampler,
                               args.steps, args.batch_size, device, on_batch=write_batch)
    seconds = time.perf_counter() - began
    bar.close()
    uint8 = to_uint8(images)
    write_image(out / "grid.png", image_grid(uint8[:64]))
    summary = {"diffusion": str(ckpt.path), "step": info["step"], "autoencoder": model_id, "n": args.num_images,
               "cfg": args.cfg, "sampler": sampler, "steps": args.steps or objective.default_steps, "seed": args.seed,
               "class": args.class_, "ema": not args.no_ema, "seconds": seconds,
               "latent_channels": info["latent_shape"][0],
               "spacing": args.spacing if info["objective"] == "eps" else None, "runtime": runtime.record()}
    if args.fid_ref:
        summary["gfid"], summary["fid_reference_images"] = gfid(uint8, args.fid_ref, device=device)
        summary["fid_reference"] = args.fid_ref
        print(f"gFID {summary['gfid']:.2f} ({args.num_images} samples vs {summary['fid_reference_images']} images "
              f"of {args.fid_ref})")
    (out / "sample.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.num_images} images and grid.png to {out} ({seconds:.1f} s)")
    return 0
