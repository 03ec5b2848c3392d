"""Package a trained run as the embedded default model: fp16 dcae-format weights plus a model card.

    python experiments/eval_default.py --model dcae/assets/default-f32c32 --out results/default_model.json
    python experiments/export_default.py runs/default-f32c32 --results results/default_model.json

The card records how the run was trained (its config and log: steps, images seen, wall time) and what it scores
on Kodak24 at native size against the equal-size bicubic baseline (from the eval JSON).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from dcae.autoencoder import DCAE
from dcae.provenance import provenance
from dcae.weights import DEFAULT_MODEL_DIR, save_pretrained


def segments(run: Path) -> list[dict]:
    """One entry per start or resume of the trainer in a run's log: step range, precision, lr, images/s."""
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    out: list[dict] = []
    for event in events:
        if event.get("event") in ("start", "resume"):
            out.append({"from": event["step"], "to": event["step"], "precision": event["precision"], "lr": None,
                        "rates": []})
        elif "loss" in event and out:
            seg = out[-1]
            seg["to"] = event["step"]
            seg["lr"] = event["lr"]  # the segment's last: after any warm-up, constant
            seg["rates"].append(event["images_per_s"])
        elif event.get("event") == "checkpoint" and out:
            out[-1]["to"] = max(out[-1]["to"], event["step"])
    for seg in out:
        rates = seg.pop("rates")[1:] or [float("nan")]
        seg["images_per_s"] = sum(rates) / len(rates)
    return [seg for seg in out if seg["to"] > seg["from"]]


def training_summary(run: Path) -> dict:
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    vals = [e for e in events if e.get("event") == "val"]
    config = json.loads((run / "config.json").read_text())
    segs = segments(run)
    minutes = sum((seg["to"] - seg["from"]) * config["batch_size"] / seg["images_per_s"] / 60 for seg in segs)
    return {"run": str(run), "final_step": max(e["step"] for e in events if "step" in e), "segments": segs,
            "batch_size": config["batch_size"], "resolution": config["phase"]["resolution"],
            "first_val": vals[0] if vals else None, "last_val": vals[-1] if vals else None, "minutes": minutes, "config": config}


def loss_text(phase: dict) -> str:
    """'L1 + 0.1 LPIPS(alex)', 'MSE + 0.02 LPIPS(alex)', ... from a run's phase config (terms with weight > 0)."""
    terms = [(phase.get("l1_weight", 1.0), "L1"), (phase.get("mse_weight", 0.0), "MSE"),
             (phase.get("lpips_weight", 0.0), "LPIPS(alex)")]
    return " + ".join(name if weight == 1 else f"{weight:g} {name}" for weight, name in terms if weight > 0)


def schedule_text(optim: dict) -> str:
    decay = optim.get("decay_steps", 0)
    if decay <= 0:
        return ""
    ratio = optim.get("min_lr_ratio", 0.0)
    return (f", lr cosine-decayed over {decay} steps after a {optim['warmup_steps']}-step warm-up to "
            + (f"{ratio:g} x lr" if ratio else "0"))


def run_lines(summary: dict) -> str:
    phase = summary["config"]["phase"]
    head = (f"- `{summary['run']}`: phase {phase['phase']} ({phase['trainable']} parameters train), "
            f"{loss_text(phase)}, random {summary['resolution']} px crops with flips, "
            f"batch {summary['batch_size']}, AdamW (weight decay {phase['optim']['weight_decay']}"
            f"{schedule_text(phase['optim'])}), seed "
            f"{summary['config']['seed']}; {summary['final_step']} steps, about {summary['minutes']:.0f} minutes "
            f"of training steps on two shared CPU cores:")
    last = "last " if phase["optim"].get("decay_steps", 0) > 0 else ""
    rows = [f"  - steps {seg['from']}-{seg['to']}: {seg['precision']}, {last}lr {seg['lr']:.2g}, "
            f"{seg['images_per_s']:.1f} images/s" for seg in summary["segments"]]
    val = summary["last_val"]
    if val:
        first = summary["first_val"]
        rows.append(f"  - validation (BSDS500 val, center crops at {summary['resolution']} px): PSNR "
                    f"{first['val_psnr']:.2f} dB / LPIPS {first['val_lpips']:.3f} at step {first['step']}, "
                    f"{val['val_psnr']:.2f} dB / {val['val_lpips']:.3f} at step {val['step']}")
    return "\n".join(["  " + line for line in [head, *rows]])


def stage_table(stages: list[Path], final: Path) -> str:
    """Kodak24 native after each run of the chain (each run's weights as trained, fp32)."""
    if not stages:
        return ""
    lines = ["", "## Kodak24 at native size after each run", "",
             "The same evaluation (`experiments/eval_default.py`) after each run of the chain: the high-resolution runs "
             "repair the generalization penalty of a model that only saw 128 px crops (4x4 latents; Kodak's are 24x16). "
             "A row marked 'in N px tiles' codes each image in blended tiles of that size (`--tile N`): the phase-1 "
             "model does better on the same pixels when each pass holds no more latent tokens than it was trained "
             "on, which is the penalty itself, measured without any training.",
             "", "| after | PSNR (dB) | SSIM | LPIPS (alex) | vs bicubic (dB) |", "|---|---|---|---|---|"]
    for path in [*stages, final]:
        result = json.loads(path.read_text())
        m = result["mean"]
        tiles = f" in {result['tile']} px tiles" if result.get("tile") else ""
        lines.append(f"| `{result['model']}`{tiles} | {m['dcae_psnr']:.2f} | {m['dcae_ssim']:.4f} | {m['dcae_lpips']:.4f} "
                     f"| {m['dcae_psnr'] - m['bicubic_psnr']:+.2f} |")
    return "\n".join(lines) + "\n"


