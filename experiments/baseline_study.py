"""Study 4: DC-AE against a conventional SD-VAE-like f8c4 autoencoder at equal training budget.

    python -m experiments.baseline_study --budget-min 40 --seeds 0 --resolution 128

Paper (DC-AE, arXiv 2410.10733, comparison with SD-VAE): f32/f64 DC-AEs reconstruct about as well as SD-VAE-f8
while compressing 4-8x more per side; f32c32 and f64c128 latents hold half as many numbers as f8c4's (3f^2/c = 96
pixel numbers per latent number against 48). Here the tiny presets dc-ae-tiny-f8c4 (ResBlocks only, no
shortcuts), dc-ae-tiny-f32c32 and dc-ae-tiny-f64c128 train for the same wall-clock budget (phase 1; the f32/f64 runs
are the residual study's own runs when the settings match). Reported with compression ratio (pixel numbers per
latent number), parameters, throughput and steps reached. Evaluated on Kodak24: crop R and native size.
"""
from __future__ import annotations

import sys
import time

from experiments.common import (
    compression_ratio, finish, make_arm, new_results, record_arm, study_parser, train_phase1,
)

PRESETS = ("dc-ae-tiny-f8c4", "dc-ae-tiny-f32c32", "dc-ae-tiny-f64c128")
CLAIM = ("DC-AE with spatial compression f32/f64 matches the reconstruction quality of SD-VAE-f8 while its latent "
         "is 4-8x smaller per side.")


def main(argv: list[str] | None = None) -> int:
    parser = study_parser(__doc__.splitlines()[0], "results/baseline_study.json")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--eval", nargs="+", default=None, help="eval specs (default: kodak24@R kodak24@native)")
    args = parser.parse_args(argv)
    specs = args.eval or [f"kodak24@{args.resolution}", "kodak24@native"]
    results = new_results("baseline_study", args, CLAIM)
    results["specs"] = specs
    started = time.time()
    for seed in args.seeds:
        for preset in args.presets:
            train = train_phase1(args, preset, seed)
            info = compression_ratio(preset)
            arm = make_arm(preset.removeprefix("dc-ae-tiny-"), seed, [train], specs, args, preset=preset, **info)
            record_arm(results, arm, started, args.out)
    return finish(results, specs, args.out)


if __name__ == "__main__":
    sys.exit(main())
