"""The memory layout of each encode/decode pass (dcae.runtime.memory_format): the rule, forcing it, and that the
weights follow the pass's layout without changing its output. Tiny preset, 64 px: seconds on any CPU."""
from __future__ import annotations

import pytest
import torch

import dcae
import dcae.runtime as runtime
from dcae.runtime import InferenceOptions, decode, encode, layout_of, memory_format, prepare_model

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = runtime.NCHW_FP32_ENCODE_MAX_PIXELS  # 256 x 256


@pytest.mark.parametrize("op, dtype, pixels, expected", [
    ("encode", "fp32", 64 * 64, "nchw"),
    ("encode", "fp32", SMALL, "nchw"),  # 256 px: the one pass where NCHW wins
    ("encode", "fp32", SMALL + 1, "channels_last"),
    ("encode", "fp32", 512 * 512, "channels_last"),
    ("encode", "bf16", 256 * 256, "channels_last"),
    ("encode", "fp16", 256 * 256, "channels_last"),
    ("decode", "fp32", 256 * 256, "channels_last"),
    ("decode", "bf16", 512 * 512, "channels_last"),
])
def test_the_rule_per_pass_dtype_and_size(op, dtype, pixels, expected):
    assert memory_format(op, dtype, pixels) == expected
    assert memory_format(op, dtype, pixels, "cuda") == "channels_last"  # CUDA: cuDNN's layout, whatever the pass


def test_forcing_a_layout_overrides_the_rule_and_unknown_passes_are_refused():
    for op in ("encode", "decode"):
        assert InferenceOptions(channels_last=True).layout(op, 64 * 64) == "channels_last"
        assert InferenceOptions("bf16", channels_last=False).layout(op, 1024 * 1024) == "nchw"
        assert InferenceOptions("fp32").layout(op, 64 * 64) == memory_format(op, "fp32", 64 * 64)
    with pytest.raises(ValueError, match="unknown pass"):
        memory_format("reconstruct", "fp32", 64 * 64)


def test_each_pass_puts_its_weights_in_its_layout_and_the_output_does_not_change(monkeypatch):
    torch.manual_seed(0)
    model = prepare_model(dcae.create_model("dc-ae-tiny-f32c32"), InferenceOptions())
    assert layout_of(model.encoder) == layout_of(model.decoder) == "nchw"  # auto: weights untouched until a pass
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    z = encode(model, x, InferenceOptions())
    assert layout_of(model.encoder) == "nchw" and z.is_contiguous()
    y = decode(model, z, InferenceOptions())
    assert layout_of(model.decoder) == "channels_last" and y.is_contiguous()
    conv = next(m for m in model.decoder.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()

    monkeypatch.setattr(runtime, "NCHW_FP32_ENCODE_MAX_PIXELS", 0)  # now every encode runs channels_last
    assert torch.allclose(encode(model, x, InferenceOptions()), z, atol=1e-5)
    assert layout_of(model.encoder) == "channels_last"
    assert torch.allclose(decode(model, z, InferenceOptions(channels_last=False)), y, atol=1e-5)
    assert layout_of(model.decoder) == "nchw"


def test_a_forced_layout_is_set_once_when_the_model_is_prepared():
    model = prepare_model(dcae.create_model("dc-ae-tiny-f32c32"), InferenceOptions(channels_last=True))
    assert layout_of(model.encoder) == layout_of(model.decoder) == "channels_last"
    model = prepare_model(model, InferenceOptions(channels_last=False))
    assert layout_of(model.encoder) == layout_of(model.decoder) == "nchw"
