"""`dcae bench ae`: rows, ratios, output differences and the machine record, on a tiny preset (seconds, any CPU)."""
from __future__ import annotations

import json

import pytest
import torch

import dcae.runtime
from dcae.bench import MD_BEGIN, MD_END, bench_dtypes, peak_allocated
from dcae.cli import main

pytest.importorskip("diffusers")


def test_bench_ae_rows(tmp_path):
    out, md = tmp_path / "bench.json", tmp_path / "speed.md"
    md.write_text(f"# Speed\nprose\n{MD_BEGIN}\nold table\n{MD_END}\nmore prose\n")
    # bf16 asked for explicitly: on a CPU that emulates it this tiny size still takes well under a second
    rc = main(["bench", "ae", "--preset", "dc-ae-tiny-f32c32", "--resolution", "64", "--repeats", "1",
               "--warmup", "1", "--dtype", "fp32", "bf16", "--json", str(out), "--md", str(md)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["command"].startswith("dcae bench ae --preset dc-ae-tiny-f32c32")
    assert result["git_commit"] is None or len(result["git_commit"]) >= 40
    machine = result["machine"]
    assert machine["cpu_isa"] == dcae.runtime.cpu_isa() and isinstance(machine["bf16_native"], bool)
    assert machine["threads"] >= 1 and result["dtypes"] == ["fp32", "bf16"]
    assert set(result["seconds_per_resolution"]) == set(result["cpu_seconds_per_resolution"]) == {"64"}
    assert result["total_seconds"] > 0
    rows = result["rows"]
    assert {(r["impl"], r["op"], r["dtype"]) for r in rows} == {
        (impl, op, dtype) for op in ("encode", "decode") for impl in ("diffusers", "dcae") for dtype in ("fp32", "bf16")}
    for row in rows:
        assert row["images_per_s"] > 0 and row["resolution"] == 64 and row["gflop_per_image"] > 0
        assert row["peak_memory_mb"] > 0 and row["first_call_seconds"] > 0 and row["compiled"] is False
        assert row["ratio_vs_diffusers_fp32"] > 0 and row["ratio_vs_diffusers_same_dtype"] > 0
        same = next(r for r in rows if (r["impl"], r["op"], r["dtype"]) == ("diffusers", row["op"], row["dtype"]))
        assert abs(row["ratio_vs_diffusers_same_dtype"] - row["images_per_s"] / same["images_per_s"]) < 1e-9
        if (row["impl"], row["dtype"]) == ("diffusers", "fp32"):
            assert row["ratio_vs_diffusers_fp32"] == 1.0 and "max_abs_diff" not in row
        elif row["dtype"] == "fp32":
            assert row["max_abs_diff"] < 1e-4
        else:
            assert row["psnr_vs_fp32"] > 30
    text = md.read_text()
    assert text.startswith("# Speed\nprose\n") and text.endswith(f"{MD_END}\nmore prose\n") and "old table" not in text
    assert f"ISA **{machine['cpu_isa']}**" in text and "| vs diffusers same dtype |" in text


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtypes_time_bf16_only_where_native(monkeypatch, capsys, native):
    monkeypatch.setattr(dcae.runtime, "bf16_is_native", lambda device: native)
    dcae.runtime._warn_once.cache_clear()
    cpu = torch.device("cpu")
    assert bench_dtypes(["auto"], cpu) == (["fp32", "bf16"] if native else ["fp32"])
    assert capsys.readouterr().err == ""
    assert bench_dtypes(["bf16", "fp32"], cpu) == ["bf16", "fp32"]  # asked for: timed, with a warning if emulated
    assert ("bf16 is emulated" in capsys.readouterr().err) is not native
    dcae.runtime._warn_once.cache_clear()


def test_cpu_peak_allocated_sees_each_calls_own_peak():
    """A 200 MB temporary is measured as 200 MB even right after a larger tensor was freed (which RSS sampling misses:
    the C library keeps that memory), and nothing as nothing; in this process, with no malloc tuning."""
    big = torch.ones(100 * 2**20)  # 400 MB allocated and freed first
    del big

    def work():
        t = torch.ones(50 * 2**20)  # 200 MB live at the peak
        return float(t[0])

    peak, value = peak_allocated(work, torch.device("cpu"))
    assert value == 1.0 and peak == 50 * 2**20 * 4
    assert peak_allocated(lambda: None, torch.device("cpu"))[0] == 0


def test_bench_ae_onnxruntime_rows(tmp_path):
    """--onnx times dcae's own ONNX export in ONNX Runtime beside dcae fp32, with its output checked against it."""
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'dcae[export]')")
    out = tmp_path / "bench.json"
    assert main(["bench", "ae", "--preset", "dc-ae-tiny-f32c32", "--resolution", "64", "--repeats", "1",
                 "--dtype", "fp32", "--compare", "none", "--onnx", "--json", str(out)]) == 0
    rows = {(r["impl"], r["op"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(impl, op) for impl in ("dcae", "onnxruntime") for op in ("encode", "decode")}
    for op in ("encode", "decode"):
        ort, own = rows[("onnxruntime", op)], rows[("dcae", op)]
        assert ort["peak_memory_mb"] is None and own["ratio_vs_dcae_fp32"] == 1.0
        assert ort["ratio_vs_dcae_fp32"] == pytest.approx(ort["images_per_s"] / own["images_per_s"])
        assert ort["max_abs_diff"] < 1e-4  # the same weights: ONNX Runtime agrees with dcae fp32
