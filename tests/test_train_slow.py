"""Slow training tests on BSDS500 (run with `pytest -m slow -s tests/test_train_slow.py`).

1. A few minutes of phase 1 on the tiny preset improve PSNR on BSDS500 val.
2. From that model, phase 2's latent-adaptation set against the alternatives at the same budget: the decoder head
   only, the whole model, and more low-resolution phase-1 steps; each evaluated at the training resolution and at
   4x it.

Each test prints its measurements as JSON (shown with -s) and writes nothing into the repository: results/ holds only
results that are committed and cited, and these are regenerated on every run, so no doc cites them.
"""
import json
import time
from pathlib import Path

import pytest
import torch

import dcae
from dcae.cli import main
from dcae.data import DataConfig, load_validation_images
from dcae.perceptual import LPIPS
from dcae.train import Dist, validate

ROOT = Path(__file__).resolve().parents[1]
BSDS = ROOT.parent / "shared" / "data" / "bsds500"
LOW = 64
PHASE1_STEPS = 400
PHASE1 = ["--preset", "dc-ae-tiny-f32c32", "--data", str(BSDS / "train"), "--val-data", str(BSDS / "val"),
          "--phase", "1", "--steps", str(PHASE1_STEPS), "--batch-size", "4", "--resolution", str(LOW), "--seed", "0",
          "--num-workers", "1", "optim.lr=1e-3", "optim.warmup_steps=50", "optim.weight_decay=0.01",
          "data.val_images=32", "data.val_resolution=128", "val_every=100", "ckpt_every=200", "log_every=25",
          "ema_decay=0.99", "progress=false"]


def _shown(args: list[str]) -> str:
    return " ".join(a.replace(str(BSDS), "../shared/data/bsds500") for a in args)


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def phase1_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("phase1") / "run"
    started = time.time()
    assert main(["train", *PHASE1, "--run-dir", str(run_dir)]) == 0
    return run_dir, (time.time() - started) / 60


@pytest.mark.slow
def test_tiny_preset_training_improves_validation_psnr(phase1_run):
    run_dir, minutes = phase1_run
    log = _log(run_dir)
    vals = [line for line in log if line.get("event") == "val"]
    result = {
        "command": "dcae train " + _shown(PHASE1),
        "wall_minutes": round(minutes, 2),
        "validation": [{"step": v["step"], "psnr": v["val_psnr"], "lpips": v["val_lpips"]} for v in vals],
        "train_loss": [(line["step"], line["loss"]) for line in log if "loss" in line],
        "initial_psnr": vals[0]["val_psnr"], "final_psnr": vals[-1]["val_psnr"],
    }
    print(json.dumps(result, indent=2))
    assert vals[0]["step"] == 0 and vals[-1]["step"] == PHASE1_STEPS
    assert result["final_psnr"] > result["initial_psnr"] + 3.0
    assert vals[-1]["val_lpips"] < vals[0]["val_lpips"]


def _evaluate(weights: Path, sizes: tuple[int, ...], lpips: LPIPS) -> dict[str, dict[str, float]]:
    model = dcae.DCAE.from_pretrained(weights)
    out = {}
    for size in sizes:
        images = load_validation_images(DataConfig(val_path=str(BSDS / "val"), val_images=16), size)
        out[str(size)] = validate(model, images, lpips, Dist(), "fp32")
    return out


@pytest.mark.slow
def test_phase2_latent_adaptation_against_alternatives(phase1_run, tmp_path):
    init, _ = phase1_run
    high, test_sizes, steps = 2 * LOW, (LOW, 4 * LOW), 150
    lpips = LPIPS("alex")
    common = ["--init", str(init), "--data", str(BSDS / "train"), "--steps", str(steps), "--batch-size", "2",
              "--seed", "1", "--num-workers", "1", "optim.lr=1e-4", "optim.warmup_steps=20", "progress=false",
              "log_every=25", "ckpt_every=1000"]
    variants = {
        "phase 2: latent adaptation": ["--phase", "2", "--resolution", str(high)],
        "decoder head only": ["--phase", "2", "--resolution", str(high), "phase.trainable=decoder_head"],
        "whole model": ["--phase", "2", "--resolution", str(high), "phase.trainable=all"],
        "more phase 1 (low res, whole model)": ["--phase", "1", "--resolution", str(LOW), "--batch-size", "8"],
    }
    result = {"init": _evaluate(init, test_sizes, lpips), "variants": {},
              "setup": f"from the phase-1 model of test 1 ({LOW} px); {steps} steps each (2 images at {high} px, or "
                       f"8 at {LOW} px: the same pixels per step), AdamW lr 1e-4; val = 16 BSDS500 val center crops"}
    for name, extra in variants.items():
        run_dir = tmp_path / name.split(":")[0].replace(" ", "_")
        args = [*common, *extra, "--run-dir", str(run_dir)]
        started = time.time()
        assert main(["train", *args]) == 0
        start_line = _log(run_dir)[0]
        result["variants"][name] = {"command": "dcae train " + _shown(args).replace(str(init), "PHASE1_RUN"),
                                    "trainable_params": start_line["trainable_params"],
                                    "wall_minutes": round((time.time() - started) / 60, 2),
                                    "val": _evaluate(run_dir, test_sizes, lpips)}
    print(json.dumps(result, indent=2))
    adapted = result["variants"]["phase 2: latent adaptation"]["val"]
    assert all(torch.isfinite(torch.tensor(v["val_psnr"])) for v in adapted.values())
    # Latent adaptation at 2x the resolution must not lose the 4x-resolution quality it started from.
    assert adapted[str(4 * LOW)]["val_psnr"] > result["init"][str(4 * LOW)]["val_psnr"] - 0.1
