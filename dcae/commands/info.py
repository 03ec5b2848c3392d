"""`dcae info [MODEL]`: list presets, or describe a preset or a checkpoint."""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="preset name, checkpoint path or Hub id; omit to list presets")
    parser.add_argument("--json", action="store_true", help="print the config as JSON")


def run(args: argparse.Namespace) -> int:
    from dcae.presets import create_model, get_config, list_presets

    if args.model is None:
        for name in list_presets():
            config = get_config(name)
            print(f"{name:40s} f{config.spatial_factor}c{config.latent_channels}"
                  f"  scaling_factor={config.scaling_factor}")
        return 0
    if args.model in list_presets():
        model = create_model(args.model)
    else:
        from dcae.autoencoder import DCAE

        model = DCAE.from_pretrained(args.model)
    config = model.config
    if args.json:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    params = sum(p.numel() for p in model.parameters())
    ratio = 3 * config.spatial_factor**2 / config.latent_channels
    print(f"name:            {config.name}")
    print(f"latent:          f{config.spatial_factor}c{config.latent_channels} "
          f"({ratio:.0f}x fewer numbers than the image)")
    print(f"parameters:      {params / 1e6:.2f}M")
    print(f"scaling_factor:  {config.scaling_factor}")
    return 0
