"""Agreement with diffusers' AutoencoderDC for every published DC-AE topology, against references dcae did not make.

The reference model is `diffusers.AutoencoderDC` built from diffusers' own config for each published model (the
dicts below), randomly initialised with a seed, and written by diffusers' own `save_pretrained`. dcae loads that
directory (config from diffusers' config.json, no dcae config), and both models encode and decode the same input;
then dcae's diffusers export is loaded back by diffusers, and dcae's efficientvit export goes through diffusers' own
efficientvit->diffusers converter into the reference model strictly. Max abs difference <= 1e-4 in fp32.

Default suite: each topology with its widths (latent included) divided by 8: every key, block type, depth, norm,
activation, sampling knob and shortcut group size is diffusers' own, so the same code paths and key names run, with
smaller tensors. `-m slow`: the full-size models at 256 px, efficientvit files loaded
with no config at all (recognised from their keys and shapes).
"""
from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from safetensors.torch import save_file

import dcae
from dcae.autoencoder import DCAE
from dcae.presets import get_config, published_presets
from dcae.weights import diffusers_topology, layout_shapes, to_efficientvit

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_autoencoder_dc_checkpoint_to_diffusers  # noqa: E402

TOLERANCE = 1e-4  # max abs difference, fp32
RESULTS: dict[str, tuple[float, ...]] = {}  # topology -> measured differences (printed with -s)

_RES3, _EVIT3 = ["ResBlock"] * 3, ["EfficientViTBlock"]

# diffusers scripts/convert_dcae_to_diffusers.py, get_ae_config (commit f7c4706), verbatim values.
_IN_F32 = {
    "latent_channels": 32,
    "encoder_block_types": _RES3 + _EVIT3 * 3, "decoder_block_types": _RES3 + _EVIT3 * 3,
    "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "encoder_layers_per_block": [0, 4, 8, 2, 2, 2], "decoder_layers_per_block": [0, 5, 10, 2, 2, 2],
    "encoder_qkv_multiscales": ((),) * 6, "decoder_qkv_multiscales": ((),) * 6,
    "decoder_norm_types": ["batch_norm"] * 3 + ["rms_norm"] * 3, "decoder_act_fns": ["relu"] * 3 + ["silu"] * 3,
    "scaling_factor": 0.3189,
}
_IN_F64 = {
    "latent_channels": 128,
    "encoder_block_types": _RES3 + _EVIT3 * 4, "decoder_block_types": _RES3 + _EVIT3 * 4,
    "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024, 2048],
    "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024, 2048],
    "encoder_layers_per_block": [0, 4, 8, 2, 2, 2, 2], "decoder_layers_per_block": [0, 5, 10, 2, 2, 2, 2],
    "encoder_qkv_multiscales": ((),) * 7, "decoder_qkv_multiscales": ((),) * 7,
    "decoder_norm_types": ["batch_norm"] * 3 + ["rms_norm"] * 4, "decoder_act_fns": ["relu"] * 3 + ["silu"] * 4,
    "scaling_factor": 0.2889,
}
_IN_F128 = {
    "latent_channels": 512,
    "encoder_block_types": _RES3 + _EVIT3 * 5, "decoder_block_types": _RES3 + _EVIT3 * 5,
    "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024, 2048, 2048],
    "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024, 2048, 2048],
    "encoder_layers_per_block": [0, 4, 8, 2, 2, 2, 2, 2], "decoder_layers_per_block": [0, 5, 10, 2, 2, 2, 2, 2],
    "encoder_qkv_multiscales": ((),) * 8, "decoder_qkv_multiscales": ((),) * 8,
    "decoder_norm_types": ["batch_norm"] * 3 + ["rms_norm"] * 5, "decoder_act_fns": ["relu"] * 3 + ["silu"] * 5,
    "scaling_factor": 0.4883,
}
_SANA = {
    "latent_channels": 32,
    "encoder_block_types": _RES3 + _EVIT3 * 3, "decoder_block_types": _RES3 + _EVIT3 * 3,
    "encoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "decoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "encoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)), "decoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "encoder_layers_per_block": (2, 2, 2, 3, 3, 3), "decoder_layers_per_block": [3, 3, 3, 3, 3, 3],
    "downsample_block_type": "conv", "upsample_block_type": "interpolate",
    "decoder_norm_types": "rms_norm", "decoder_act_fns": "silu", "scaling_factor": 0.41407,
}
# Not in diffusers' conversion script: DC-Gen's configs (dc_gen/aecore/models/dc_ae.py: dc_ae_f32c32 for
# "dc-ae-lite-f32c32-sana-1.1", dc_ae_f32_1_1 / dc_ae_f32_1_5 / dc_ae_f64_1_5) written as AutoencoderDC arguments,
# one argument per DC-Gen field: decoder.block_type=ResBlock -> decoder_block_types, out_act -> decoder_conv_act_fn,
# encoder.out_shortcut=null -> encoder_out_shortcut False, decoder.in_shortcut=null -> decoder_in_shortcut False;
# DC-Gen's defaults (trms2d + silu, ConvPixelShuffle, ConvPixelUnshuffle) are diffusers' rms_norm, silu,
# pixel_shuffle, pixel_unshuffle.
_LITE = {**_SANA, "decoder_block_types": "ResBlock", "decoder_layers_per_block": [0, 3, 5, 4, 4, 4],
         "upsample_block_type": "pixel_shuffle", "decoder_conv_act_fn": "silu"}
