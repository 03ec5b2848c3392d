"""Bit-level agreement with diffusers' AutoencoderDC on the same weights, in both directions."""
from __future__ import annotations

import pytest
import torch

import dcae
from dcae.autoencoder import DCAE
from dcae.weights import diffusers_config, to_efficientvit

diffusers = pytest.importorskip("diffusers")
TOLERANCE = 1e-4  # max abs difference, fp32


def randomize_norms(model: torch.nn.Module) -> None:
    """Fresh norms are identities; perturb them so that a wrongly mapped norm tensor changes the output."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
            if isinstance(module, torch.nn.BatchNorm2d) or "RMSNorm" in type(module).__name__:
                module.weight.normal_(1, 0.1)
                module.bias.normal_(0, 0.1)


def compare(ours: DCAE, theirs, resolution: int = 256) -> tuple[float, float]:
    x = torch.rand(1, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        z = ours.encode(x)
        z_ref = theirs.encode(x).latent
        y = ours.decode(z)
        y_ref = theirs.decode(z).sample  # same latent into both decoders
    assert z.abs().max() > 0.1 and y.abs().max() > 0.1, "outputs must not be trivially small"
    return (z - z_ref).abs().max().item(), (y - y_ref).abs().max().item()


def dcae_to_diffusers(name: str, tmp_path) -> tuple[float, float]:
    ours = dcae.create_model(name).eval()
    randomize_norms(ours)
    ours.save_pretrained(tmp_path, format="diffusers")
    theirs = diffusers.AutoencoderDC.from_pretrained(tmp_path).eval()
    return compare(ours, theirs)


def diffusers_to_dcae(name: str, tmp_path) -> tuple[float, float]:
    config = diffusers_config(dcae.get_config(name))
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    theirs = diffusers.AutoencoderDC(**config).eval()
    randomize_norms(theirs)
    theirs.save_pretrained(tmp_path)  # diffusers' own writer
    ours = DCAE.from_pretrained(tmp_path).eval()
    return compare(ours, theirs)


def test_f32c32_dcae_weights_in_diffusers(tmp_path):
    enc, dec = dcae_to_diffusers("dc-ae-f32c32-in-1.0", tmp_path)
    assert enc < TOLERANCE and dec < TOLERANCE, (enc, dec)


def test_f32c32_diffusers_weights_in_dcae(tmp_path):
    enc, dec = diffusers_to_dcae("dc-ae-f32c32-in-1.0", tmp_path)
    assert enc < TOLERANCE and dec < TOLERANCE, (enc, dec)


def test_efficientvit_layout_through_diffusers_converter():
    """diffusers' own efficientvit->diffusers converter accepts dcae's efficientvit export, strictly."""
    from diffusers.loaders.single_file_utils import convert_autoencoder_dc_checkpoint_to_diffusers

    ours = dcae.create_model("dc-ae-tiny-f32c32").eval()
    randomize_norms(ours)
    converted = convert_autoencoder_dc_checkpoint_to_diffusers(to_efficientvit(ours.state_dict(), ours.config))
    config = {k: v for k, v in diffusers_config(ours.config).items() if not k.startswith("_")}
    theirs = diffusers.AutoencoderDC(**config).eval()
    theirs.load_state_dict(converted, strict=True)
    enc, dec = compare(ours, theirs, resolution=128)
    assert enc < TOLERANCE and dec < TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dc-ae-f64c128-in-1.0", "dc-ae-f128c512-mix-1.0", "dc-ae-f32c32-sana-1.0"])
@pytest.mark.parametrize("direction", [dcae_to_diffusers, diffusers_to_dcae])
def test_big_presets(tmp_path, name, direction):
    enc, dec = direction(name, tmp_path)
    assert enc < TOLERANCE and dec < TOLERANCE, (enc, dec)
