"""`dcae train-diffusion --latents DIR --preset NAME [key=value ...]`: train a DiT / UViT on a latent cache.

Flags set the common fields; any config field can be set as a dotted `key=value` override (optim.lr=3e-4,
model.depth=4, ema_decay=0.999, precision=bf16). `--resume RUN` continues RUN's newest checkpoint with its saved
config (flags and overrides given with it still apply, e.g. a larger --steps). `--auto-resume` continues --run-dir
when it has a checkpoint and starts it otherwise: the one command line for `torchrun --max-restarts=N`.
Multi-process: torchrun.
"""
from __future__ import annotations

import argparse
import dataclasses

from dcae.diffusion.latents import read_index
from dcae.diffusion.objectives import OBJECTIVES
from dcae.diffusion.presets import list_diffusion_presets
from dcae.diffusion.train import (
    TrainDiffusionConfig,
    apply_overrides,
    load_run_config,
    resolve_model_config,
    train_diffusion,
)
from dcae.errors import DCAEError
from dcae.runs import latest_checkpoint

# flag -> config key; flags default to None so that only the ones given override a resumed run's config
FLAGS = {"latents": "latents", "preset": "preset", "steps": "steps", "batch_size": "batch_size", "lr": "optim.lr",
         "objective": "objective", "run_dir": "run_dir", "seed": "seed", "tensorboard": "tensorboard",
         "latent_channels": "latent_channels", "augment_weight": "augment_weight",
         "augment_channels": "augment_channels", "augment_mask_input": "augment_mask_input"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--latents", metavar="DIR", help="latent cache folder (from dcae cache-latents)")
    parser.add_argument("--preset", choices=list_diffusion_presets(), metavar="NAME",
                        help=f"model preset (default {TrainDiffusionConfig.preset}): "
                             f"{', '.join(list_diffusion_presets())}")
    parser.add_argument("--steps", type=int, help="train until this step")
    parser.add_argument("--batch-size", type=int, help="global batch size")
    parser.add_argument("--lr", type=float, help="AdamW learning rate (optim.lr)")
    parser.add_argument("--objective", choices=tuple(OBJECTIVES), help="flow (default) or eps")
    parser.add_argument("--run-dir", metavar="RUN", help="where checkpoints and logs go")
    parser.add_argument("--resume", metavar="RUN", help="continue this run from its newest checkpoint")
    parser.add_argument("--auto-resume", action="store_true",
                        help="continue --run-dir from its newest checkpoint if it has one, else start it "
                             "(torchrun --max-restarts)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--tensorboard", action="store_true", default=None,
                        help="also log the log.jsonl scalars to RUN/tensorboard")
    parser.add_argument("--latent-channels", type=int, metavar="K",
                        help="train on the cache's first K channels (a structured latent's prefix; dcae sample then "
                             "decodes K-channel latents)")
    parser.add_argument("--augment-weight", type=float, metavar="LAMBDA",
                        help="augmented diffusion training: add LAMBDA x the loss on a random leading-channel prefix "
                             "(default 0: off; docs/augmented_diffusion.md)")
    parser.add_argument("--augment-channels", type=int, nargs="+", metavar="K",
                        help="candidate prefix sizes, one drawn per sample (default: every multiple of 16 below C)")
    parser.add_argument("--augment-mask-input", action=argparse.BooleanOptionalAction, default=None,
                        help="prefix pass on an input whose channels >= k are zeroed (default; ~2x compute per step); "
                             "--no-augment-mask-input: reweight the full pass's front channels, no second pass")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.depth=4")


def build_config(args: argparse.Namespace) -> tuple[TrainDiffusionConfig, bool]:
    """(config, resume) from flags and overrides; model.* overrides apply after the preset is sized to the cache."""
    settings = {key: getattr(args, flag) for flag, key in FLAGS.items() if getattr(args, flag) is not None}
    if "augment_channels" in settings:
        settings["augment_channels"] = tuple(settings["augment_channels"])
    model_overrides = [o for o in args.overrides if o.startswith("model.")]
    other_overrides = [o for o in args.overrides if not o.startswith("model.")]
    config = apply_overrides(TrainDiffusionConfig(), other_overrides, settings)
    resume = args.resume
    if args.auto_resume:
        if resume:
            raise DCAEError("--auto-resume starts or continues --run-dir; drop --resume")
        resume = config.run_dir if latest_checkpoint(config.run_dir) is not None else None
    if resume:
        config = load_run_config(resume)
        config = apply_overrides(dataclasses.replace(config, run_dir=resume), other_overrides, settings)
        return apply_overrides(config, model_overrides), True
    if not config.latents:
        raise DCAEError("no latent cache given (--latents DIR, written by dcae cache-latents)")
    config = dataclasses.replace(config, model=resolve_model_config(config, read_index(config.latents)))
    return apply_overrides(config, model_overrides), False


def run(args: argparse.Namespace) -> int:
    config, resume = build_config(args)
    run_dir = train_diffusion(config, resume=resume)
    print(f"done: {run_dir} (sample with: dcae sample --diffusion {run_dir} --model AE -n 16 -o OUT)")
    return 0
