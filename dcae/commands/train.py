"""`dcae train`: one phase (--phase 1|2|3) or the three-phase recipe, resumable, single process or under torchrun.

    dcae train --preset dc-ae-tiny-f32c32 --data DIR --phase 1 --steps N --batch-size B --resolution R --run-dir RUN
    dcae train --resume RUN --steps M
    torchrun --nproc_per_node=2 --max-restarts=3 -m dcae.cli train ... --run-dir RUN --auto-resume
    dcae train --recipe three-phase --preset NAME --data DIR --steps N --run-dir RUN [phase2.optim.lr=1e-5 ...]
    torchrun --nproc_per_node=4 -m dcae.cli train ...   (DDP: nccl on GPUs, gloo on CPUs)

Anything else is a dotted override of the TrainConfig, e.g. `optim.lr=1e-4 phase.resolution=256 ema_decay=0.999`.
"""
from __future__ import annotations

import argparse
from typing import Any

from dcae.errors import DCAEError
from dcae.runs import latest_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. optim.lr=1e-4 phase.resolution=256 data.num_workers=4")
    parser.add_argument("--preset", help="model preset to train from scratch (see `dcae info`)")
    parser.add_argument("--data", help="training images: a folder (recursive) or webdataset .tar shards")
    parser.add_argument("--val-data", help="held-out image folder: validation PSNR/LPIPS and sample grids")
    parser.add_argument("--phase", type=int, choices=(1, 2, 3), help="1 full low-res, 2 high-res latent adaptation, "
                        "3 low-res decoder-head refinement with a GAN")
    parser.add_argument("--recipe", choices=("three-phase",), help="run phases 1, 2, 3 in sequence")
    parser.add_argument("--init", help="initial weights: a run dir, a save_pretrained dir, a .safetensors, a Hub id")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    parser.add_argument("--auto-resume", action="store_true",
                        help="continue --run-dir from its latest checkpoint if it has one, else start it: one command "
                             "line for the first start and every restart (torchrun --max-restarts, a job scheduler)")
    parser.add_argument("--run-dir", help="where checkpoints, logs and samples go (default runs/dcae)")
    parser.add_argument("--steps", type=int, help="train until this step (per phase, for the recipe)")
    parser.add_argument("--phase-steps", help="recipe: steps of phases 1,2,3, e.g. 4000,1000,1000")
    parser.add_argument("--batch-size", type=int, help="images per process per step")
    parser.add_argument("--resolution", type=int, help="crop size (recipe: phases 1 and 3; phase 2 gets twice it)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--num-workers", type=int, help="DataLoader worker processes")
    parser.add_argument("--tensorboard", action="store_true", default=None,
                        help="also log scalars and validation sample grids to RUN_DIR/tensorboard")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")


def flag_settings(args: argparse.Namespace, recipe: bool) -> dict[str, Any]:
    """The convenience flags given, as typed config settings (applied before the key=value overrides, which win)."""
    pairs = [("preset", args.preset), ("data.path", args.data), ("data.val_path", args.val_data),
             ("init", args.init), ("run_dir", args.run_dir), ("steps", args.steps), ("batch_size", args.batch_size),
             ("seed", args.seed), ("data.num_workers", args.num_workers), ("tensorboard", args.tensorboard)]
    if not recipe:
        pairs.append(("phase.resolution", args.resolution))
    return {key: value for key, value in pairs if value is not None}


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from dcae import train as training

    if args.auto_resume and (args.resume or args.recipe):
        raise DCAEError("--auto-resume starts or continues --run-dir; drop --resume/--recipe")
    if args.recipe:
        return _run_recipe(args)
    resume = bool(args.resume)
    if args.resume:
        if args.phase or args.preset or args.init:
            raise DCAEError("--resume continues a run with its saved config; drop --phase/--preset/--init")
        config = training.load_run_config(args.resume, args.overrides, flag_settings(args, False))
    else:
        if args.phase is None:
            raise DCAEError("choose --phase 1|2|3, --recipe three-phase, or --resume RUN_DIR")
        if not (args.data or any(o.startswith("data.path=") for o in args.overrides)):
            raise DCAEError("--data is required: an image folder or .tar shards")
        base = dataclasses.replace(training.TrainConfig(), phase=training.phase_config(args.phase))
        config = training.apply_overrides(base, args.overrides, flag_settings(args, False))
        if args.auto_resume and latest_checkpoint(config.run_dir) is not None:  # a restart: what --resume does
            config = training.load_run_config(config.run_dir, args.overrides, flag_settings(args, False))
            resume = True
    if args.print_config:
        print(json.dumps(training.config_to_dict(config), indent=2))
        return 0
    try:
        run_dir = training.train(config, resume=resume)
    finally:
        _destroy_process_group()
    print(f"dcae train: done, step {config.steps}; weights in {run_dir}/model.safetensors")
    return 0


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _run_recipe(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from dcae import train as training

    if args.phase:
        raise DCAEError("--recipe runs all three phases; drop --phase")
    if args.resume:
        configs, path = training.saved_recipe_configs(args.resume)
        settings = {k: v for k, v in flag_settings(args, True).items() if k not in ("run_dir", "init", "preset")}
        extra = [o for o in args.overrides if not o.startswith(("run_dir=", "init=", "preset="))]
        for k, c in enumerate(configs, start=1):
            training.refuse_saved_commands(c, training.phase_overrides(extra, k), path, settings)
        steps = _phase_steps(args.phase_steps) if args.phase_steps else [c.steps for c in configs]
        configs = [training.apply_overrides(dataclasses.replace(c, steps=s), training.phase_overrides(extra, k),
                                            settings)
                   for k, (c, s) in enumerate(zip(configs, steps), start=1)]
    else:
        if not args.data:
            raise DCAEError("--data is required: an image folder or .tar shards")
        base = training.apply_overrides(training.TrainConfig(), settings=flag_settings(args, True))
        steps = _phase_steps(args.phase_steps) if args.phase_steps else (base.steps,) * 3
        configs = training.recipe_configs(base, steps, args.resolution, list(args.overrides))
    if args.print_config:
        print(json.dumps([training.config_to_dict(c) for c in configs], indent=2))
        return 0
    try:
        run_dir = training.train_recipe(configs, resume=bool(args.resume))
    finally:
        _destroy_process_group()
    print(f"dcae train: three-phase recipe done; final weights in {run_dir}/model.safetensors")
    return 0


def _phase_steps(text: str) -> tuple[int, int, int]:
    try:
        steps = tuple(int(s) for s in text.split(","))
    except ValueError:
        steps = ()
    if len(steps) != 3 or min(steps) < 0:
        raise DCAEError(f"--phase-steps {text!r}: expected three step counts, e.g. 4000,1000,1000")
    return steps  # type: ignore[return-value]

