"""Latent diffusion end to end at CPU scale: BSDS500 -> DC-AE latents -> small DiT -> samples -> gFID vs BSDS500 val.

    python experiments/diffusion_tiny.py --model runs/default-f32c32 --budget-min 10      # a trained tiny DC-AE
    python experiments/diffusion_tiny.py --budget-min 1 --samples 16 --max-images 64 --work /tmp/dt --out /tmp/dt.json

Steps (each a `dcae` command, printed as it runs): cache-latents of bsds500/train + test (400 images, flipped copies
too) at --resolution through --model (default: the dc-ae-tiny-f32c32 preset with RANDOM weights, which makes the
images meaningless but exercises everything); train-diffusion for --budget-min minutes of wall clock (stopped with
SIGINT, which checkpoints); sample --samples images with gFID against bsds500/val (100 images). For scale, two
reference gFIDs with the same number of images: real bsds500/train crops (what a perfect generator could reach at
this sample size) and the autoencoder's decode of pure prior noise (what an untrained generator gets).
Writes results/diffusion_tiny.json. BSDS500 is one unlabeled set, so the model is unconditional.
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "bsds500"


def dcae(*args: str, budget_s: float | None = None) -> None:
    """Run one `dcae` command; with a budget, SIGINT it when the budget is spent (it checkpoints and exits)."""
    cmd = [sys.executable, "-m", "dcae.cli", *args]
    print("$ dcae " + " ".join(args), flush=True)
    process = subprocess.Popen(cmd, cwd=REPO)
    try:
        process.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        process.wait()
        return
    if process.returncode != 0:
        raise SystemExit(f"dcae {args[0]} failed with exit status {process.returncode}")


@torch.no_grad()
def reference_fids(model: str, samples: int, resolution: int, scaling_factor: float, seed: int) -> dict[str, float]:
    """gFID of real train crops and of decoded prior noise, against bsds500/val, with `samples` images each."""
    from dcae.runtime import load_model
    from dcae.diffusion.pipeline import inception_stats, reference_images, sample_noise
    from dcae.metrics import fid_from_stats, to_uint8
    from dcae.perceptual import InceptionFeatures

    inception = InceptionFeatures()
    val = inception_stats(reference_images(DATA / "val", resolution), inception)
    real = reference_images(DATA / "train", resolution, limit=samples)
    autoencoder, _ = load_model(model, torch.device("cpu"), "experiment")
    factor = autoencoder.spatial_factor
    noise = sample_noise(samples, [autoencoder.latent_channels, resolution // factor, resolution // factor], seed)
    decoded = torch.cat([to_uint8(autoencoder.decode(z / scaling_factor)) for z in noise.split(8)])
    return {"train_images": fid_from_stats(inception_stats(real, inception), val),
            "decoded_prior_noise": fid_from_stats(inception_stats(decoded, inception), val)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dc-ae-tiny-f32c32", help="autoencoder (trained checkpoint or preset)")
    parser.add_argument("--work", default="runs/diffusion_tiny", help="cache, run and samples go here")
    parser.add_argument("--resolution", type=int, default=128, help="image side (f32: 4x4 latents at 128)")
    parser.add_argument("--preset", default="DiT-S/1")
    parser.add_argument("--override", nargs="*", default=["model.depth=6", "model.hidden_size=256", "model.num_heads=4"],
                        help="train-diffusion overrides (default: a 6-block, 256-wide DiT-S, 7.4M parameters)")
    parser.add_argument("--objective", default="flow", choices=("flow", "eps"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--budget-min", type=float, default=10.0, help="training wall-clock minutes")
    parser.add_argument("--samples", type=int, default=100, help="generated images for gFID (bsds500/val has 100)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the objective's)")
    parser.add_argument("--max-images", type=int, help="cache only the first N training images (smoke runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/diffusion_tiny.json")
    parser.add_argument("--figure", default="docs/figures/diffusion_tiny_samples.png",
                        help="a 512 px copy of the sample grid for docs/diffusion.md ('none': skip)")
    args = parser.parse_args()

    work = Path(args.work)
    cache, run, samples = work / "cache", work / "run", work / "samples"
    began = time.time()
    dcae("cache-latents", "--model", args.model, "--data", str(DATA / "train"), str(DATA / "test"), "-o", str(cache),
         "--resolution", str(args.resolution), "--flip", "--batch-size", "16",
         *(["--max-images", str(args.max_images)] if args.max_images else []))
    cache_s = time.time() - began
    resume = ["--resume", str(run)] if (run / "checkpoints" / "latest").exists() else [
        "--latents", str(cache), "--preset", args.preset, "--objective", args.objective, "--run-dir", str(run)]
    train_start = time.time()
    dcae("train-diffusion", *resume, "--steps", "100000000", "--batch-size", str(args.batch_size), "--lr",
         str(args.lr), "--seed", str(args.seed), "log_every=10", "ckpt_every=1000", *args.override,
         budget_s=args.budget_min * 60)
    train_s = time.time() - train_start
    sample_args = ["--steps", str(args.steps)] if args.steps else []
    dcae("sample", "--diffusion", str(run), "--model", args.model, "-n", str(args.samples), "--seed",
         str(args.seed), "--fid-ref", str(DATA / "val"), "-o", str(samples), *sample_args)

    summary = json.loads((samples / "sample.json").read_text())
    if args.figure != "none":
        from PIL import Image

        figure = REPO / args.figure
        figure.parent.mkdir(parents=True, exist_ok=True)
        Image.open(samples / "grid.png").resize((512, 512), Image.LANCZOS).save(figure, optimize=True)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [entry for entry in log if "loss" in entry]
    start = next(entry for entry in log if entry.get("event") in ("start", "resume"))
    results = {
        "command": " ".join(["python", "experiments/diffusion_tiny.py", *sys.argv[1:]]),
        "autoencoder": args.model, "resolution": args.resolution, "preset": args.preset, "overrides": args.override,
        "objective": args.objective, "batch_size": args.batch_size, "lr": args.lr, "params": start.get("params"),
        "latents_cached": start.get("latents"), "scaling_factor": start.get("scaling_factor"),
        "scaling_factor_source": start.get("scaling_factor_source"),
        "train_steps": summary["step"], "train_minutes": train_s / 60, "cache_minutes": cache_s / 60,
        "loss_first_logged": losses[0] if losses else None, "loss_last_logged": losses[-1] if losses else None,
        "sampler": summary["sampler"], "sampler_steps": summary["steps"], "samples": args.samples,
        "gfid": summary["gfid"], "fid_reference": "bsds500/val (100 images, ADM centre crops)",
        "reference_gfid_same_sample_size": reference_fids(args.model, args.samples, args.resolution,
                                                          start["scaling_factor"], args.seed),
        "samples_dir": str(samples), "torch": torch.__version__,
    }
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
