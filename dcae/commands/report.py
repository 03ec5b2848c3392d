"""`dcae report RUN`: a static page for a training run (curves from log.jsonl, sample images over time)."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, help="a run directory of dcae train or dcae train-diffusion (has log.jsonl)")
    parser.add_argument("-o", "--output", type=Path, default=None, metavar="DIR",
                        help="folder for index.html (default: RUN/report)")


def run(args: argparse.Namespace) -> int:
    from dcae.report_html import training_report

    print(f"wrote {training_report(args.run, args.output)}")
    return 0
