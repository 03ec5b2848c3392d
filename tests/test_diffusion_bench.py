"""`dcae bench diffusion`: the same transformer on f8p2 / f32p1 / f64p1 latents, JSON rows and ratios, Markdown."""
from __future__ import annotations

import json

import pytest

from dcae.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_diffusion_rows_and_ratios(tmp_path, capsys):
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- BEGIN dcae bench diffusion -->\nold table\n<!-- END dcae bench diffusion -->\nafter\n")
    rc = main(["bench", "diffusion", "--resolution", "128", "--preset", "DiT-T/4", "--steps", "3", "--batch-size", "2",
               "--min-seconds", "0.05", "--rounds", "1", "--decode-preset", "f8p2=tiny", "--decode-preset",
               "f32p1=dc-ae-tiny-f32c32", "--decode-preset", "f64p1=tiny", "--json", str(tmp_path / "b.json"),
               "--md", str(doc), "--device", "cpu"])
    assert rc == 0
    result = json.loads((tmp_path / "b.json").read_text())
    rows = {row["latent"]: row for row in result["rows"]}
    assert list(rows) == ["f8p2", "f32p1", "f64p1"]
    assert [rows[k]["tokens"] for k in rows] == [64, 16, 4]  # 128px: (128/8/2)^2, (128/32)^2, (128/64)^2
    assert [rows[k]["latent_shape"] for k in rows] == [[4, 16, 16], [32, 4, 4], [128, 2, 2]]
    assert [rows[k]["patch_size"] for k in rows] == [2, 1, 1]
    assert rows["f8p2"]["train_speedup"] == 1.0 and rows["f8p2"]["sample_speedup"] == 1.0
    for row in rows.values():
        assert row["train_images_per_s"] > 0 and row["sample_images_per_s"] > 0
        assert row["sample_images_per_s_with_decode"] < row["sample_images_per_s"]
        assert abs(row["train_speedup"] - row["train_images_per_s"] / rows["f8p2"]["train_images_per_s"]) < 1e-9
    flops = [rows[k]["gflops_per_image_forward"] for k in rows]
    assert flops[0] > flops[1] > flops[2] > 0  # fewer tokens, less work: the source of the speedup
    assert abs(rows["f64p1"]["flops_ratio"] - flops[0] / flops[2]) < 1e-9
    assert all(row["optimizer_seconds_per_step"] > 0 for row in rows.values())
    assert rows["f8p2"]["decoder"] == "dc-ae-tiny-f8c4" and rows["f64p1"]["decoder"] == "dc-ae-tiny-f64c128"
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("after\n") and "old table" not in text
    assert "| f64p1 | 128x2x2 | 4 |" in text


def test_bench_diffusion_no_decode_and_bad_decoder(tmp_path, capsys):
    rc = main(["bench", "diffusion", "--resolution", "64", "--preset", "UViT-T/1", "--steps", "1", "--batch-size", "1",
               "--min-seconds", "0", "--rounds", "1", "--rows", "f32p1", "f64p1", "--no-decode", "--clock", "process",
               "--threads", "1",
               "--json", str(tmp_path / "b.json"), "--device", "cpu"])
    assert rc == 0
    result = json.loads((tmp_path / "b.json").read_text())
    rows = result["rows"]
    assert result["clock"] == "process" and "1 threads" in result["device_name"]
    assert [r["latent"] for r in rows] == ["f32p1", "f64p1"] and rows[0]["decoder"] is None
    assert rows[0]["train_speedup"] is None  # no f8p2 row: no ratios to report
    rc = main(["bench", "diffusion", "--resolution", "64", "--preset", "DiT-T/1", "--rows", "f64p1", "--min-seconds",
               "0", "--rounds", "1", "--decode-preset", "f64p1=dc-ae-tiny-f32c32", "--device", "cpu"])
    assert rc == 2 and "32 latent channels, not 128" in capsys.readouterr().err


def test_bench_diffusion_flops_only_matches_the_token_count(tmp_path):
    """UViT-H at 512px: f8p2 -> f64p1 cuts tokens 16x; attention's quadratic part makes the FLOP ratio a bit higher."""
    assert main(["bench", "diffusion", "--flops-only", "--preset", "UViT-H/1", "--json", str(tmp_path / "f.json")]) == 0
    rows = {r["latent"]: r for r in json.loads((tmp_path / "f.json").read_text())["rows"]}
    assert [rows[k]["tokens"] for k in ("f8p2", "f32p1", "f64p1")] == [1024, 256, 64]
    assert 16 < rows["f64p1"]["flops_ratio"] < 19 and rows["f64p1"]["train_images_per_s"] is None
    assert abs(rows["f8p2"]["params"] - 501e6) < 2e6  # U-ViT-H's 501M
