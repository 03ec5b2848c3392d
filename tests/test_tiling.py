"""dcae.tiling (padding, tile plans and layout, blending, tiled vs untiled encode/decode) and dcae.latent_file."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import dcae
from dcae.errors import DCAEError
from dcae.latent_file import autoencoder_config_hash as config_hash
from dcae.latent_file import latent_metadata, read_latent, write_latent
from dcae.runtime import bf16_is_native, cpu_isa
from dcae.tiling import (OVERHEAD_BYTES, MemoryBudget, activation_bytes_per_pixel, available_memory, decode_latent,
                         default_tile, encode_image, memory_budget, pad_to_multiple, padding_for, plan_tiles,
                         resolve_tile, tile_spans, tiled_decode, tiled_encode)


pytestmark = pytest.mark.usefixtures("one_thread")


class LocalAutoencoder(nn.Module):
    """Each latent pixel depends only on its own f x f block and vice versa, so tiling must be exact."""

    def __init__(self, factor: int = 8, channels: int = 4):
        super().__init__()
        self.spatial_factor, self.latent_channels = factor, channels
        self.down = nn.Conv2d(3 * factor * factor, channels, 1)
        self.up = nn.Conv2d(channels, 3 * factor * factor, 1)
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(("encode", tuple(x.shape)))
        return self.down(F.pixel_unshuffle(x, self.spatial_factor))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self.calls.append(("decode", tuple(z.shape)))
        return F.pixel_shuffle(self.up(z), self.spatial_factor)

    def config_dict(self) -> dict:
        return {"name": "local", "factor": self.spatial_factor, "channels": self.latent_channels}


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return dcae.create_model("dc-ae-tiny-f32c32").eval()


# --- padding and layout -----------------------------------------------------------------------------------------------
def test_padding_reflects_and_falls_back_to_replicate():
    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).reshape(2, 3, 5, 7)
    padded, pad = pad_to_multiple(x, 4)
    assert pad == (3, 1) == padding_for(5, 7, 4) and padded.shape == (2, 3, 8, 8)
    assert torch.equal(padded[..., :5, :7], x)
    assert torch.equal(padded[..., 5, :7], x[..., 3, :])  # reflection mirrors around the last row
    one = torch.rand(1, 3, 1, 1)
    padded, pad = pad_to_multiple(one, 32)
    assert pad == (31, 31) and padded.shape == (1, 3, 32, 32) and torch.equal(padded, one.expand(1, 3, 32, 32))
    assert pad_to_multiple(x[..., :4, :4], 4)[0] is not None and pad_to_multiple(x[..., :4, :4], 4)[1] == (0, 0)


@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 300), tile=st.integers(1, 40), overlap=st.integers(0, 39))
def test_tile_spans_cover_with_overlap(length, tile, overlap):
    overlap = min(overlap, tile - 1)
    spans = tile_spans(length, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][0] + spans[-1][1] == length
    for (start, size), (next_start, _) in zip(spans, spans[1:]):
        assert size == tile and start < next_start <= start + size - overlap  # overlap at least as asked
    assert all(size <= tile for _, size in spans)


def test_resolve_tile():
    assert resolve_tile("none", 4096, 4096, 32) is None and resolve_tile(None, 9000, 9000, 32) is None
    assert resolve_tile("auto", 1024, 1024, 32) is None  # small images run whole
    assert resolve_tile("auto", 1056, 1024, 32) == default_tile(32) == (512, 64)
    assert resolve_tile("256", 1024, 64, 32) == (256, 32) and resolve_tile(256, 1024, 64, 32, overlap=0) == (256, 0)
    assert resolve_tile(64, 1024, 64, 32) == (64, 0)  # an eighth of 64 px is less than one latent pixel
    assert resolve_tile(512, 512, 512, 32) is None  # one tile covers the image
    assert default_tile(64) == (512, 64) and default_tile(128) == (1024, 128) and default_tile(8) == (512, 64)
    with pytest.raises(DCAEError, match="multiple of the spatial factor 32"):
        resolve_tile(500, 2048, 2048, 32)
    with pytest.raises(DCAEError, match="overlap 256"):
        resolve_tile(256, 2048, 2048, 32, overlap=256)
    with pytest.raises(DCAEError, match="expected auto, none"):
        resolve_tile("big", 2048, 2048, 32)


def test_plan_is_decided_once_and_drives_encode_and_decode(monkeypatch):
    plan = plan_tiles("auto", 1030, 20, 32)
    assert plan.size == (1030, 20) and plan.padded == (1056, 32) and not plan.tiled
    assert plan_tiles(64, 100, 130, 32).tiles == (64, 0) and plan_tiles(64, 100, 130, 32).padded == (128, 160)
    model = LocalAutoencoder(factor=4)
    x = torch.rand(1, 3, 10, 13) * 2 - 1
    tiled = plan_tiles(8, 10, 13, 4, overlap=4)

    def refuse(*args, **kwargs):
        raise AssertionError("a planned image must not be planned again")

    monkeypatch.setattr("dcae.tiling.resolve_tile", refuse)
    z = encode_image(model, x, plan=tiled)
    y = decode_latent(model, z, plan=tiled)  # cropped to the plan's size
    assert z.shape == (1, 4, 3, 4) and y.shape == (1, 3, 10, 13)


def budget_for(pixels: int, bytes_per_pixel: float = 1000.0) -> MemoryBudget:
    """A budget that fits exactly `pixels` image pixels in one pass."""
    return MemoryBudget(OVERHEAD_BYTES + int(pixels * bytes_per_pixel), bytes_per_pixel)


def test_memory_budget_shrinks_auto_tiles_and_refuses_what_does_not_fit():
    roomy = budget_for(10_000_000)
    assert resolve_tile("auto", 1024, 1024, 32, budget=roomy) is None
    assert resolve_tile("auto", 1056, 1024, 32, budget=roomy) == (512, 64)  # the budget changes nothing when it fits
    assert resolve_tile("auto", 512, 512, 32, budget=budget_for(300 * 300)) == (256, 32)  # 512^2 > budget >= 256^2
    assert resolve_tile("auto", 4096, 4096, 32, budget=budget_for(200 * 200)) == (128, 32)
    assert resolve_tile("auto", 200, 200, 32, budget=budget_for(200 * 200)) is None  # the whole image fits
    assert resolve_tile("auto", 4096, 4096, 64, budget=budget_for(300 * 300)) == (256, 64)  # 4 latent pixels a side
    with pytest.raises(DCAEError, match=r"even a 128x128 tile needs ~.* GB \(estimated\), over the memory budget"):
        resolve_tile("auto", 4096, 4096, 32, budget=budget_for(100 * 100))
    with pytest.raises(DCAEError, match=r"an untiled pass over 2048x1024 needs ~2\.4 GB .*use --tile auto"):
        resolve_tile("none", 1024, 2048, 32, budget=budget_for(1_000_000))
    with pytest.raises(DCAEError, match=r"a 1024x1024 tile needs"):
        resolve_tile(1024, 4096, 4096, 32, budget=budget_for(1_000_000))
    assert resolve_tile(512, 4096, 4096, 32, budget=budget_for(1_000_000)) == (512, 64)
    assert budget_for(0).max_pixels == 0 and MemoryBudget(1, 10.0).max_pixels == 0


def test_memory_budget_from_the_device(tiny):
    budget = memory_budget(tiny, torch.device("cpu"), max_memory_gb=2.0, ops=("decode",), batch_size=4)
    assert budget.bytes == 500_000_000 and budget.bytes_per_pixel == activation_bytes_per_pixel(tiny, ("decode",))
    assert activation_bytes_per_pixel(tiny, ("encode",)) < activation_bytes_per_pixel(tiny, ("encode", "decode"))
    auto = memory_budget(tiny, torch.device("cpu"))
    assert 0 < auto.bytes <= available_memory(torch.device("cpu"))
    with torch.device("meta"):
        full = dcae.create_model("dc-ae-f32c32-in-1.0")  # 128 channels at full resolution, 4.5 live tensors
    assert activation_bytes_per_pixel(full, ("decode",)) == 128 * 4 * 4.5 + 64


PEAK_PROBE = """
import sys, torch, dcae
from dcae.bench import exact_cpu_memory, peak_memory
torch.set_num_threads(1)
preset, op, size, precision = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
model = dcae.create_model(preset).eval()
f, c = model.spatial_factor, model.latent_channels
x = torch.randn(1, 3, size, size) if op == "encode" else torch.randn(1, c, size // f, size // f)
assert exact_cpu_memory()  # RSS follows live tensors; VmHWM reset right before the call
with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
    print(peak_memory(lambda: getattr(model, op)(x), torch.device("cpu")))
"""


@pytest.mark.parametrize("preset,op,size,precision", [("dc-ae-tiny-f32c32", "decode", 1024, "fp32"),
                                                      ("dc-ae-tiny-f32c32", "encode", 1024, "fp32"),
                                                      ("dc-ae-tiny-f64c128", "decode", 1024, "bf16")])
def test_memory_estimate_bounds_the_measured_peak(preset, op, size, precision):
    """The estimate is an upper bound of the peak RSS growth of one pass, and not a wildly loose one."""
    if precision == "bf16" and not bf16_is_native("cpu"):
        # A 1024 px bf16 pass under the exact-memory allocator takes many minutes where bf16 is emulated, and a
        # smaller one is dominated by the fixed overhead term, so the bound says nothing there.
        pytest.skip(f"hardware: bf16 is emulated on this CPU ({cpu_isa()}); the bf16 memory bound needs native bf16")
    result = subprocess.run([sys.executable, "-c", PEAK_PROBE, preset, op, str(size), precision],
                            capture_output=True, text=True, timeout=300, check=True)
    measured = int(result.stdout.strip().splitlines()[-1])
    with torch.device("meta"):
        model = dcae.create_model(preset)
    estimate = OVERHEAD_BYTES + size * size * activation_bytes_per_pixel(model, (op,))
    assert 0 < measured <= estimate <= 4 * measured, (measured, estimate)


# --- tiled encode/decode ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlap", [0, 16, 24])
def test_tiling_is_exact_for_a_local_model(overlap):
    torch.manual_seed(0)
    model = LocalAutoencoder()
    x = torch.rand(2, 3, 104, 168) * 2 - 1  # 13 x 21 latent pixels: uneven tile counts
    with torch.no_grad():
        z = model.encode(x)
        z_tiled = tiled_encode(model, x, tile=48, overlap=overlap)
        y_tiled = tiled_decode(model, z, tile=48, overlap=overlap)
        y = model.decode(z)
    assert z_tiled.dtype == torch.float32 and torch.allclose(z_tiled, z, atol=1e-5)
    assert torch.allclose(y_tiled, y, atol=1e-5)  # the blend weights sum to one everywhere


def test_tiles_are_bounded_and_aligned():
    model = LocalAutoencoder(factor=8)
    x = torch.rand(1, 3, 200, 136)
    with torch.no_grad():
        z = encode_image(model, x, tile=64, overlap=16)
        y = decode_latent(model, z, size=(200, 136), tile=64, overlap=16)
    assert z.shape == (1, 4, 25, 17) and y.shape == (1, 3, 200, 136)
    encode_shapes = [s for kind, s in model.calls if kind == "encode"]
    decode_shapes = [s for kind, s in model.calls if kind == "decode"]
    assert max(s[-1] for s in encode_shapes) == 64 and all(s[-1] % 8 == 0 and s[-2] % 8 == 0 for s in encode_shapes)
    assert max(s[-1] for s in decode_shapes) == 8 and len(decode_shapes) == len(encode_shapes) == 4 * 3


def test_any_size_round_trip_shapes(tiny):
    for height, width in [(1, 1), (33, 7), (5, 300)]:
        x = torch.rand(1, 3, height, width) * 2 - 1
        with torch.inference_mode():
            z = encode_image(tiny, x)
            y = decode_latent(tiny, z, size=(height, width))
        assert z.shape == (1, 32, math.ceil(height / 32), math.ceil(width / 32))
        assert y.shape == (1, 3, height, width) and torch.isfinite(y).all()


def test_tiled_real_model_close_to_untiled_and_exact_when_one_tile(tiny):
    torch.manual_seed(1)
    z, unrelated = torch.randn(2, 1, 32, 6, 9)  # latents of 192 x 288 images
    with torch.inference_mode():
        whole = decode_latent(tiny, z, tile="none").clamp(-1, 1)
        assert torch.equal(decode_latent(tiny, z, tile=288).clamp(-1, 1), whole)  # one tile covering all = untiled
        tiled = decode_latent(tiny, z, tile=128, overlap=64).clamp(-1, 1)
        other = decode_latent(tiny, unrelated, tile="none").clamp(-1, 1)
    tiled_error = (tiled - whole).pow(2).mean()
    assert tiled.shape == whole.shape and tiled_error > 0  # attention sees only the tile, so outputs differ...
    assert tiled_error < 0.5 * (other - whole).pow(2).mean()  # ...but far less than another latent's decode


def test_config_hash_tells_models_apart(tiny):
    assert config_hash(tiny) == config_hash(dcae.create_model("dc-ae-tiny-f32c32"))
    assert config_hash(tiny) != config_hash(dcae.create_model("dc-ae-tiny-f32c32-plain"))
    assert len(config_hash(tiny)) == 64


# --- latent files -----------------------------------------------------------------------------------------------------
def test_latent_file_round_trip(tmp_path):
    model = LocalAutoencoder(factor=8, channels=4)
    z = torch.randn(4, 3, 5)
    alpha = torch.randint(0, 256, (1, 20, 37), dtype=torch.uint8)
    metadata = latent_metadata(model, "local", (20, 37), torch.bfloat16, source="a.png")
    write_latent(tmp_path / "a.safetensors", z.to(torch.bfloat16), metadata, alpha)
    latent, size, alpha_back, meta = read_latent(tmp_path / "a.safetensors", model)
    assert latent.shape == (1, 4, 3, 5) and latent.dtype == torch.float32 and size == (20, 37)
    assert torch.equal(latent[0], z.to(torch.bfloat16).float()) and torch.equal(alpha_back, alpha)
    assert json.loads(meta["padding"]) == [0, 4, 0, 3] and meta["dtype"] == "bfloat16"
    assert meta["config_hash"] == config_hash(model) and meta["scaling_factor"] == "none"
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def bad_latents(model: nn.Module) -> dict[str, tuple[dict, dict | None, str]]:
    """name -> (tensors, metadata, phrase the error must contain)."""
    good_meta = latent_metadata(model, "local", (16, 16), torch.float32)
    other = dict(good_meta, config_hash="0" * 64, config_name="other")
    z = torch.zeros(4, 2, 2)
    return {
        "ndim.safetensors": ({"latent": torch.zeros(4, 2)}, None, "shape (4, 2)"),
        "batch2.safetensors": ({"latent": torch.zeros(2, 4, 2, 2)}, None, "shape (2, 4, 2, 2)"),
        "channels.safetensors": ({"latent": torch.zeros(5, 2, 2)}, None, "5 channels"),
        "dtype.safetensors": ({"latent": torch.zeros(4, 2, 2, dtype=torch.int32)}, None, "dtype int32"),
        "nan.safetensors": ({"latent": z.clone().index_fill_(0, torch.tensor([1]), math.nan)}, None, "NaN or Inf"),
        "inf.safetensors": ({"latent": z.clone().index_fill_(0, torch.tensor([2]), math.inf)}, None, "NaN or Inf"),
        "other_model.safetensors": ({"latent": z}, other, "another model"),
        "size.safetensors": ({"latent": z}, dict(good_meta, height="40"), "does not match"),
        "no_latent.safetensors": ({"weights": z}, None, "no 'latent' tensor"),
    }


def test_bad_latent_files_are_refused(tmp_path):
    model = LocalAutoencoder(factor=8, channels=4)
    for name, (tensors, metadata, phrase) in bad_latents(model).items():
        save_file(tensors, tmp_path / name, metadata=metadata)
        with pytest.raises(DCAEError) as info:
            read_latent(tmp_path / name, model)
        assert str(tmp_path / name) in str(info.value) and phrase in str(info.value), name
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(DCAEError, match="not a readable .safetensors"):
        read_latent(tmp_path / "text.safetensors", model)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(DCAEError, match="empty"):
        read_latent(tmp_path / "empty.safetensors", model)
