"""Study 6: does DC-AE 1.5's structured latent, with augmented diffusion training, make a DiT converge faster?

    python -m experiments.augmented_diffusion_study --steps 4000 --points 4 --seeds 0 1 2

Paper (DC-AE 1.5, arXiv 2508.00413): a c128 latent reconstructs better than a c32 one but its diffusion model
converges slower; structuring the latent (front channels = object structure) and adding diffusion objectives on the
front channels makes it converge faster. Here, on the autoencoders of study 5 (the tiny f32c128 1.5 preset trained
with and without the structured-latent mask, its seed-0 runs): BSDS500 train+test cached once per autoencoder at R px
(mirrored copies too), then a small DiT trained from scratch with the flow objective in three arms at equal steps,
batch and learning rate (the augmented objective is the loss-only form, `augment_mask_input=false`, which costs no
extra forward pass, so equal steps are equal compute):
  (a) unstructured: the latent of the autoencoder trained without the mask;
  (b) structured: the latent of the structured-latent autoencoder;
  (c) structured + augmented: (b) with `--augment-weight W`.
`--arms` adds (d) `structured+augmented-input` (the input-masked form: a second forward pass per step, so about twice
the compute at equal steps; shown for completeness, not used for a verdict).
Each run keeps --points checkpoints; each is sampled (EMA weights, --samples images, the same noise for every arm)
and scored by gFID against BSDS500 val (100 images, ADM centre crops). Training loss is read from the runs' logs.
Loss values of arms on different latents are not comparable (different targets); gFID is.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from experiments.common import BSDS, REPO, new_results, write_json_atomic
from dcae.provenance import file_sha256

CLAIM = ("Structuring the latent (front channels = object structure) and adding diffusion objectives on the front "
         "channels makes the diffusion model converge faster on a many-channel (c128) latent.")
ARMS = {  # name -> (autoencoder arm of study 5, extra train-diffusion arguments)
    "unstructured": ("plain", []),
    "structured": ("structured", []),
    "structured+augmented": ("structured", ["AUGMENT", "--no-augment-mask-input"]),
    "structured+augmented-input": ("structured", ["AUGMENT", "--augment-mask-input"]),
}
DEFAULT_ARMS = ["unstructured", "structured", "structured+augmented"]


def dcae(*args: str, log: Path | None = None) -> str:
    """Run one `dcae` command to completion (its output to `log`); returns the command line."""
    command = [sys.executable, "-m", "dcae.cli", *args]
    line = shlex.join(["dcae", *args])
    print(f"$ {line}", flush=True)
    if log is None:
        subprocess.run(command, check=True, cwd=REPO)
    else:
        with open(log, "ab") as out:
            result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        if result.returncode != 0:
            tail = log.read_text(errors="replace")[-2000:]
            raise SystemExit(f"dcae {args[0]} failed (exit {result.returncode}); its output ends:\n{tail}")
    return line


def autoencoders(path: Path) -> dict[str, Path]:
    """Study 5's seed-0 weights per arm name ('plain', 'structured')."""
    results = json.loads(path.read_text())
    found = {}
    for arm in results["arms"]:
        if arm["seed"] == min(a["seed"] for a in results["arms"]) and arm["name"] not in found:
            found[arm["name"]] = Path(arm["run_dir"]) / ("ema.safetensors" if results["settings"]["weights"] == "ema"
                                                         else "model.safetensors")
    missing = {"plain", "structured"} - set(found)
    if missing:
        raise SystemExit(f"{path}: no seed-0 run for arm(s) {sorted(missing)}; run experiments.structured_latent_study")
    return found


def cache(model: Path, work: Path, resolution: int) -> tuple[Path, str]:
    out = work / f"cache-{file_sha256(model)[:12]}-r{resolution}"
    line = shlex.join(["dcae", "cache-latents", "--model", str(model), "--data", str(BSDS / "train"),
                       str(BSDS / "test"), "-o", str(out), "--resolution", str(resolution), "--flip"])
    if not (out / "index.json").is_file() or not any(out.glob("*.safetensors")):
        line = dcae("cache-latents", "--model", str(model), "--data", str(BSDS / "train"), str(BSDS / "test"),
                    "-o", str(out), "--resolution", str(resolution), "--flip", "--batch-size", "16")
    return out, line


def train(args: argparse.Namespace, arm: str, seed: int, latents: Path, work: Path) -> tuple[Path, str]:
    extra = []
    for item in ARMS[arm][1]:
        extra += ["--augment-weight", f"{args.augment_weight:g}"] if item == "AUGMENT" else [item]
    run = work / f"{arm}-s{seed}-n{args.steps}"
    every = max(1, args.steps // args.points)
    common = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", f"{args.lr:g}",
              "log_every=10", f"ckpt_every={every}", f"keep_checkpoints={args.points + 1}", "progress=false"]
    if (run / "checkpoints" / "latest").is_file():
        line = dcae("train-diffusion", "--resume", str(run), *common, log=run / "stdout.log")
    else:
        run.mkdir(parents=True, exist_ok=True)
        line = dcae("train-diffusion", "--latents", str(latents), "--preset", args.preset, "--objective", "flow",
                    "--run-dir", str(run), "--seed", str(seed), *common, *args.override, *extra,
                    log=run / "stdout.log")
    return run, line


