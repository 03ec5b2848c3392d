"""Checkpoint layouts: round trips, key maps, strictness, and hostile or broken files."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import dcae
from dcae.autoencoder import DCAE
from dcae.cli import main
from dcae.errors import DCAEError
from dcae.weights import diffusers_keys, efficientvit_key, read_safetensors, to_diffusers


def tiny(name: str = "dc-ae-tiny-f32c32") -> DCAE:
    model = dcae.create_model(name).eval()
    with torch.no_grad():  # non-trivial norm statistics so that a dropped buffer would show
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


def assert_same_state(a: DCAE, b: DCAE) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("fmt", ["dcae", "efficientvit", "diffusers"])
@pytest.mark.parametrize("name", ["dc-ae-tiny-f32c32", "dc-ae-tiny-f64c128"])
def test_roundtrip_every_format(tmp_path, fmt, name):
    model = tiny(name)
    model.save_pretrained(tmp_path, format=fmt)
    loaded = DCAE.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert_same_state(model, loaded)


def test_single_file_carries_its_config(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    assert DCAE.from_pretrained(tmp_path / "model.safetensors").config == model.config


@pytest.mark.parametrize("name", [n for n in dcae.list_presets() if not n.endswith("-conv-shortcut")])
def test_key_maps_are_one_to_one(name):
    with torch.device("meta"):
        model = dcae.create_model(name)
    keys = list(model.state_dict())
    evit = [efficientvit_key(k, model.config) for k in keys]
    assert len(set(evit)) == len(keys)
    diff = [d for k in keys for d in diffusers_keys(k)]
    assert len(set(diff)) == len(diff)


def test_efficientvit_names_match_reference_layout():
    with torch.device("meta"):
        model = dcae.create_model("dc-ae-f32c32-in-1.0")
    evit = {efficientvit_key(k, model.config) for k in model.state_dict()}
    # Spot checks against names in mit-han-lab/dc-ae-f32c32-in-1.0/model.safetensors.
    for key in [
        "encoder.project_in.conv.conv.weight",
        "encoder.stages.1.op_list.0.main.conv1.conv.weight",
        "encoder.stages.1.op_list.4.main.conv.conv.bias",
        "encoder.stages.3.op_list.0.context_module.main.qkv.conv.weight",
        "encoder.stages.3.op_list.0.context_module.main.proj.norm.weight",
        "encoder.stages.3.op_list.0.local_module.main.point_conv.norm.bias",
        "encoder.project_out.main.op_list.0.conv.weight",
        "decoder.project_in.main.conv.weight",
        "decoder.stages.1.op_list.0.main.conv.conv.weight",
        "decoder.stages.2.op_list.1.main.conv2.norm.running_var",
        "decoder.project_out.op_list.0.weight",
        "decoder.project_out.op_list.2.conv.conv.weight",
    ]:
        assert key in evit, key


def test_efficientvit_checkpoint_without_config_is_recognised(tmp_path):
    model = tiny()
    from dcae.weights import to_efficientvit

    save_file({k: v.contiguous() for k, v in to_efficientvit(model.state_dict(), model.config).items()},
              str(tmp_path / "model.safetensors"))  # no metadata, no config.json: as the original release
    loaded = DCAE.from_pretrained(tmp_path)
    assert loaded.config.name == "dc-ae-tiny-f32c32"
    assert_same_state(model, loaded)


def test_efficientvit_pickle_release_needs_allow_pickle(tmp_path):
    model = tiny()
    from dcae.weights import to_efficientvit

    path = tmp_path / "model.pt"
    torch.save({"state_dict": to_efficientvit(model.state_dict(), model.config)}, path)
    with pytest.raises(DCAEError, match="pickle checkpoints are not loaded by default"):
        DCAE.from_pretrained(path)
    assert_same_state(model, DCAE.from_pretrained(path, allow_pickle=True))


def test_hostile_pickle_is_refused_even_with_allow_pickle(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (exec, ("open('pwned', 'w').write('x')",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(DCAEError, match="refused or unreadable"):
        DCAE.from_pretrained(path, allow_pickle=True)
    assert not (tmp_path / "pwned").exists()


def test_truncated_file(tmp_path):
    tiny().save_pretrained(tmp_path)
    blob = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DCAEError, match="not a readable safetensors file"):
        DCAE.from_pretrained(tmp_path)


def test_garbage_and_empty_files(tmp_path):
    for content in (b"", b"hello world, not a checkpoint", b"\xff" * 64):
        path = tmp_path / "model.safetensors"
        path.write_bytes(content)
        with pytest.raises(DCAEError, match=str(path)):
            DCAE.from_pretrained(path)


def test_missing_unexpected_and_misshaped_keys(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path)
    state, metadata = read_safetensors(tmp_path / "model.safetensors")
    path = tmp_path / "broken.safetensors"

    dropped = dict(state)
    dropped.pop("decoder.project_in.conv.weight")
    save_file(dropped, str(path), metadata=metadata)
    with pytest.raises(DCAEError, match="1 missing key.*decoder.project_in.conv.weight"):
        DCAE.from_pretrained(path)

    extra = dict(state, **{"encoder.extra.weight": torch.zeros(1)})
    save_file(extra, str(path), metadata=metadata)
    with pytest.raises(DCAEError, match="unexpected key.*encoder.extra.weight"):
        DCAE.from_pretrained(path)

    misshaped = dict(state, **{"encoder.project_out.conv.bias": torch.zeros(7)})
    save_file(misshaped, str(path), metadata=metadata)
    with pytest.raises(DCAEError, match="wrong shape.*encoder.project_out.conv.bias"):
        DCAE.from_pretrained(path)


def test_config_metadata_with_bad_json(tmp_path):
    tiny().save_pretrained(tmp_path)
    state, metadata = read_safetensors(tmp_path / "model.safetensors")
    save_file(state, str(tmp_path / "x.safetensors"), metadata=dict(metadata, dcae_config="{not json"))
    with pytest.raises(DCAEError, match="invalid dcae config"):
        DCAE.from_pretrained(tmp_path / "x.safetensors")


def test_offline_hub_id_gives_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DCAEError) as info:
        DCAE.from_pretrained("mit-han-lab/dc-ae-f32c32-in-1.0")
    message = str(info.value)
    assert "mit-han-lab/dc-ae-f32c32-in-1.0" in message and "local directory" in message and "\n" not in message


def test_missing_path():
    with pytest.raises(DCAEError, match="no such file"):
        DCAE.from_pretrained("/nonexistent/dir/model.safetensors")


def test_diffusers_rejects_ablation_twins(tmp_path):
    with pytest.raises(DCAEError, match="cannot be written in the diffusers layout"):
        dcae.create_model("dc-ae-tiny-f32c32-plain").save_pretrained(tmp_path, format="diffusers")


def test_qkv_split_layout():
    model = tiny()
    state = model.state_dict()
    key = next(k for k in state if k.endswith("attn.qkv.weight"))
    out = to_diffusers({key: state[key]})
    q, k, v = (out[n] for n in diffusers_keys(key))
    assert torch.equal(torch.cat([q, k, v]), state[key].flatten(1))


def test_convert_cli_roundtrip(tmp_path, capsys):
    model = tiny()
    model.save_pretrained(tmp_path / "src")
    for fmt in ("diffusers", "efficientvit", "dcae"):
        assert main(["convert", str(tmp_path / "src"), str(tmp_path / fmt), "--to", fmt]) == 0
        assert_same_state(model, DCAE.from_pretrained(tmp_path / fmt))
    assert json.loads((tmp_path / "diffusers" / "config.json").read_text())["_class_name"] == "AutoencoderDC"


def test_convert_cli_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    assert main(["convert", str(tmp_path / "bad.safetensors"), str(tmp_path / "out"), "--to", "dcae"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dcae convert: error:") and "bad.safetensors" in err and "\n" not in err


def test_fp16_storage_keeps_batchnorm_statistics_fp32(tmp_path):
    model = tiny()
    with torch.no_grad():
        bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        bn.running_var.fill_(1e9)  # deep ResBlock stacks reach this; fp16 tops out at 65504
    from dcae.weights import save_pretrained

    save_pretrained(model, tmp_path, dtype=torch.float16)
    state, _ = read_safetensors(tmp_path / "model.safetensors")
    assert state["encoder.project_out.conv.weight"].dtype == torch.float16
    loaded = DCAE.from_pretrained(tmp_path)
    assert all(torch.isfinite(v).all() for v in loaded.state_dict().values() if v.is_floating_point())
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask, "permissions follow the umask"


def test_configless_efficientvit_file_is_recognised_and_a_partial_one_named(tmp_path):
    """A file as the authors publish them (efficientvit keys, no metadata, no config.json) is recognised from its keys
    and shapes; a partial one gets one line naming the nearest preset and what differs."""
    from dcae.weights import to_efficientvit

    model = tiny()
    state = {k: v.contiguous() for k, v in to_efficientvit(model.state_dict(), model.config).items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded = DCAE.from_pretrained(tmp_path / "model.safetensors")
    assert loaded.config.name == "dc-ae-tiny-f32c32"
    assert_same_state(model, loaded)
    state.pop(next(k for k in state if k.startswith("decoder.project_in")))
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(DCAEError, match="nearest is dc-ae-tiny-f32c32 \\(1 missing, e.g. decoder.project_in") as info:
        DCAE.from_pretrained(tmp_path / "model.safetensors")
    assert "\n" not in str(info.value)


def test_published_name_hint_picks_among_shared_topologies():
    from dcae.presets import name_hint

    assert name_hint("mit-han-lab/dc-ae-f32c32-mix-1.0-diffusers") == "dc-ae-f32c32-mix-1.0"
    assert name_hint("/models/dc-ae-f32c32-sana-1.1/model.safetensors") == "dc-ae-f32c32-sana-1.1"
    assert name_hint("dc-ai/dc-ae-lite-f32c32-diffusers") == "dc-ae-lite-f32c32-sana-1.1"
    assert name_hint("/models/my-autoencoder") is None


def test_unmeasured_scaling_factor_is_explicit_in_the_diffusers_export(tmp_path):
    with pytest.warns(UserWarning, match="dcae scaling-factor"):
        tiny().save_pretrained(tmp_path, format="diffusers")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["scaling_factor"] == 1.0 and config["_dcae_unmeasured_scaling_factor"] is True
    assert DCAE.from_pretrained(tmp_path).config.scaling_factor is None
    measured = dcae.create_model("dc-ae-tiny-f32c32", scaling_factor=0.25)
    measured.save_pretrained(tmp_path / "m", format="diffusers")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["scaling_factor"] == 0.25 and "_dcae_unmeasured_scaling_factor" not in config


def test_scaling_factor_command_is_one_over_rms(tmp_path, capsys, data_dir):
    from dcae.data import center_crop, load_image_file
    from dcae.images import find_images, to_model_range

    torch.manual_seed(0)
    model = tiny()
    model.save_pretrained(tmp_path / "m")
    assert main(["scaling-factor", "--model", str(tmp_path / "m"), "--data", str(data_dir / "kodak24"),
                 "--limit", "2", "--resolution", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    files = [p for p, _ in find_images([data_dir / "kodak24"])][:2]
    with torch.no_grad():
        z = model.encode(to_model_range(torch.stack([center_crop(load_image_file(p), 64) for p in files])))
    assert result["images"] == 2 and result["latent_values"] == z.numel()
    assert result["scaling_factor"] == pytest.approx(1 / z.double().square().mean().sqrt().item(), rel=1e-5)
    assert result["inverse_std"] == pytest.approx(1 / z.double().std(unbiased=False).item(), rel=1e-5)


def test_channels_option_on_structured_and_plain_models(tmp_path, capsys, data_dir):
    image = str(sorted((data_dir / "kodak24").glob("*.png"))[0])
    assert main(["encode", image, "-o", str(tmp_path / "z"), "--model", "dc-ae-tiny-f32c128-1.5",
                 "--channels", "16"]) == 0
    latent, _ = read_safetensors(next((tmp_path / "z").iterdir()))
    assert latent["latent"].shape[0] == 16
    assert main(["reconstruct", image, "-o", str(tmp_path / "r"), "--model", "dc-ae-tiny-f32c128-1.5",
                 "--channels", "16"]) == 0
    assert "f32c16" in capsys.readouterr().out
    # the 16-channel latent file decodes (the decoder's first 16 input channels) to what reconstruct --channels 16 gave
    for command, out in (("encode", "z32"), ("reconstruct", "r32")):
        assert main([command, image, "-o", str(tmp_path / out), "--model", "dc-ae-tiny-f32c128-1.5", "--channels",
                     "16", "--dtype", "fp32"]) == 0
    assert main(["decode", str(tmp_path / "z32"), "-o", str(tmp_path / "d"), "--model", "dc-ae-tiny-f32c128-1.5",
                 "--dtype", "fp32"]) == 0
    decoded = np.asarray(Image.open(next((tmp_path / "d").iterdir())), dtype=int)
    reconstructed = np.asarray(Image.open(next((tmp_path / "r32").iterdir())), dtype=int)
    assert decoded.shape == reconstructed.shape and np.abs(decoded - reconstructed).max() <= 1
    assert main(["reconstruct", image, "-o", str(tmp_path / "r2"), "--model", "dc-ae-tiny-f32c32",
                 "--channels", "8"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the random-weights warning
    assert error.startswith("dcae reconstruct: error:") and "no structured latent" in error


@pytest.mark.parametrize("format", ["dcae", "diffusers", "efficientvit"])
def test_save_pretrained_writes_a_model_card(tmp_path, format):
    """README.md carries the hub metadata (library, tags) and the facts a user needs, all read from the config."""
    model = dcae.create_model("dc-ae-tiny-f32c32")
    model.config.scaling_factor = 0.25
    card = (model.save_pretrained(tmp_path / "m", format=format) / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert f"library_name: {'diffusers' if format == 'diffusers' else 'dcae'}" in front and "- f32c32" in front
    assert "# dc-ae-tiny-f32c32" in body and "`0.25`" in body and f"`{format}` layout" in body
    assert "6.5M parameters" in body
    model.config.scaling_factor, model.config.name = None, "evil\n---\nlibrary_name: x"
    card = (model.save_pretrained(tmp_path / "n", format="dcae") / "README.md").read_text()
    assert "dcae scaling-factor --model" in card and card.count("\n---\n") == 1 and "library_name: x" not in card.split(
        "---\n")[1]
