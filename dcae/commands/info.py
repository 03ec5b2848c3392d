"""`dcae info [MODEL]`: list presets, or describe a preset or a checkpoint."""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="preset name, checkpoint path or Hub id; omit to list presets")
    parser.add_argument("--json", action="store_true", help="print the config as JSON")


def run(args: argparse.Namespace) -> int:
    import torch

    from dcae.presets import create_model, get_config, list_presets, published, scaling_factor_note

    if args.model is None:
        for name in list_presets():
            config = get_config(name)
            factor = config.scaling_factor if config.scaling_factor is not None else (
                "unpublished" if published(name) else None)
            print(f"{name:40s} f{config.spatial_factor}c{config.latent_channels}  scaling_factor={factor}")
        return 0
    if args.model in list_presets():
        with torch.device("meta"):  # a description needs shapes, not 300M random weights
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
    entry = published(config.name)
    print(f"name:            {config.name}")
    if entry:
        print(f"published:       {entry.hub_id} (from {entry.source})")
    print(f"latent:          f{config.spatial_factor}c{config.latent_channels} "
          f"({ratio:.0f}x fewer numbers than the image)"
          + ("; structured: encode any first k channels" if config.structured_latent else ""))
    print(f"parameters:      {params / 1e6:.2f}M")
    print(f"scaling_factor:  {scaling_factor_note(config)}")
    return 0
