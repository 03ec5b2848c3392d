"""ONNX export: ONNX Runtime matches dcae within 1e-4 (fp32) at several sizes, on both attention paths, for every
topology; the two causes of the first export's O(1) error (frozen attention branch, dropped eps) stay fixed."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("onnx", reason="onnx is not installed (pip install 'dcae[export]')")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install 'dcae[export]')")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'dcae[export]')")

import dcae  # noqa: E402
from dcae.autoencoder import DCAEConfig, DecoderConfig, EncoderConfig  # noqa: E402
from dcae.errors import DCAEError  # noqa: E402
from dcae.export import (  # noqa: E402
    PARITY_TOLERANCE, _quiet_exporter, export_onnx, onnx_metadata, onnx_runner, tolerance_for,
)
from dcae.nn import LiteMLA, relu_linear_attention, relu_quadratic_attention  # noqa: E402


def tiny_sana() -> DCAEConfig:
    """Sana's topology (non-empty stage 0: plain conv stem and head; 5x5 multi-scale attention; RMSNorm + SiLU)
    at the tiny presets' widths: no tiny Sana preset exists."""
    widths = (24, 48, 96, 96, 192, 192)
    blocks = ("ResBlock",) * 3 + ("EViTS5_GLU",) * 3
    return DCAEConfig(name="tiny-sana", latent_channels=32,
                      encoder=EncoderConfig(width_list=widths, depth_list=(1,) * 6, block_type=blocks),
                      decoder=DecoderConfig(width_list=widths, depth_list=(1,) * 6, block_type=blocks,
                                            norm=("rms2d",) * 6, act=("silu",) * 6))


def build(name: str) -> dcae.DCAE:
    """The embedded default model for its topology (trained weights have the near-empty attention queries that
    random ones lack), otherwise the preset with seeded random weights."""
    if name == "dc-ae-tiny-f32c32":
        from dcae.weights import default_model_path

        return dcae.DCAE.from_pretrained(default_model_path()).eval()
    torch.manual_seed(0)
    model = dcae.DCAE(tiny_sana()) if name == "tiny-sana" else dcae.create_model(name)
    return perturb_batchnorm(model).eval()


def perturb_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Fresh BatchNorm statistics are 0/1, so a graph that ignored them would pass: give them trained-like values."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model


def max_diff(model: dcae.DCAE, part: str, path, x: torch.Tensor) -> tuple[float, float]:
    """(max abs difference ONNX Runtime vs dcae, its tolerance: 1e-4 per unit of output magnitude above 1)."""
    with torch.no_grad():
        reference = model.encode(x) if part == "encoder" else model.decode(x)
    return float((onnx_runner(path)(x) - reference).abs().max()), tolerance_for(reference)


# Latent sizes: 1x1 takes the N x N attention path in every attention stage, 8x5 (40 tokens) the linear path in
# every one, 2x3 both (6 tokens at the latent, 96 two stages up); 2x3 and 8x5 are not square.
LATENT_SIZES = [(1, 1), (2, 3), (8, 5)]
# tiny-f64c128 repeats tiny-f32c32's blocks one stage deeper: under -m slow, to keep the default suite's exports
# (about 20 s each on two free cores, most of it torch.export's symbolic shapes) to the distinct topologies.
TOPOLOGIES = ["dc-ae-tiny-f32c32", "dc-ae-tiny-f8c4", "dc-ae-tiny-f32c32-conv-shortcut", "tiny-sana",
              pytest.param("dc-ae-tiny-f64c128", marks=pytest.mark.slow)]


