"""Every preset in the registry: structure, forward/backward, shortcuts, and the published facts."""
from __future__ import annotations

import pytest
import torch

import dcae
from dcae.autoencoder import DCAE
from dcae.errors import DCAEError
from dcae.nn import channel_to_space_shortcut, space_to_channel_shortcut
from dcae.presets import get_config, published_presets

# Forward/backward for every tiny preset, and for the twins of the original two (the 1.5 tinies' twins change the
# same shortcut wiring; they are built on the meta device below, which keeps the default suite short).
TINY = [n for n in dcae.list_presets(include_variants=False) if "tiny" in n] + [
    n + suffix for n in ("dc-ae-tiny-f32c32", "dc-ae-tiny-f64c128") for suffix in ("-plain", "-conv-shortcut")]
ALL = dcae.list_presets()


def meta_model(name: str) -> DCAE:
    with torch.device("meta"):
        return dcae.create_model(name)


@pytest.mark.parametrize("name", ALL)
def test_preset_builds_with_consistent_factor(name):
    model = meta_model(name)
    config = model.config
    assert config.name == name
    assert model.spatial_factor == 2 ** (len(config.encoder.width_list) - 1)
    assert model.latent_channels == config.latent_channels


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_backward(name):
    model = dcae.create_model(name)
    f = model.spatial_factor
    x = torch.rand(2, 3, 2 * f, 3 * f) * 2 - 1
    z = model.encode(x)
    assert z.shape == (2, model.latent_channels, 2, 3)
    y = model.decode(z)
    assert y.shape == x.shape and torch.isfinite(y).all()
    (y - x).abs().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads), "every parameter takes part in the forward pass"
    assert all(torch.isfinite(g).all() for g in grads)


def test_encode_rejects_bad_shapes():
    model = dcae.create_model("dc-ae-tiny-f32c32")
    with pytest.raises(ValueError, match="multiples of 32"):
        model.encode(torch.zeros(1, 3, 40, 64))
    with pytest.raises(ValueError, match="expected"):
        model.decode(torch.zeros(1, 3, 2, 2))


@pytest.mark.parametrize("name", [n for n in ALL if not n.endswith(("-plain", "-conv-shortcut"))])
def test_plain_twin_differs_only_in_shortcuts(name):
    base, plain = meta_model(name), meta_model(name + "-plain")
    # The residual-autoencoding shortcuts are parameter-free: same tensors, same shapes.
    assert {k: v.shape for k, v in base.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    b, p = get_config(name), get_config(name + "-plain")
    assert (b.encoder.downsample_shortcut, b.decoder.upsample_shortcut) == ("averaging", "duplicating")
    assert (p.encoder.downsample_shortcut, p.encoder.out_shortcut) == (None, False)
    assert (p.decoder.upsample_shortcut, p.decoder.in_shortcut) == (None, False)
    assert b.encoder.width_list == p.encoder.width_list and b.decoder.depth_list == p.decoder.depth_list


def test_plain_twin_changes_outputs_with_the_same_weights():
    base = dcae.create_model("dc-ae-tiny-f32c32").eval()
    plain = dcae.create_model("dc-ae-tiny-f32c32-plain").eval()
    plain.load_state_dict(base.state_dict())
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert not torch.allclose(base.encode(x), plain.encode(x))


def test_shortcuts_are_space_to_channel_and_back():
    x = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4, 4)
    down = space_to_channel_shortcut(x, out_channels=8)  # 4*4 = 16 channels averaged in pairs
    unshuffled = torch.nn.functional.pixel_unshuffle(x, 2)
    assert torch.equal(down, (unshuffled[:, 0::2] + unshuffled[:, 1::2]) / 2)
    up = channel_to_space_shortcut(down, out_channels=4)  # duplicate 8 -> 16, then pixel shuffle
    assert up.shape == x.shape
    assert torch.equal(up, torch.nn.functional.pixel_shuffle(down.repeat_interleave(2, dim=1), 2))
    # Duplication followed by averaging is the identity: the shortcuts pass the signal through unchanged.
    assert torch.equal(space_to_channel_shortcut(channel_to_space_shortcut(down, 4), 8), down)


def test_published_f32c32_size_matches_reference():
    state = meta_model("dc-ae-f32c32-in-1.0").state_dict()
    assert len(state) == 338  # efficientvit's model.safetensors has 338 tensors
    total = sum(v.numel() for v in state.values())
    assert round(total / 1e6, 1) == 323.4


# The published models whose authors published no scaling factor (DC-Gen's configs set none; no diffusers config
# in the reference sources): `dcae info` says so and names `dcae scaling-factor`.
UNPUBLISHED_FACTOR = {"dc-ae-f32c32-in-1.0-256px", "dc-ae-f32c128-1.1", "dc-ae-f32c128-1.5", "dc-ae-f64c128-1.5"}


@pytest.mark.parametrize("name", published_presets())
def test_published_presets_carry_the_published_scaling_factor(name):
    expected = {"dc-ae-f32c32-in-1.0": 0.3189, "dc-ae-f32c32-mix-1.0": 0.4552, "dc-ae-f64c128-in-1.0": 0.2889,
                "dc-ae-f64c128-mix-1.0": 0.4538, "dc-ae-f128c512-in-1.0": 0.4883, "dc-ae-f128c512-mix-1.0": 0.3620,
                "dc-ae-f32c32-sana-1.0": 0.41407, "dc-ae-f32c32-sana-1.1": 0.41407,
                "dc-ae-lite-f32c32-sana-1.1": 0.41407}
    assert get_config(name).scaling_factor == expected.get(name)
    assert (name in UNPUBLISHED_FACTOR) == (name not in expected)


