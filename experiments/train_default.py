"""Train the embedded default model (dc-ae-tiny-f32c32) on BSDS500 train+test, within a wall-clock budget.

    python -m experiments.train_default --budget-min 60 --run-dir runs/default-f32c32
    python -m experiments.train_default --budget-min 60 --resume precision=bf16 phase.optim.lr=1e-4   # continue
    python -m experiments.train_default --budget-min 20 --phase 2 --init runs/default-f32c32 \
        --run-dir runs/default-f32c32-p2 --resolution 256 --batch-size 4 precision=bf16    # then adapt at 256 px

Phase 1 (L1 + 0.1 LPIPS) at 128px crops: on two CPU cores this is where the budget buys the most PSNR; then
phase 2 (latent adaptation: only the layers next to the latent train) at 256 px, against the generalization
penalty of a model that has only seen 4x4 latents (Kodak's are 24x16).
The run stops at the budget with a checkpoint (SIGINT), resumable with the same command plus --resume.
Then `python experiments/export_default.py RUN` writes the packaged fp16 copy and its model card.
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

from experiments.common import BSDS, union_folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-min", type=float, default=60.0, help="wall-clock minutes before stopping")
    parser.add_argument("--run-dir", default="runs/default-f32c32")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1_000_000, help="stop at this step even within the budget")
    parser.add_argument("--phase", type=int, default=1, choices=(1, 2))
    parser.add_argument("--init", help="phase 2: the phase-1 run to start from")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides passed to dcae train "
                        "(on --resume they change the rest of the run, e.g. phase.optim.lr=1e-4 precision=bf16)")
    args = parser.parse_args()
    if args.phase == 2 and not (args.init or args.resume):
        parser.error("--phase 2 needs --init RUN (the phase-1 run)")

    data = union_folder(Path("runs/data/bsds500-train+test"))
    if args.resume:
        cmd = ["--resume", args.run_dir, "--steps", str(args.steps)]
    else:
        start = ["--preset", "dc-ae-tiny-f32c32"] if args.phase == 1 else ["--init", args.init]
        lr = ["phase.optim.lr=1e-3", "phase.optim.warmup_steps=200", "phase.optim.weight_decay=0.01"] \
            if args.phase == 1 else ["phase.optim.lr=1e-4", "phase.optim.warmup_steps=50"]
        cmd = [*start, "--data", str(data), "--val-data", str(BSDS / "val"),
               "--phase", str(args.phase), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--resolution", str(args.resolution), "--seed", str(args.seed), "--run-dir", args.run_dir,
               "--num-workers", "1",
               *lr, "phase.lpips_weight=0.1", "ema_decay=0.999", "val_every=500", "ckpt_every=250",
               "progress=false", "log_every=25"]
    cmd += args.overrides
    proc = subprocess.Popen([sys.executable, "-m", "dcae.cli", "train", *cmd])
    deadline = time.time() + args.budget_min * 60
    while proc.poll() is None and time.time() < deadline:
        time.sleep(5)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # the trainer checkpoints and exits (status 130)
        proc.wait()
        return 0  # stopping at the budget is the normal end of this script
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
