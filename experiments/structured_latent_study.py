"""Study 5: does DC-AE 1.5's structured-latent training make every channel prefix decode, at little cost at full C?

    OMP_NUM_THREADS=1 python -m experiments.structured_latent_study --budget-min 24 --seeds 0 1 2 --resolution 64 \
        --eval-resolution 128 --no-rfid --parallel

Paper (DC-AE 1.5, arXiv 2508.00413): training the autoencoder with a random channel mask on its latent (keep the
first c' channels, zero the rest; c' drawn each iteration) puts object structure in the front channels and detail in
the later ones, so any prefix of the latent decodes to a sensible image. Here: the tiny f32c128 1.5 preset
(`dc-ae-tiny-f32c128-1.5`, 6.8M parameters, no latent shortcuts) trained for the same wall-clock budget (phase 1,
BSDS500 train+test) with the mask (`phase.structured_latent.enabled=true`, dcae's defaults) and without it. Each is
evaluated with `dcae eval --channels 16 32 64 128` on Kodak24 and Sun-Hays80 (ADM centre crop to --eval-resolution):
the first k channels decoded, k = 16 ... 128.
Claims tested: (1) with the mask, quality falls gracefully as channels are dropped, while the unmasked model's
prefixes are useless; (2) at full C the mask costs little.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from experiments.common import (
    EVAL_SETS, REPO, finish, new_results, record_arm, study_parser, train_phase1, training_data, weights_file,
    write_json_atomic,
)
from dcae.provenance import file_sha256

PRESET = "dc-ae-tiny-f32c128-1.5"
ARMS = {"structured": ["phase.structured_latent.enabled=true"], "plain": []}
CHANNELS = (16, 32, 64, 128)
CLAIM = ("Training with a random channel mask on the latent makes any leading-channel prefix decode to a sensible "
         "image (quality falls gracefully as channels are dropped), at little cost in full-latent quality.")


def spec_name(set_name: str, resolution: int, k: int) -> str:
    return f"{set_name}@{resolution} k={k}"


def evaluate_sweep(run_dir: Path, set_name: str, resolution: int, channels: list[int], weights: str,
                   limit: int | None, rfid: bool = True) -> dict[str, dict[str, Any]]:
    """One `dcae eval --channels ...` of a run's weights -> {spec: metrics} with one spec per kept-channel count."""
    tag = (f"{set_name}_{resolution}-k{'-'.join(map(str, channels))}-{weights}{f'-n{limit}' if limit else ''}"
           f"{'' if rfid else '-no-rfid'}")
    cache = Path(run_dir) / "eval" / f"{tag}.json"
    if not cache.is_file():
        started = time.time()
        model = weights_file(run_dir, weights)
        tmp = cache.with_name(cache.name + ".dcae-eval.json")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        cli = ["--model", str(model), "--data", str(EVAL_SETS[set_name]), "--resolution", str(resolution),
               "--channels", *map(str, channels), "--json", str(tmp), "--batch-size", "4"]
        cli += (["--limit", str(limit)] if limit else []) + ([] if rfid else ["--no-rfid"])
        subprocess.run([sys.executable, "-m", "dcae.cli", "eval", *cli], check=True, cwd=REPO)
        sweep = json.loads(tmp.read_text())
        tmp.unlink()
        command = shlex.join(["dcae", "eval", *cli])
        out = {}
        for k, metrics in per_channel_metrics(sweep).items():
            out[spec_name(set_name, resolution, k)] = {**metrics, "command": command, "channels": k,
                                                       "set": set_name, "resolution": resolution,
                                                       "wall_s": time.time() - started}
        write_json_atomic(cache, out)
    result = json.loads(cache.read_text())
    for spec, m in result.items():
        print(f"[eval] {Path(run_dir).name} {spec}: PSNR {m['psnr']:.2f}  SSIM {m['ssim']:.4f}  "
              f"LPIPS {m['lpips']:.4f}  (n={m['n']})", flush=True)
    return result


def per_channel_metrics(sweep: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """`dcae eval --channels` JSON -> {k: {psnr, ssim, lpips, rfid, n}}."""
    return {int(row["channels"]): {key: row.get(key) for key in ("psnr", "ssim", "lpips", "rfid", "n")}
            for row in sweep["by_channels"]}


def main(argv: list[str] | None = None) -> int:
    parser = study_parser(__doc__.splitlines()[0], "results/structured_latent_study.json")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--channels", type=int, nargs="+", default=list(CHANNELS), help="kept-channel counts")
    parser.add_argument("--eval-sets", nargs="+", choices=list(EVAL_SETS), default=list(EVAL_SETS))
    parser.add_argument("--eval-resolution", type=int, default=256, help="ADM centre-crop side for evaluation")
    parser.add_argument("--no-rfid", dest="rfid", action="store_false",
                        help="PSNR/SSIM/LPIPS only (for machines without the InceptionV3 weights)")
    parser.add_argument("--parallel", action="store_true",
                        help="train every (seed, arm) run at once (an accelerator with room for all: equal conditions "
                             "for every arm), then evaluate")
    args = parser.parse_args(argv)
    results = new_results("structured_latent_study", args, CLAIM)
    specs = [spec_name(s, args.eval_resolution, k) for s in args.eval_sets for k in args.channels]
    results["specs"], results["channels"], results["preset"] = specs, args.channels, PRESET
    started = time.time()
    jobs = [(seed, name) for seed in args.seeds for name in args.arms]
    trained: dict[tuple[int, str], dict[str, Any]] = {}
    if args.parallel:
        training_data()  # the training folder of links, made once before the threads start
        with ThreadPoolExecutor(len(jobs)) as pool:  # each thread waits on its own `dcae train` subprocess
            futures = {job: pool.submit(train_phase1, args, PRESET, job[0], ARMS[job[1]]) for job in jobs}
            trained = {job: future.result() for job, future in futures.items()}
    for seed, name in jobs:
        train = trained.get((seed, name)) or train_phase1(args, PRESET, seed, extra=ARMS[name])
        run_dir = Path(train["run_dir"])
        weights = weights_file(run_dir, args.weights)
        evals: dict[str, Any] = {}
        for set_name in args.eval_sets:
            evals.update(evaluate_sweep(run_dir, set_name, args.eval_resolution, args.channels, args.weights,
                                        args.eval_limit, args.rfid))
        arm = {"name": name, "seed": seed, "run_dir": str(run_dir), "train": [train], "preset": PRESET,
               "overrides": ARMS[name], "weights_sha256": file_sha256(weights) if weights.is_file() else None,
               "train_wall_s": train["used_s"], "train_loop_s": train["loop_s"], "eval": evals}
        record_arm(results, arm, started, args.out)
    return finish(results, specs[:1] + specs[len(args.channels) - 1:len(args.channels)], args.out)


if __name__ == "__main__":
    sys.exit(main())
