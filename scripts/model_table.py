"""Write the table of published DC-AE models in docs/models.md from the preset registry (never typed by hand).

    python -m scripts.model_table          # rewrite the table between the markers in docs/models.md
    python -m scripts.model_table --check  # exit 1 if docs/models.md is out of date

Parameter and tensor counts come from the models built on the meta device; tests/test_diffusers_parity.py checks the
same counts, names and shapes against diffusers' AutoencoderDC built from its own config for each model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dcae.autoencoder import DCAE
from dcae.presets import get_config, published, published_presets
from dcae.weights import layout_shapes

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"
BEGIN, END = "<!-- model-table:begin -->", "<!-- model-table:end -->"


def table() -> str:
    rows = ["| preset | latent | parameters | tensors (efficientvit) | down / up | scaling_factor | weights |",
            "| --- | --- | ---: | ---: | --- | --- | --- |"]
    for name in published_presets():
        config = get_config(name)
        with torch.device("meta"):
            params = sum(p.numel() for p in DCAE(config).parameters())
        tensors = len(layout_shapes(config, "efficientvit"))
        entry = published(name)
        latent = f"f{config.spatial_factor}c{config.latent_channels}" + (" structured" if config.structured_latent
                                                                           else "")
        sampling = f"{config.encoder.downsample_block} / {config.decoder.upsample_block}"
        factor = f"{config.scaling_factor}" if config.scaling_factor is not None else "not published"
        rows.append(f"| `{name}` | {latent} | {params / 1e6:.2f}M | {tensors} | {sampling} | {factor} | "
                    f"`{entry.hub_id}` |")
    return "\n".join(rows) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = DOC.read_text(encoding="utf-8")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{table()}{END}{tail}"
    if args.check:
        return 0 if new == text else 1
    DOC.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
