"""`dcae bench ae`: rows, ratios, output differences and the machine record, on a tiny preset (seconds, any CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dcae.runtime
from dcae.bench import (
    ISA_ENVIRONMENT,
    MD_BEGIN,
    MD_END,
    bench_dtypes,
    compile_markers,
    layouts_markers,
    markdown,
    paired_ratio,
    peak_allocated,
)
from dcae.cli import main
from dcae.runtime import other_layout

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


def test_bench_ae_layouts_times_both_layouts_and_pairs_their_rounds(tmp_path, monkeypatch):
    """--layouts: every dcae pass in NCHW and channels_last, the one the rule picks marked, the paired per-round ratio
    of the two, the per-round seconds, and the machine's state (environment, load average) in the JSON; --md writes
    the table between this ISA's own --layouts markers."""
    monkeypatch.setenv("ONEDNN_VERBOSE", "0")  # not an ISA variable: not recorded
    out, md = tmp_path / "layouts.json", tmp_path / "speed.md"
    begin, end = layouts_markers(dcae.runtime.cpu_isa())
    md.write_text(f"intro\n{begin}\nold\n{end}\n{MD_BEGIN}\nmain table\n{MD_END}\n")
    assert main(["bench", "ae", "--preset", "dc-ae-tiny-f32c32", "--resolution", "64", "--repeats", "2",
                 "--dtype", "fp32", "--compare", "none", "--layouts", "--json", str(out), "--md", str(md)]) == 0
    result = json.loads(out.read_text())
    assert result["layouts"] is True and result["channels_last"] is None
    assert result["layout_rule"] == "dcae.runtime.memory_format"
    assert set(result["environment"]) <= set(ISA_ENVIRONMENT) and "ONEDNN_VERBOSE" not in result["environment"]
    assert len(result["load_average"]["start"]) == 3 and set(result["load_average"]["end_of_resolution"]) == {"64"}
    rows = {(r["op"], r["layout"]): r for r in result["rows"]}
    assert set(rows) == {(op, layout) for op in ("encode", "decode") for layout in ("nchw", "channels_last")}
    for op in ("encode", "decode"):
        nchw, last = rows[(op, "nchw")], rows[(op, "channels_last")]
        chosen = dcae.runtime.memory_format(op, "fp32", 64 * 64)
        assert rows[(op, chosen)]["layout_chosen"] and not rows[(op, other_layout(chosen))]["layout_chosen"]
        assert rows[(op, chosen)]["ratio_vs_dcae_fp32"] == 1.0
        assert len(nchw["round_seconds"]) == len(last["round_seconds"]) == 2
        assert nchw["round_seconds"] == nchw["round_seconds_by_clock"]["wall"]  # the default clock, and the other
        assert len(nchw["round_seconds_by_clock"]["process"]) == 2
        assert nchw["ratio_vs_other_layout"] == pytest.approx(1 / last["ratio_vs_other_layout"])
        assert rows[(op, other_layout(chosen))]["max_abs_diff"] < 1e-4  # against the chosen one: the layouts agree
    text = md.read_text()
    assert "old" not in text and "main table" in text and "| vs other layout |" in text and "(chosen)" in text


def test_paired_ratio_is_the_median_of_per_round_ratios_and_inverts_exactly():
    assert paired_ratio([2.0, 4.0, 30.0], [1.0, 1.0, 1.0]) == pytest.approx(4.0)  # the outlier round does not count
    a, b = [1.0, 2.0, 3.0, 5.0], [2.0, 1.0, 2.5, 4.0]
    assert paired_ratio(a, b) == pytest.approx(1 / paired_ratio(b, a))


@pytest.mark.parametrize("flag, forced", [("--channels-last", True), ("--no-channels-last", False)])
def test_bench_ae_forced_layout_applies_to_every_pass_and_reproduces(tmp_path, flag, forced):
    out = tmp_path / "bench.json"
    assert main(["bench", "ae", "--preset", "dc-ae-tiny-f32c32", "--resolution", "64", "--repeats", "1",
                 "--dtype", "fp32", "--compare", "none", flag, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["channels_last"] is forced and result["layout_rule"] is None and flag in result["command"].split()
    assert {r["layout"] for r in result["rows"]} == {"channels_last" if forced else "nchw"}


def test_bench_ae_compile_adds_compiled_rows_beside_eager_ones(tmp_path, monkeypatch):
    """--compile times a compiled copy next to the eager model in the same rounds (torch.compile stubbed out here: a
    real compile takes a minute even for the tiny preset); dcae fp32's ratios stay relative to the eager row."""
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)
    out, md = tmp_path / "bench.json", tmp_path / "speed.md"
    begin, end = compile_markers(dcae.runtime.cpu_isa())
    md.write_text(f"{MD_BEGIN}\nmain table\n{MD_END}\n{begin}\nold\n{end}\n")
    assert main(["bench", "ae", "--preset", "dc-ae-tiny-f32c32", "--resolution", "64", "--repeats", "1",
                 "--dtype", "fp32", "--ops", "encode", "--compare", "none", "--compile", "--json", str(out),
                 "--md", str(md)]) == 0
    text = md.read_text()  # its own table, between this ISA's --compile markers; the main table is left alone
    assert "main table" in text and "\nold\n" not in text and markdown(json.loads(out.read_text())) in text
    rows = {r["compiled"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {False, True} and rows[False]["ratio_vs_dcae_fp32"] == 1.0
    assert rows[True]["ratio_vs_dcae_fp32"] == pytest.approx(rows[True]["images_per_s"] / rows[False]["images_per_s"])
    assert rows[True]["first_call_seconds"] > 0 and rows[True]["max_abs_diff"] < 1e-4


def test_docs_tables_are_the_results_files():
    """Every `dcae bench ae` table in docs/speed.md and docs/speed_avx2.md is what `markdown` makes of the results JSON
    its header names: the figures in the docs come from a file a command wrote."""
    repo = Path(__file__).resolve().parents[1]
    docs = {name: (repo / "docs" / name).read_text() for name in ("speed.md", "speed_avx2.md")}
    checked = 0
    for path in sorted((repo / "results").glob("bench_ae_*.json")):
        result = json.loads(path.read_text())
        if "--md docs/" not in result["command"]:
            continue
        doc = docs[result["command"].split("--md docs/", 1)[1].split()[0]]
        assert markdown(result) in doc, f"{path.name}: its table in the docs differs; rerun its command"
        checked += 1
    assert checked >= 2