_F32_1_X = {
    "latent_channels": 128, "encoder_block_types": "ResBlock", "decoder_block_types": "ResBlock",
    "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "encoder_layers_per_block": [0, 5, 10, 4, 4, 4], "decoder_layers_per_block": [0, 5, 10, 4, 4, 4],
    "encoder_qkv_multiscales": ((),) * 6, "decoder_qkv_multiscales": ((),) * 6,
    "decoder_norm_types": "rms_norm", "decoder_act_fns": "silu",
    "encoder_out_shortcut": False, "decoder_in_shortcut": False, "decoder_conv_act_fn": "silu",
}
_F64_1_5 = {**_F32_1_X, "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024, 1024],
            "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024, 1024],
            "encoder_layers_per_block": [0, 5, 10, 4, 4, 4, 4], "decoder_layers_per_block": [0, 5, 10, 4, 4, 4, 4],
            "encoder_qkv_multiscales": ((),) * 7, "decoder_qkv_multiscales": ((),) * 7}

# topology -> (diffusers' config, the dcae presets of that topology, width divisor for the fast suite, resolution)
TOPOLOGIES = {
    "f32c32-in/mix-1.0": (_IN_F32, ["dc-ae-f32c32-in-1.0", "dc-ae-f32c32-mix-1.0", "dc-ae-f32c32-in-1.0-256px"], 8, 64),
    "f64c128-in/mix-1.0": (_IN_F64, ["dc-ae-f64c128-in-1.0", "dc-ae-f64c128-mix-1.0"], 8, 128),
    "f128c512-in/mix-1.0": (_IN_F128, ["dc-ae-f128c512-in-1.0", "dc-ae-f128c512-mix-1.0"], 8, 128),
    "f32c32-sana-1.0/1.1": (_SANA, ["dc-ae-f32c32-sana-1.0", "dc-ae-f32c32-sana-1.1"], 8, 64),
    "f32c32-lite-sana-1.1": (_LITE, ["dc-ae-lite-f32c32-sana-1.1"], 8, 64),
    "f32c128-1.1/1.5": (_F32_1_X, ["dc-ae-f32c128-1.1", "dc-ae-f32c128-1.5"], 8, 64),
    "f64c128-1.5": (_F64_1_5, ["dc-ae-f64c128-1.5"], 8, 128),
}


def test_every_published_preset_has_a_reference_topology():
    covered = [name for _, names, _, _ in TOPOLOGIES.values() for name in names]
    assert sorted(covered) == sorted(published_presets())


