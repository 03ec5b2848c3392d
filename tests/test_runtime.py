"""dcae.runtime: the device/dtype choice (`auto`), its warnings, and where the choice is shown and recorded.

Every bf16/fp16 run here is tiny (a tiny preset, images of at most 64 px): CI may run on a CPU that emulates bf16.
"""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import dcae.runtime as runtime
from dcae.cli import main
from dcae.errors import DCAEError
from dcae.runs import resolve_precision

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cpu(monkeypatch):
    """Pretend the CPU does (native=True) or does not (False) run bf16 natively; warnings start afresh."""
    runtime._warn_once.cache_clear()

    def pretend(native: bool, isa: str | None = None) -> None:
        monkeypatch.setattr(runtime, "bf16_is_native", lambda device: native and torch.device(device).type == "cpu")
        monkeypatch.setattr(runtime, "cpu_isa", lambda: isa or ("avx512_bf16" if native else "avx2"))

    yield pretend
    runtime._warn_once.cache_clear()


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def images(folder, count: int = 2, side: int = 32):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_picks_bf16_only_where_native(cpu, native, expected):
    cpu(native)
    assert runtime.resolve_dtype("auto", "cpu") == expected
    assert resolve_precision("auto", torch.device("cpu")) == expected  # the trainers' precision=auto
    assert runtime.Runtime.choose("cpu", "auto").dtype == expected
    assert runtime.resolve_dtype("fp32", "cpu") == "fp32"  # an explicit choice is kept


def test_both_trainers_default_to_auto():
    from dcae.diffusion.train import TrainDiffusionConfig
    from dcae.train import TrainConfig

    assert TrainConfig().precision == TrainDiffusionConfig().precision == "auto"


def test_auto_never_picks_fp16_and_unknown_names_are_refused(cpu):
    cpu(True)
    assert runtime.resolve_dtype("auto", "cpu") != "fp16"
    with pytest.raises(DCAEError, match="unknown dtype 'fp8'"):
        runtime.resolve_dtype("fp8", "cpu")
    with pytest.raises(DCAEError, match="precision='fp16': choose auto, fp32 or bf16"):
        resolve_precision("fp16", torch.device("cpu"))  # training has no gradient scaler


def test_explicit_bf16_on_an_emulating_cpu_warns_once_and_still_runs(cpu, tmp_path):
    cpu(False)
    rc, stdout, stderr = run_cli("reconstruct", str(images(tmp_path / "in")), "-o", str(tmp_path / "out"),
                                 "--model", "dc-ae-tiny-f32c32", "--dtype", "bf16")
    assert rc == 0, stderr
    assert stderr.count("bf16 is emulated on this CPU (avx2") == 1  # two images, one warning
    assert "in bf16" in stderr and "cpu bf16" in stdout
    assert len(list((tmp_path / "out").glob("*.png"))) == 2
    assert runtime.resolve_dtype("bf16", "cpu") == "bf16"  # a second choice in the same process: no new warning


def test_fp16_on_cpu_is_honoured_with_a_warning(cpu, tmp_path, monkeypatch):
    """The code's decision: an explicit fp16 on a CPU runs (autocast fp16, attention in fp32) and warns once unless
    the CPU has AMX-FP16; auto never picks it."""
    cpu(False)
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: set())
    rc, _, stderr = run_cli("reconstruct", str(images(tmp_path / "in", count=1)), "-o", str(tmp_path / "out"),
                            "--model", "dc-ae-tiny-f32c32", "--dtype", "fp16")
    assert rc == 0, stderr
    assert stderr.count("fp16 is emulated on this CPU") == 1


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_commands_default_to_auto_and_say_what_they_chose(cpu, tmp_path, native, expected):
    cpu(native)
    rc, stdout, stderr = run_cli("encode", str(images(tmp_path / "in", count=1)), "-o", str(tmp_path / "z"),
                                 "--model", "dc-ae-tiny-f32c32")
    assert rc == 0, stderr
    isa = "avx512_bf16" if native else "avx2"
    assert stderr.count(f"dcae encode: running on cpu ({isa}) in {expected} (--dtype auto)") == 1
    assert "float32" in stdout  # auto never changes the latent file: float32 whatever the compute dtype


def test_eval_json_records_the_choice_and_the_cpu(cpu, tmp_path):
    cpu(False, isa="avx2")
    out = tmp_path / "r.json"
    rc, _, stderr = run_cli("eval", "--model", "dc-ae-tiny-f32c32", "--data", str(images(tmp_path / "in", 2, 64)),
                            "--resolution", "32", "--json", str(out), "--stats-cache", str(tmp_path / "c"))
    assert rc == 0, stderr
    record = json.loads(out.read_text())["runtime"]
    assert record["dtype"] == "fp32" and record["dtype_requested"] == "auto"
    assert record["cpu_isa"] == "avx2" and record["bf16_native"] is False and record["device"] == "cpu"


def test_device_choice_is_one_function(monkeypatch):
    assert runtime.resolve_device("auto").type in ("cpu", "cuda") and runtime.resolve_device(None) is not None
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(DCAEError, match="no CUDA device"):
        runtime.resolve_device("cuda")
    with pytest.raises(DCAEError, match="expected auto, cpu, cuda"):
        runtime.resolve_device("gpu0")
