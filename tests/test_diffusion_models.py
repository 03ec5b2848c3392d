"""DiT / UViT: registry, shapes for patch sizes 1/2/4, adaLN-Zero init, conditioning, CFG, paper parameter counts."""
from __future__ import annotations

import pytest
import torch

from dcae.diffusion.layers import PatchEmbed, unpatchify
from dcae.diffusion.objectives import classifier_free_guidance
from dcae.diffusion.presets import (
    DIFFUSION_PRESETS,
    create_diffusion_model,
    get_diffusion_config,
    list_diffusion_presets,
    model_config_from_dict,
)

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = [name for name in list_diffusion_presets() if name.startswith(("DiT-T/", "UViT-T/"))]


def param_count(name: str, **overrides) -> int:
    with torch.device("meta"):  # no memory for the big presets
        model = create_diffusion_model(name, **overrides)
    return sum(p.numel() for p in model.parameters())


def test_registry_has_the_papers_sizes():
    for name in ("DiT-XL/1", "DiT-XL/2", "UViT-S/1", "UViT-H/1", "UViT-2B/1", "DiT-T/1", "UViT-T/4"):
        assert name in DIFFUSION_PRESETS
    h = get_diffusion_config("UViT-H/1")
    assert (h.depth, h.hidden_size, h.num_heads, h.patch_size) == (28, 1152, 16, 1)
    b2 = get_diffusion_config("UViT-2B/1")
    assert (b2.depth, b2.hidden_size, b2.num_heads) == (28, 2048, 32)


def test_parameter_counts_match_the_papers():
    # DiT-XL/2 on 32x32x4 latents: 675M in DiT's Table 4 (with learned sigma; ours predicts no variance: 18K fewer).
    assert abs(param_count("DiT-XL/2", in_channels=4, input_size=32) - 675.1e6) < 0.005 * 675.1e6
    # U-ViT-H/2 on 32x32x4 latents: 501M (U-ViT Table 1).
    assert abs(param_count("UViT-H/2", in_channels=4, input_size=32, mlp_time_embed=False) - 501e6) < 0.01 * 501e6


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_forward_backward(name):
    torch.manual_seed(0)
    model = create_diffusion_model(name, in_channels=3, input_size=8, num_classes=5)
    x = torch.randn(2, 3, 8, 8)
    out = model(x, torch.tensor([10.0, 900.0]), torch.tensor([1, 5]))  # 5 is the null class
    assert out.shape == x.shape
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", ["DiT-T/2", "UViT-T/2"])
def test_unconditional_models_take_no_labels(arch):
    model = create_diffusion_model(arch, in_channels=4, input_size=8, num_classes=0)
    assert model.null_class is None
    assert model(torch.randn(3, 4, 8, 8), torch.full((3,), 500.0)).shape == (3, 4, 8, 8)


@pytest.mark.parametrize("p", [1, 2, 4])
def test_unpatchify_inverts_patch_order(p):
    x = torch.randn(2, 3, 8, 8)
    embed = PatchEmbed(3, 3 * p * p, p)
    with torch.no_grad():  # make the conv the identity on each patch, laid out (p, p, C) like the output head
        embed.proj.weight.zero_()
        embed.proj.bias.zero_()
        for i in range(p):
            for j in range(p):
                for c in range(3):
                    embed.proj.weight[(i * p + j) * 3 + c, c, i, j] = 1.0
    assert torch.equal(unpatchify(embed(x), p, 3, 8, 8), x)


def test_dit_adaln_zero_output_is_zero_at_init():
    torch.manual_seed(0)
    model = create_diffusion_model("DiT-T/2", in_channels=4, input_size=8, num_classes=3)
    out = model(torch.randn(4, 4, 8, 8), torch.rand(4) * 1000, torch.tensor([0, 1, 2, 3]))
    assert torch.count_nonzero(out) == 0
    # ... and each block is the identity: its gates are zero, not merely the output layer.
    block = model.blocks[0]
    tokens, c = torch.randn(2, 16, 64), torch.randn(2, 64)
    assert torch.equal(block(tokens, c), tokens)


def test_uvit_is_not_zero_at_init_and_uses_long_skips():
    torch.manual_seed(0)
    model = create_diffusion_model("UViT-T/1", in_channels=4, input_size=4, num_classes=0)
    assert len(model.in_blocks) == len(model.out_blocks) == 1
    assert all(b.skip_linear is not None for b in model.out_blocks)
    assert model(torch.randn(1, 4, 4, 4), torch.tensor([3.0])).abs().sum() > 0