def test_info_names_the_command_for_an_unpublished_factor(capsys):
    from dcae.cli import main

    assert main(["info", "dc-ae-f32c128-1.5"]) == 0
    out = capsys.readouterr().out
    assert "not published" in out and "dcae scaling-factor" in out
    assert main(["info"]) == 0
    listing = capsys.readouterr().out
    assert "dc-ae-lite-f32c32-sana-1.1" in listing and "0.41407" in listing


def test_tiny_presets_are_small():
    for name in ("dc-ae-tiny-f32c32", "dc-ae-tiny-f64c128"):
        params = sum(p.numel() for p in meta_model(name).parameters())
        assert 1e6 < params < 20e6


def test_create_model_overrides_and_unknown():
    model = dcae.create_model("dc-ae-tiny-f32c32", scaling_factor=0.5)
    assert model.scaling_factor == 0.5
    with pytest.raises(DCAEError, match="unknown preset 'dc-ae-f16c999'") as info:
        dcae.create_model("dc-ae-f16c999")
    assert "\n" not in str(info.value)
    with pytest.raises(DCAEError, match="did you mean .*dc-ae-f32c32-sana-1.0"):
        get_config("dc-ae-f32c32-sana-1.O")


def test_linear_and_quadratic_attention_agree():
    from dcae.nn import relu_linear_attention, relu_quadratic_attention

    qkv = torch.randn(2, 3 * 32 * 2, 4, 5)
    assert torch.allclose(relu_linear_attention(qkv, 32), relu_quadratic_attention(qkv, 32), atol=1e-4, rtol=1e-4)


def test_attention_stays_fp32_under_fp16_inputs():
    from dcae.nn import relu_linear_attention

    qkv = (torch.rand(1, 96, 16, 16) * 200).half()  # sums of 256 products of ~1e4 overflow fp16
    out = relu_linear_attention(qkv, 32)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_config_roundtrip_and_unknown_keys():
    config = get_config("dc-ae-f32c32-sana-1.0")
    assert dcae.DCAEConfig.from_dict(config.to_dict()) == config
    d = config.to_dict()
    d["encoder"]["widht_list"] = [1]
    with pytest.raises(ValueError, match="unknown keys"):
        dcae.DCAEConfig.from_dict(d)


@pytest.mark.parametrize("dtype,scale,tol", [(torch.float32, 1.0, 1e-6), (torch.bfloat16, 30.0, 2 ** -4),
                                             (torch.float16, 3000.0, 2 ** -7)])
def test_rms_norm_fused_channels_last_path_matches_the_plain_one(dtype, scale, tol):
    """NHWC inputs take torch's fused rms_norm; NCHW the explicit fp32 form: same values, no fp16 overflow."""
    from dcae.nn import RMSNorm2d

    torch.manual_seed(0)
    norm = RMSNorm2d(96)
    norm.weight.data.normal_()
    norm.bias.data.normal_()
    x = (torch.randn(2, 96, 7, 5) * scale).to(dtype)
    plain = norm(x)
    fused = norm(x.contiguous(memory_format=torch.channels_last))
    assert fused.dtype == dtype and fused.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(fused).all()
    assert (fused.float() - plain.float()).abs().max() <= tol * plain.float().abs().max()
    x32 = torch.randn(2, 96, 7, 5, requires_grad=True)
    grads = [torch.autograd.grad(norm(v).square().sum(), x32)[0]
             for v in (x32, x32.contiguous(memory_format=torch.channels_last))]
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_structured_latent_prefix_and_zero_padding():
    """DC-AE 1.5 (DC-Gen Adaptive{Output,Input}ConvLayer): encoding k channels gives the first k of the full latent,
    and decoding k channels equals decoding them zero-padded to c (the input conv's first k input channels)."""
    torch.manual_seed(0)
    model = dcae.create_model("dc-ae-tiny-f32c128-1.5").eval()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z = model.encode(x)  # (1, 128, 2, 2)
        for k in (1, 16, 127):
            zk = model.encode(x, channels=k)
            assert zk.shape == (1, k, 2, 2)
            assert torch.allclose(zk, z[:, :k], atol=1e-6, rtol=0)
            padded = torch.cat([zk, torch.zeros(1, 128 - k, 2, 2)], dim=1)
            y_k, y_pad = model.decode(zk), model.decode(padded)
            assert (y_k - y_pad).abs().max() <= 1e-5, k
        assert not torch.allclose(model.decode(z[:, :16]), model.decode(z), atol=1e-3), "the rest of c matters"


def test_structured_latent_refused_where_the_model_has_none():
    model = dcae.create_model("dc-ae-tiny-f32c32")
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(DCAEError, match="no structured latent"):
        model.encode(x, channels=8)
    with pytest.raises(ValueError, match="expected"):
        model.decode(torch.zeros(1, 8, 1, 1))
    with pytest.raises(DCAEError, match="from 1 to 128"):
        dcae.create_model("dc-ae-tiny-f32c128-1.5").encode(torch.zeros(1, 3, 32, 32), channels=129)
    with pytest.raises(ValueError, match="structured_latent needs"):
        get_config("dc-ae-tiny-f32c32", structured_latent=True).validate()


def test_docs_model_table_is_generated_and_current():
    from pathlib import Path

    from scripts.model_table import BEGIN, END, table

    text = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text(encoding="utf-8")
    assert f"{BEGIN}\n{table()}{END}" in text, "run: python -m scripts.model_table"