# ----------------------------------------------------------------------------------------------------------------------
def reduced(config: dict, divisor: int) -> dict:
    """diffusers' config with every width divided, the latent's too (so the shortcuts average and duplicate groups of
    the published sizes): nothing else changes."""
    out = dict(config, latent_channels=config["latent_channels"] // divisor)
    for key in ("encoder_block_out_channels", "decoder_block_out_channels"):
        out[key] = [w // divisor for w in config[key]]
    return out


def randomize_norms(model: torch.nn.Module) -> None:
    """Fresh norms are identities; perturb them so that a wrongly mapped norm tensor changes the output."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
            if isinstance(module, torch.nn.BatchNorm2d) or "RMSNorm" in type(module).__name__:
                module.weight.normal_(1, 0.1)
                if module.bias is not None:
                    module.bias.normal_(0, 0.1)


def reference_model(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.AutoencoderDC(**config).eval()
    randomize_norms(model)
    return model


def compare(ours: DCAE, theirs, resolution: int) -> tuple[float, float]:
    x = torch.rand(1, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        z, z_ref = ours.encode(x), theirs.encode(x).latent
        y, y_ref = ours.decode(z_ref), theirs.decode(z_ref).sample  # the same latent into both decoders
    assert z.abs().max() > 0.1 and y.abs().max() > 0.1, "outputs must not be trivially small"
    return (z - z_ref).abs().max().item(), (y - y_ref).abs().max().item()


def efficientvit_state(ours: DCAE) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in to_efficientvit(ours.state_dict(), ours.config).items()}


def diffusers_from_efficientvit(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers' own efficientvit->diffusers converter. It keys the in/mix-style head rename (`conv_out.conv`) off
    the encoder stem (no `encoder.project_in.conv.bias`); DC-AE-Lite has Sana's stem and an in/mix-style head,
    which the converter does not foresee: that one key is renamed here."""
    converted = convert_autoencoder_dc_checkpoint_to_diffusers(dict(state))
    if config.get("decoder_layers_per_block", [1])[0] == 0 and "decoder.conv_out.weight" in converted:
        for suffix in ("weight", "bias"):
            converted[f"decoder.conv_out.conv.{suffix}"] = converted.pop(f"decoder.conv_out.{suffix}")
    return converted


def check_all_ways(config: dict, resolution: int, tmp_path, name_dir: str = "model",
                   config_less_efficientvit: bool = False) -> tuple[float, ...]:
    theirs = reference_model(config)
    theirs.save_pretrained(tmp_path / "reference" / name_dir)  # diffusers' own writer and config.json
    ours = DCAE.from_pretrained(tmp_path / "reference" / name_dir).eval()
    diffs = compare(ours, theirs, resolution)

    ours.save_pretrained(tmp_path / "export", format="diffusers")  # dcae's writer, read by diffusers
    back = diffusers.AutoencoderDC.from_pretrained(tmp_path / "export").eval()
    diffs += compare(ours, back, resolution)

    state = efficientvit_state(ours)
    fresh = diffusers.AutoencoderDC(**config).eval()
    fresh.load_state_dict(diffusers_from_efficientvit(state, config), strict=True)  # the reference's key scheme
    diffs += compare(ours, fresh, resolution)

    folder = tmp_path / "efficientvit" / name_dir
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"))  # as published: no metadata, no config.json
    loaded = DCAE.from_pretrained(folder) if config_less_efficientvit else \
        DCAE.from_pretrained(folder / "model.safetensors", config=ours.config)
    diffs += compare(loaded.eval(), theirs, resolution)
    return diffs


@pytest.mark.parametrize("topology", list(TOPOLOGIES))
def test_parity_with_diffusers_reduced_width(topology, tmp_path):
    config, _, divisor, resolution = TOPOLOGIES[topology]
    diffs = check_all_ways(reduced(config, divisor), resolution, tmp_path)
    RESULTS[topology] = diffs
    print(f"{topology}: max abs diff {max(diffs):.2e} (latent, image) x (load, export, efficientvit converter, "
          f"efficientvit file) = {', '.join(f'{d:.1e}' for d in diffs)}")
    assert max(diffs) <= TOLERANCE, diffs


# ----------------------------------------------------------------------------------------------------------------------
# Full-size models, without allocating them: parameter counts, key names and shapes in both reference layouts
# ----------------------------------------------------------------------------------------------------------------------
def _meta_reference(config: dict):
    with torch.device("meta"):
        return diffusers.AutoencoderDC(**config)


@pytest.mark.parametrize("name", published_presets())
def test_published_preset_matches_reference_tensors(name):
    config = next(cfg for cfg, names, _, _ in TOPOLOGIES.values() if name in names)
    reference = _meta_reference(config)
    ref_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    ours = get_config(name)
    with torch.device("meta"):
        model = DCAE(ours)
    assert sum(p.numel() for p in reference.parameters()) == sum(p.numel() for p in model.parameters())
    assert layout_shapes(ours, "diffusers") == ref_shapes
    with torch.device("meta"):
        evit = to_efficientvit(DCAE(ours).state_dict(), ours)
    converted = diffusers_from_efficientvit(evit, config)
    assert {k: tuple(v.shape) for k, v in converted.items()} == ref_shapes


def _normalized(d: dict) -> dict:
    """AutoencoderDC arguments as diffusers interprets them: defaults filled, per-stage values expanded, sampling
    types reduced to what diffusers builds, multi-scales of ResBlock stages (unused there) dropped."""
    defaults = {k: p.default for k, p in inspect.signature(diffusers.AutoencoderDC.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    d = {**defaults, **{k: v for k, v in d.items() if not k.startswith("_")}}
    n = len(d["encoder_block_out_channels"])
    out = {}
    for key, value in d.items():
        if key in ("encoder_block_types", "decoder_block_types", "decoder_norm_types", "decoder_act_fns"):
            value = [value] * n if isinstance(value, str) else list(value)
        elif isinstance(value, (list, tuple)):
            value = [list(v) if isinstance(v, (list, tuple)) else v for v in value]
        out[key] = value
    out["downsample_block_type"] = "pixel_unshuffle" if d["downsample_block_type"] == "pixel_unshuffle" else "conv"
    out["upsample_block_type"] = "interpolate" if d["upsample_block_type"] == "interpolate" else "pixel_shuffle"
    for side in ("encoder", "decoder"):
        out[f"{side}_qkv_multiscales"] = [s if t != "ResBlock" else [] for s, t in
                                          zip(out[f"{side}_qkv_multiscales"], out[f"{side}_block_types"])]
    out.pop("scaling_factor")
    return out


@pytest.mark.parametrize("name", published_presets())
def test_diffusers_export_config_is_the_reference_config(name):
    config = next(cfg for cfg, names, _, _ in TOPOLOGIES.values() if name in names)
    assert _normalized(diffusers_topology(get_config(name))) == _normalized(config)


def test_published_sana_tensor_that_used_to_differ():
    """The published Sana encoder's first down-sampling conv is 256x128x3x3 (strided conv to the next width)."""
    shapes = layout_shapes(get_config("dc-ae-f32c32-sana-1.0"), "efficientvit")
    assert shapes["encoder.stages.0.op_list.2.main.conv.weight"] == (256, 128, 3, 3)
    assert shapes["decoder.stages.0.op_list.0.main.conv.conv.weight"] == (128, 256, 3, 3)  # interpolate + conv


def test_efficientvit_layout_through_diffusers_converter_tiny():
    """diffusers' own efficientvit->diffusers converter accepts dcae's efficientvit export of a tiny preset."""
    from dcae.weights import diffusers_config

    ours = dcae.create_model("dc-ae-tiny-f32c32").eval()
    randomize_norms(ours)
    config = {k: v for k, v in diffusers_config(ours.config).items() if not k.startswith("_")}
    theirs = diffusers.AutoencoderDC(**config).eval()
    theirs.load_state_dict(diffusers_from_efficientvit(efficientvit_state(ours), config), strict=True)
    enc, dec = compare(ours, theirs, resolution=64)
    assert enc < TOLERANCE and dec < TOLERANCE


# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("topology", list(TOPOLOGIES))
def test_parity_with_diffusers_full_size(topology, tmp_path):
    """The published sizes at 256 px; the efficientvit file has no config and is recognised from keys and shapes,
    the folder name picking the preset among those of the same topology."""
    config, names, _, _ = TOPOLOGIES[topology]
    diffs = check_all_ways(config, 256, tmp_path, name_dir=names[-1], config_less_efficientvit=True)
    RESULTS[topology + " full"] = diffs
    print(f"{topology} full size: max abs diff {max(diffs):.2e}")
    assert max(diffs) <= TOLERANCE, diffs
    loaded = DCAE.from_pretrained(tmp_path / "efficientvit" / names[-1])
    assert loaded.config == dataclasses.replace(get_config(names[-1]))