@pytest.mark.parametrize("arch", ["DiT-T/1", "UViT-T/1"])
def test_labels_and_time_change_the_output(arch):
    torch.manual_seed(0)
    model = create_diffusion_model(arch, in_channels=4, input_size=4, num_classes=3)
    for p in model.parameters():  # leave adaLN-Zero's zero start, so that conditioning can show
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(1, 4, 4, 4), torch.tensor([100.0])
    base = model(x, t, torch.tensor([0]))
    assert not torch.allclose(base, model(x, t, torch.tensor([1])))
    assert not torch.allclose(base, model(x, torch.tensor([700.0]), torch.tensor([0])))


@pytest.mark.parametrize("arch", ["DiT-T/1", "UViT-T/2"])
def test_cfg_scale_one_is_conditional_and_zero_is_unconditional(arch):
    torch.manual_seed(0)
    model = create_diffusion_model(arch, in_channels=4, input_size=4, num_classes=3).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t, y = torch.randn(5, 4, 4, 4), torch.rand(5) * 1000, torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, model.null_class))
        assert torch.allclose(classifier_free_guidance(model, 1.0, model.null_class)(x, t, y), cond, atol=1e-5)
        assert torch.allclose(classifier_free_guidance(model, 0.0, model.null_class)(x, t, y), uncond, atol=1e-5)
        guided = classifier_free_guidance(model, 4.0, model.null_class)(x, t, y)
        assert torch.allclose(guided, uncond + 4.0 * (cond - uncond), atol=1e-4)
        assert not torch.allclose(cond, uncond)  # the labels matter, so the checks above are not vacuous


def test_model_config_roundtrip_and_bad_dicts():
    import dataclasses

    config = get_diffusion_config("UViT-S/2", in_channels=32, input_size=16, num_classes=7)
    assert model_config_from_dict(dataclasses.asdict(config)) == config
    with pytest.raises(ValueError, match="unknown keys"):
        model_config_from_dict({**dataclasses.asdict(config), "dept": 3})
    with pytest.raises(ValueError, match="unknown arch"):
        model_config_from_dict({"arch": "unet"})


@pytest.mark.parametrize("field,value,message", [
    ("hidden_size", 2 ** 57, "model.hidden_size=.*integer from 1 to"), ("hidden_size", -8, "from 1 to"),
    ("hidden_size", 6, "multiple of 4"), ("num_heads", 0, "model.num_heads=0"), ("num_heads", 5, "does not split"),
    ("depth", True, "model.depth=True"), ("mlp_ratio", float("nan"), "mlp_ratio"), ("mlp_ratio", 0.001, "no hidden"),
    ("patch_size", 3, "does not divide"), ("num_classes", -1, "from 0 to"), ("in_channels", "4", "model.in_channels")])
def test_check_model_config_names_the_field(field, value, message):
    import dataclasses

    from dcae.diffusion.presets import check_model_config
    from dcae.errors import DCAEError

    for name in ("DiT-S/1", "UViT-S/1"):
        config = get_diffusion_config(name, in_channels=32, input_size=16)
        check_model_config(config)  # the presets pass
        with pytest.raises(DCAEError, match=message):
            check_model_config(dataclasses.replace(config, **{field: value}))


def test_every_preset_passes_the_range_check_and_memory_is_counted_on_meta(monkeypatch):
    import dcae.tiling
    from dcae.diffusion.presets import check_fits_memory, check_model_config, count_parameters
    from dcae.errors import DCAEError

    for name in list_diffusion_presets():
        check_model_config(get_diffusion_config(name, in_channels=32, input_size=16))
    xl = get_diffusion_config("DiT-XL/1", in_channels=32, input_size=16)
    assert count_parameters(xl) == param_count("DiT-XL/1", in_channels=32, input_size=16)
    monkeypatch.setattr(dcae.tiling, "available_memory", lambda device: 2 ** 30)  # 1 GiB free
    check_fits_memory(get_diffusion_config("DiT-T/1", in_channels=32, input_size=16), torch.device("cpu"), 5, "x")
    with pytest.raises(DCAEError, match=r"x: the model has 6\d\d\.\dM parameters; 5 fp32 copies need 1[23]\.\d GiB "
                                        r"but cpu has 1\.0 GiB free"):
        check_fits_memory(xl, torch.device("cpu"), 5, "x")