@pytest.fixture(scope="module", params=TOPOLOGIES)
def exported(request, tmp_path_factory):
    """One dynamic-size export of both parts per topology, from a 2x3 latent example, shared by the tests below."""
    model = build(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    factor = model.spatial_factor
    written = export_onnx(model, directory, image_size=(2 * factor, 3 * factor), dynamic_size=True)
    return model, {item.part: item for item in written}


@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_onnx_matches_dcae_at_every_size(exported, part):
    model, written = exported
    assert written[part].max_abs_diff <= written[part].tolerance
    factor, generator = model.spatial_factor, torch.Generator().manual_seed(1)
    for batch, (h, w) in zip((1, 3, 1), LATENT_SIZES):
        if part == "encoder":
            x = torch.rand(batch, 3, h * factor, w * factor, generator=generator) * 2 - 1
        else:
            x = torch.randn(batch, model.latent_channels, h, w, generator=generator)
        diff, tolerance = max_diff(model, part, written[part].path, x)
        assert diff <= tolerance, f"{model.config.name} {part} at latent {h}x{w}: max abs diff {diff:.3g}"


def test_metadata_rebuilds_the_config(exported):
    model, written = exported
    meta = onnx_metadata(written["decoder"].path)
    assert meta["part"] == "decoder" and int(meta["spatial_factor"]) == model.spatial_factor
    assert DCAEConfig.from_dict(__import__("json").loads(meta["config"])) == model.config


# --- the two causes of the first export's error ------------------------------------------------------------------
def test_attention_paths_are_one_function():
    """Exports always take the linear path; that is only right if it equals the N x N path where dcae takes that."""
    qkv = torch.randn(2, 3 * 64, 4, 8)  # 32 tokens: the quadratic path's largest size
    torch.testing.assert_close(relu_linear_attention(qkv, 32), relu_quadratic_attention(qkv, 32),
                               rtol=1e-5, atol=1e-5)


def export_module(module: torch.nn.Module, x: torch.Tensor, path) -> None:
    dims = {2: torch.export.Dim("h", min=1, max=256), 3: torch.export.Dim("w", min=1, max=256)}
    with _quiet_exporter():
        torch.onnx.export(module, (x,), path, dynamo=True, optimize=False, input_names=["x"], dynamic_shapes=(dims,))


def test_attention_exported_small_runs_linear_at_any_size(tmp_path):
    """An export from a 2x2 map (the N x N path in eager mode) must hold the linear path: the ones row padded onto
    v (a Pad node) is its signature. A frozen N x N path would cost O(N^2) memory on a large image."""
    onnx = pytest.importorskip("onnx")
    layer = LiteMLA(64).eval()
    export_module(layer, torch.randn(1, 64, 2, 2), tmp_path / "attn.onnx")
    ops = [node.op_type for node in onnx.load(str(tmp_path / "attn.onnx")).graph.node]
    assert "Pad" in ops, "the exported LiteMLA froze the N x N attention path"
    run = onnx_runner(tmp_path / "attn.onnx")
    for h, w in ((2, 2), (1, 5), (16, 12)):
        x = torch.randn(1, 64, h, w)
        with torch.no_grad():
            assert float((run(x) - layer(x)).abs().max()) <= PARITY_TOLERANCE


def near_empty_query_qkv() -> torch.Tensor:
    """qkv in which one query's ReLU features barely meet the keys: the attention's sum is ~1e-20, below its eps."""
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(1, 96, 4, 4, generator=generator)
    q, k = qkv[:, :32], qkv[:, 32:64]
    k.abs_()  # every key positive in every feature
    q[:, :, 0, 0] = -1.0  # token 0's query: zero after ReLU ...
    q[:, 0, 0, 0] = 1e-20  # ... but for one tiny feature
    return qkv


class _Attention(torch.nn.Module):
    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        return relu_linear_attention(qkv, 32)


def test_attention_eps_survives_export(tmp_path):
    """With the eps dropped (onnxscript's optimizer folds `x + 1e-15` to `x`), token 0 gets the mean of v instead of
    ~0: an O(1) error. dcae exports unoptimized; this fails if the exporter's settings let the optimizer back in."""
    qkv = near_empty_query_qkv()
    reference = _Attention()(qkv)
    assert float(reference[:, :, 0, 0].abs().max()) < 1e-3  # what the eps does: the near-empty query gives ~0
    model = build("dc-ae-tiny-f8c4")
    original = torch.onnx.export
    seen = {}

    def spy(*args, **kwargs):  # export_onnx's exporter settings, applied to the attention alone
        seen.update(kwargs)
        return original(*args, **kwargs)

    torch.onnx.export = spy
    try:
        export_onnx(model, tmp_path / "ae", parts=("decoder",), image_size=(8, 8), check=False)
    finally:
        torch.onnx.export = original
    settings = {k: seen[k] for k in ("dynamo", "optimize", "opset_version")}
    with _quiet_exporter():
        torch.onnx.export(_Attention(), (qkv,), tmp_path / "attn.onnx", input_names=["x"], **settings)
    diff = float((onnx_runner(tmp_path / "attn.onnx")(qkv) - reference).abs().max())
    assert diff <= PARITY_TOLERANCE, f"the attention's eps was lost in export: max abs diff {diff:.3g}"


# --- static size, channels, command line --------------------------------------------------------------------------
def test_static_export_takes_only_its_size(tmp_path):
    model = build("dc-ae-tiny-f8c4")
    [decoder] = export_onnx(model, tmp_path, parts=("decoder",), image_size=(16, 24))
    assert decoder.max_abs_diff <= decoder.tolerance and decoder.input_shape == (2, 4, 2, 3)
    run = onnx_runner(decoder.path)
    assert run(torch.randn(5, 4, 2, 3)).shape == (5, 3, 16, 24)  # the batch stays free
    with pytest.raises(Exception, match="(?i)dimension"):
        run(torch.randn(1, 4, 3, 3))


def test_export_leaves_the_callers_model_as_it_was(tmp_path):
    model = build("dc-ae-tiny-f8c4").to(torch.bfloat16).train()
    [decoder] = export_onnx(model, tmp_path, parts=("decoder",), image_size=(8, 8))
    assert model.training and next(model.parameters()).dtype == torch.bfloat16
    assert decoder.max_abs_diff <= decoder.tolerance  # against the fp32 copy it exported


def test_channels_refused_by_a_full_latent_decoder(tmp_path):
    model = build("dc-ae-tiny-f8c4")
    with pytest.raises(DCAEError, match="does not take 2 latent channels"):
        export_onnx(model, tmp_path, parts=("decoder",), image_size=(8, 8), channels=2)
    with pytest.raises(DCAEError, match="--channels 9"):
        export_onnx(model, tmp_path, parts=("decoder",), image_size=(8, 8), channels=9)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("channels", [16, 64, 128])
def test_structured_latent_decoder_exports_for_each_channel_count(tmp_path, channels):
    """A DC-AE 1.5 decoder exported for its first k channels: ONNX Runtime matches dcae's decode of k channels."""
    model = build("dc-ae-tiny-f32c128-1.5")
    [decoder] = export_onnx(model, tmp_path, parts=("decoder",), image_size=(64, 96), channels=channels)
    assert decoder.input_shape[1] == channels and decoder.max_abs_diff <= decoder.tolerance
    z = torch.randn(1, channels, 2, 3, generator=torch.Generator().manual_seed(channels))
    with torch.no_grad():
        expected = model.eval().decode(z)
    assert float((onnx_runner(decoder.path)(z) - expected).abs().max()) <= PARITY_TOLERANCE


def dcae_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dcae.cli", *args], capture_output=True, text=True, timeout=600)


def test_cli_export_decoder(tmp_path):
    result = dcae_cli("export", "dc-ae-tiny-f8c4", "--part", "decoder", "--size", "16x24", "-o", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "max abs diff" in result.stdout and (tmp_path / "decoder.onnx").is_file()
    assert not (tmp_path / "encoder.onnx").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["decoder.onnx"]  # no temporary left behind


@pytest.mark.parametrize("args, message", [
    (["--size", "20"], "--size 20x20: expected positive multiples of the model's spatial factor 8"),
    (["--size", "big"], "--size 'big': expected H or HxW"),
    (["--part", "encoder", "--channels", "2"], "--channels applies to the decoder"),
])
def test_cli_export_bad_input_is_one_line(tmp_path, args, message):
    result = dcae_cli("export", "dc-ae-tiny-f8c4", *args, "-o", str(tmp_path / "out"))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0], result.stderr


# --- the published models ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["dc-ae-f32c32-in-1.0", "dc-ae-f64c128-in-1.0", "dc-ae-f128c512-in-1.0",
                                  "dc-ae-f32c32-sana-1.0"])
def test_published_presets_match_onnx(tmp_path, name):
    torch.manual_seed(0)
    model = perturb_batchnorm(dcae.create_model(name)).eval()
    factor = model.spatial_factor
    written = export_onnx(model, tmp_path, image_size=(2 * factor, 3 * factor), dynamic_size=True)
    generator = torch.Generator().manual_seed(1)
    for item in written:
        for h, w in LATENT_SIZES:
            x = (torch.rand(1, 3, h * factor, w * factor, generator=generator) * 2 - 1 if item.part == "encoder"
                 else torch.randn(1, model.latent_channels, h, w, generator=generator))
            diff, tolerance = max_diff(model, item.part, item.path, x)
            assert diff <= tolerance, f"{name} {item.part} at latent {h}x{w}: max abs diff {diff:.3g}"