SELECTION = """## How this model was chosen, and what that means for its scores

The rule from now on: choices between candidate models (raw or EMA weights, one loss recipe or another, when to stop)
are made on BSDS500 `val`; Kodak24 and SunHays80 are kept for the final report only, so that the scores above are
of a model that no test image helped to pick.

This model was not chosen that way. Two choices were made on Kodak24, the set its scores are reported on: shipping
the last run's raw weights rather than its EMA weights (23.86 against 23.81 dB, results/default_checks/final-run-ema.json),
and keeping a small LPIPS weight in the last stage rather than MSE alone (results/default_mse_only.json: 23.68 dB,
LPIPS 0.535; that JSON records neither the run's steps nor its command). Both gaps are small, but they were read off
the test set, so the Kodak24 figures above are slightly optimistic as a measure of unseen images. The candidate
weights (the runs' EMA files and the MSE-only run) were in `runs/`, which is not committed and no longer exists, so the
choice cannot be redone on BSDS500 `val` without retraining them."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="the training runs in order; the last one's weights ship")
    parser.add_argument("--results", type=Path, default=Path("results/default_model.json"))
    parser.add_argument("--out", type=Path, default=Path(os.path.relpath(DEFAULT_MODEL_DIR)),
                        help="where the packaged model goes (default: the package's asset folder)")
    parser.add_argument("--commands", nargs="*", default=[], help="the commands that trained the runs, for the card")
    parser.add_argument("--weights", choices=("model", "ema"), default="model",
                        help="ship the last run's raw weights or its EMA (exponential moving average) weights")
    parser.add_argument("--training-json", type=Path, default=Path("results/default_training.json"),
                        help="the per-run training summaries the card cites (committed, unlike runs/)")
    parser.add_argument("--stages", type=Path, nargs="*", default=[],
                        help="eval_default.py JSONs of the earlier runs, for a stage-by-stage Kodak24 table")
    args = parser.parse_args()

    model = DCAE.from_pretrained(args.runs[-1], weights=args.weights)
    save_pretrained(model, args.out, format="dcae", dtype=torch.float16)
    summaries = [training_summary(run) for run in args.runs]
    args.training_json.write_text(json.dumps({"runs": summaries, "provenance": provenance({"model": args.out})},
                                             indent=2) + "\n")
    scores = json.loads(args.results.read_text())["mean"]
    size_mb = (args.out / "model.safetensors").stat().st_size / 2**20
    params = sum(p.numel() for p in model.parameters())
    margin = scores["dcae_psnr"] - scores["bicubic_psnr"]
    verdict = (f"PSNR margin over bicubic: {margin:+.2f} dB; LPIPS {scores['dcae_lpips']:.3f} vs "
               f"{scores['bicubic_lpips']:.3f}." + ("" if margin >= 1 else
               " The target of bicubic + 1 dB is not reached yet: this small model trained for about "
               f"{sum(s['minutes'] for s in summaries):.0f} minutes on a CPU. `python -m experiments.train_default "
               "--budget-min N --resume` continues a run."))
    commands = "\n".join(f"    {c}" for c in [*args.commands,
                                               f"python experiments/eval_default.py --model {args.out} --out {args.results}",
                                               f"python experiments/export_default.py {' '.join(map(str, args.runs))}"
                                               + (" --weights ema" if args.weights == "ema" else "")])
    shipped = (f" EMA weights (decay {summaries[-1]['config']['ema_decay']:g})"
               if args.weights == "ema" else ", not EMA")
    card = f"""# Embedded default model: `{model.config.name}` trained on BSDS500

Generated by `experiments/export_default.py`; every number below comes from `{args.results}`, and the per-run
training figures from `{args.training_json}` (read from the runs' `log.jsonl`).

- Architecture: `{model.config.name}` (f{model.spatial_factor}c{model.latent_channels}, {params / 1e6:.2f}M parameters),
  stored as float16 safetensors ({size_mb:.1f} MB; BatchNorm statistics in float32); dcae loads it into float32.
- Data: BSDS500 `train` + `test` (400 photos, 481x321); validation on BSDS500 `val`. Never trained on Kodak or
  SunHays80 (but see how the model was chosen, below).
- Training, run by run (a run continues the previous one's weights; the shipped weights are the last run's{shipped}):
{chr(10).join(run_lines(s) for s in summaries)}
- Commands:

{commands}

## Kodak24 at native size (768x512), uint8 outputs

| | PSNR (dB) | SSIM | LPIPS (alex) |
|---|---|---|---|
| this model | {scores['dcae_psnr']:.2f} | {scores['dcae_ssim']:.4f} | {scores['dcae_lpips']:.4f} |
| equal-size bicubic (downscale by sqrt(96) per side, back up) | {scores['bicubic_psnr']:.2f} | {scores['bicubic_ssim']:.4f} | {scores['bicubic_lpips']:.4f} |

{verdict}
{stage_table(args.stages, args.results)}
{SELECTION}
"""
    (args.out / "MODEL_CARD.md").write_text(card)
    print(card)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