def loss_curve(run: Path) -> list[dict[str, float]]:
    """[{step, loss, ...}] from the run's log (every log line that has a training loss)."""
    rows = []
    for line in (run / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "event" not in record and "loss" in record:
            rows.append({k: v for k, v in record.items() if isinstance(v, (int, float))})
    return rows


class GFID:
    """gFID of a checkpoint against one reference set, the reference statistics computed once."""

    def __init__(self, reference: Path, resolution: int):
        from dcae.diffusion.pipeline import inception_stats, reference_images
        from dcae.perceptual import InceptionFeatures

        self.inception = InceptionFeatures()
        self.reference = inception_stats(reference_images(reference, resolution), self.inception)
        self.n_reference = self.reference.n

    @torch.no_grad()
    def __call__(self, checkpoint: Path, autoencoder: Path, samples: int, seed: int, steps: int | None) -> float:
        from dcae.diffusion.objectives import get_objective
        from dcae.diffusion.pipeline import inception_stats, sample_images, sample_labels, sample_noise
        from dcae.diffusion.train import load_diffusion_checkpoint
        from dcae.metrics import fid_from_stats, to_uint8
        from dcae.runtime import load_model

        ckpt = load_diffusion_checkpoint(checkpoint, ema=True)
        info, net = ckpt.info, ckpt.model
        model, _ = load_model(str(autoencoder), torch.device("cpu"), "study")
        objective = get_objective(info["objective"])
        noise = sample_noise(samples, info["latent_shape"], seed)
        labels = sample_labels(samples, net.config.num_classes, seed)
        images = sample_images(net, model, objective, noise, labels, info["scaling_factor"], steps=steps,
                               batch_size=50)
        return fid_from_stats(inception_stats(to_uint8(images), self.inception), self.reference)


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    found = []
    for path in (run / "checkpoints").glob("step_*"):
        if path.is_dir() and path.name.removeprefix("step_").isdigit():
            found.append((int(path.name.removeprefix("step_")), path))
    return sorted(found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--autoencoders", type=Path, default=Path("results/structured_latent_study.json"),
                        help="study 5's results (its seed-0 runs are the autoencoders)")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=DEFAULT_ARMS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=4000, help="optimizer steps per run (equal for every arm)")
    parser.add_argument("--points", type=int, default=4, help="checkpoints scored by gFID per run")
    parser.add_argument("--resolution", type=int, default=128, help="image side (f32: 4x4 latents at 128)")
    parser.add_argument("--preset", default="DiT-S/1")
    parser.add_argument("--override", nargs="*", default=["model.depth=4", "model.hidden_size=128", "model.num_heads=2"],
                        help="train-diffusion overrides (default: a 4-block, 128-wide DiT-S, sized for 2 CPU cores)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--augment-weight", type=float, default=1.0)
    parser.add_argument("--samples", type=int, default=100, help="generated images per gFID point")
    parser.add_argument("--sampler-steps", type=int, default=None, help="default: the objective's")
    parser.add_argument("--work", type=Path, default=Path("runs/experiments/augmented_diffusion"))
    parser.add_argument("--out", type=Path, default=Path("results/augmented_diffusion_study.json"))
    args = parser.parse_args(argv)
    args.budget_min, args.eval_limit, args.weights = 0.0, None, "ema"  # fields the shared header reads

    started = time.time()
    models = autoencoders(args.autoencoders)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    results = new_results("augmented_diffusion_study", args, CLAIM,
                          {f"autoencoder-{k}": str(v) for k, v in models.items()})
    results["smoke"] = args.steps < 500 or args.samples < 50
    caches = {name: cache(path, work, args.resolution) for name, path in models.items()}
    results["caches"] = {name: {"dir": str(c[0]), "command": c[1]} for name, c in caches.items()}
    scorer = GFID(BSDS / "val", args.resolution)
    results["gfid_reference"] = f"bsds500/val ({scorer.n_reference} images, ADM centre crops)"
    for seed in args.seeds:
        for arm in args.arms:
            ae = ARMS[arm][0]
            began = time.time()
            run, line = train(args, arm, seed, caches[ae][0], work)
            train_s = time.time() - began
            curve = []
            for step, path in checkpoints(run):
                score = scorer(path, models[ae], args.samples, seed=1000, steps=args.sampler_steps)
                curve.append({"step": step, "gfid": score})
                print(f"[gfid] {arm} seed {seed} step {step}: {score:.2f}", flush=True)
            log = loss_curve(run)
            results["arms"].append({"name": arm, "seed": seed, "autoencoder": ae, "run_dir": str(run),
                                    "command": line, "train_wall_s": train_s, "gfid": curve, "loss": log,
                                    "images_per_s": statistics.fmean(r["images_per_s"] for r in log
                                                                     if "images_per_s" in r) if log else None})
            results["wall_s"] = time.time() - started
            write_json_atomic(args.out, results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
