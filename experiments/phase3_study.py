"""Study 3: GAN refinement of the decoder head only (phase 3) against full-model GAN tuning and no GAN.

    python -m experiments.phase3_study --budget-min 40 --seeds 0 --resolution 128

Paper (DC-AE, arXiv 2410.10733, Sec. 3.3, local refinement): local refinement of the decoder head with a GAN loss
beats GAN tuning of the whole model (rFID 0.69 vs 0.82) while keeping the latent space fixed. Here, from one phase-1
model (default preset dc-ae-tiny-f32c32), each arm trains `--extra-fraction` of the budget more: (a) no GAN: phase 1
continued (the run resumed, optimizer included), (b) phase 3 with every parameter trainable (`phase.trainable=all`),
(c) phase 3 as defined (`phase.trainable=decoder_head`). All arms keep L1 + 0.1 LPIPS; phase 3 adds the PatchGAN
hinge loss (weight 0.5, adaptive, discriminator warm-up `--disc-warmup` steps). Evaluated on Kodak24 (crop R and
native) and on Sun-Hays80 crops at R, whose 80 images give a less noisy rFID than Kodak's 24 (still far fewer than
the 50k an FID needs).

GAN refinement of a model that reconstructs only blobs says little, so `--init MODEL` starts every arm from a
trained model instead (a run directory or a save_pretrained folder, e.g. the embedded default):

    python -m experiments.phase3_study --init dcae/assets/default-f32c32 --budget-min 15 --lr 1e-4 \
        --resolution 128 --disc-warmup 100 --out results/phase3_study.json

Then each arm trains `--budget-min` (no fraction) with the same learning rate: (a) no GAN is phase 1 restarted from
the model (fresh optimizer), (b) and (c) as above. The model itself is the base arm, evaluated from a copy under
--runs-root (with its sha256 in the results), so evaluation caches never land beside the original.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

from experiments.common import (
    continue_budgeted, file_sha256, finish, make_arm, new_results, phase_args, record_arm, study_parser, train_budgeted,
    train_phase1, write_json_atomic,
)

CLAIM = ("Phase 3 (GAN loss, decoder head only) beats GAN tuning of the full model: rFID 0.69 vs 0.82, and it leaves "
         "the latent space untouched.")


def main(argv: list[str] | None = None) -> int:
    parser = study_parser(__doc__.splitlines()[0], "results/phase3_study.json")
    parser.add_argument("--preset", default="dc-ae-tiny-f32c32")
    parser.add_argument("--extra-fraction", type=float, default=0.25, help="each arm's extra budget (fraction)")
    parser.add_argument("--disc-warmup", type=int, default=200, help="discriminator-only steps before the GAN term")
    parser.add_argument("--eval", nargs="+", default=None,
                        help="eval specs (default: kodak24@R kodak24@native sunhays80@R)")
    parser.add_argument("--init", type=Path, default=None,
                        help="start every arm from this trained model (run dir or save_pretrained folder)")
    parser.add_argument("--lr", type=float, default=None, help="one learning rate for every arm (default: the "
                        "suite's phase-3 rate; with --init use a fine-tuning rate such as 1e-4)")
    args = parser.parse_args(argv)
    specs = args.eval or [f"kodak24@{args.resolution}", "kodak24@native", f"sunhays80@{args.resolution}"]
    extra_s = args.budget_min * 60 * (1.0 if args.init else args.extra_fraction)
    results = new_results("phase3_study", args, CLAIM, {"init": args.init} if args.init else None)
    results.update(specs=specs, extra_budget_min=extra_s / 60)
    lr = [] if args.lr is None else [f"phase.optim.lr={args.lr:g}"]
    gan = [f"phase.gan.disc_warmup_steps={args.disc_warmup}"] + lr
    started = time.time()
    for seed in args.seeds:
        if args.init is not None:
            base = init_record(args.init, args.runs_root)
            results["init"] = {"source": str(args.init), "sha256": base["sha256"]}
            prefix = Path(base["run_dir"]).name
            label = f"{prefix}-p1-r{args.resolution}-s{seed}"
            restart = phase_args(1, args.resolution, seed, args.batch_size, init=base["run_dir"], extra=lr)
            arms = [("trained model (base)", [base], {"trainable": "none"}),
                    ("no GAN (phase 1 restarted)", [base, train_budgeted(restart, args.runs_root, label, extra_s)],
                     {"trainable": "all"})]
        else:
            base = train_phase1(args, args.preset, seed)
            prefix = args.preset
            label = f"{prefix}-p1-r{args.resolution}-s{seed}"
            arms = [("phase 1 base", [base], {"trainable": "all"}),
                    ("no GAN (phase 1 continued)",
                     [base, continue_budgeted(base, args.runs_root, label + "-continued", extra_s)], {"trainable": "all"})]
        followups = {"full-model GAN": ("all", gan + ["phase.trainable=all"]),
                     "decoder-head GAN (phase 3)": ("decoder_head", gan)}
        for name, (trainable, extra) in followups.items():
            train_args = phase_args(3, args.resolution, seed, args.batch_size, init=base["run_dir"], extra=extra)
            label = f"{prefix}-p3-{trainable}-r{args.resolution}-s{seed}"
            arms.append((name, [base, train_budgeted(train_args, args.runs_root, label, extra_s)],
                         {"trainable": trainable, "followup_phase": 3}))
        for name, trains, extra in arms:
            arm = make_arm(name, seed, trains, specs, args, preset=args.preset, **extra)
            record_arm(results, arm, started, args.out)
    return finish(results, specs, args.out)


def init_record(source: Path, runs_root: Path) -> dict[str, Any]:
    """Copy a trained model's weights and config to runs_root/init-<sha8> and describe it like a finished run."""
    folder = source if (source / "model.safetensors").is_file() else None
    if folder is None:
        raise SystemExit(f"{source}: no model.safetensors here; --init takes a run dir or a save_pretrained folder")
    digest = file_sha256(folder / "model.safetensors")
    run_dir = Path(runs_root).resolve() / f"init-{digest[:8]}"
    if not run_dir.is_dir():
        tmp = run_dir.with_name(run_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in ("model.safetensors", "config.json"):
            if (folder / name).is_file():
                shutil.copy2(folder / name, tmp / name)
        tmp.rename(run_dir)
    record = {"run_dir": str(run_dir), "label": "init", "source": str(source), "sha256": digest, "budget_s": 0.0,
              "used_s": 0.0, "loop_s": 0.0, "final_step": 0, "steps_trained": 0, "done": True,
              "commands": [f"cp {source}/model.safetensors {source}/config.json {run_dir}/"]}
    write_json_atomic(run_dir / "budget.json", record)
    return record


if __name__ == "__main__":
    sys.exit(main())
