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
               "--md", str(doc), "--device", "cpu", "--peer", "none"])
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
    for row in rows.values():  # the small-batch setting: one fixed batch; each step's parts timed
        assert row["batch_size"] == 2 and row["optimizer_seconds_per_step"] > 0
        assert row["forward_seconds_per_step"] > 0 and row["backward_seconds_per_step"] > 0
        parts = row["forward_seconds_per_step"] + row["backward_seconds_per_step"] + row["optimizer_seconds_per_step"]
        assert abs(2 / parts / row["train_images_per_s"] - 1) < 0.5  # medians of the parts vs of the whole
    assert result["batch_size"] == 2 and result["tokens_per_step"] is None and result["peer"] is None
    assert rows["f8p2"]["decoder"] == "dc-ae-tiny-f8c4" and rows["f64p1"]["decoder"] == "dc-ae-tiny-f64c128"
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("after\n") and "old table" not in text
    assert "| f64p1 | 128x2x2 | 4 |" in text


def test_bench_diffusion_no_decode_and_bad_decoder(tmp_path, capsys):
    rc = main(["bench", "diffusion", "--resolution", "64", "--preset", "UViT-T/1", "--steps", "1", "--batch-size", "1",
               "--min-seconds", "0", "--rounds", "1", "--rows", "f32p1", "f64p1", "--no-decode", "--clock", "process",
               "--threads", "1", "--peer", "none",
               "--json", str(tmp_path / "b.json"), "--device", "cpu"])
    assert rc == 0
    result = json.loads((tmp_path / "b.json").read_text())
    rows = result["rows"]
    assert result["clock"] == "process" and result["machine"]["threads"] == 1
    assert [r["latent"] for r in rows] == ["f32p1", "f64p1"] and rows[0]["decoder"] is None
    assert rows[0]["train_speedup"] is None  # no f8p2 row: no ratios to report
    rc = main(["bench", "diffusion", "--resolution", "64", "--preset", "DiT-T/1", "--rows", "f64p1", "--min-seconds",
               "0", "--rounds", "1", "--decode-preset", "f64p1=dc-ae-tiny-f32c32", "--device", "cpu",
               "--peer", "none"])
    assert rc == 2 and "32 latent channels, not 128" in capsys.readouterr().err


def test_bench_diffusion_flops_only_matches_the_token_count(tmp_path):
    """UViT-H at 512px: f8p2 -> f64p1 cuts tokens 16x; attention's quadratic part makes the FLOP ratio a bit higher."""
    assert main(["bench", "diffusion", "--flops-only", "--preset", "UViT-H/1", "--json", str(tmp_path / "f.json")]) == 0
    rows = {r["latent"]: r for r in json.loads((tmp_path / "f.json").read_text())["rows"]}
    assert [rows[k]["tokens"] for k in ("f8p2", "f32p1", "f64p1")] == [1024, 256, 64]
    assert 16 < rows["f64p1"]["flops_ratio"] < 19 and rows["f64p1"]["train_images_per_s"] is None
    assert abs(rows["f8p2"]["params"] - 501e6) < 2e6  # U-ViT-H's 501M


def test_bench_diffusion_default_batch_fills_tokens_and_times_the_diffusers_peer(tmp_path):
    """Equal tokens per step for every row, the machine record, and diffusers' DiT on dcae DiT's weights."""
    rc = main(["bench", "diffusion", "--resolution", "128", "--preset", "DiT-T/4", "--steps", "2", "--tokens-per-step",
               "64", "--min-seconds", "0", "--rounds", "1", "--no-decode", "--peer-preset", "DiT-T/1",
               "--peer-latent", "f64p1", "--json", str(tmp_path / "b.json"), "--device", "cpu"])
    assert rc == 0
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["command"].startswith("dcae bench diffusion --resolution 128")
    assert "--peer-preset DiT-T/1" in result["command"] and result["tokens_per_step"] == 64
    assert result["machine"]["cpu_isa"] and result["machine"]["threads"] >= 1 and "git_commit" in result
    assert [(r["tokens"], r["batch_size"]) for r in result["rows"]] == [(64, 1), (16, 4), (4, 16)]
    peer = result["peer"]
    assert peer["preset"] == "DiT-T/1" and peer["latent"] == "f64p1" and peer["max_abs_diff"] < 1e-4
    diffusers_row, dcae_row = peer["rows"]
    assert diffusers_row["impl"] == "diffusers" and dcae_row["impl"] == "dcae"
    assert diffusers_row["train_ratio"] == 1.0 and diffusers_row["sample_ratio"] == 1.0
    assert peer["train_ratio"] == dcae_row["train_ratio"] > 0 and peer["sample_ratio"] == dcae_row["sample_ratio"] > 0
    for row in peer["rows"]:
        assert row["latent_shape"] == [128, 2, 2] and row["tokens"] == 4 and row["batch_size"] == 16
        assert row["forward_seconds_per_step"] > 0 and row["sample_images_per_s"] > 0
    assert diffusers_row["params"] > dcae_row["params"]  # diffusers keeps one time/label embedder per block


def test_diffusers_dit_matches_dcae_dit_on_the_same_weights():
    import torch

    from dcae.diffusion.bench import peer_models

    config, ours, theirs, diff = peer_models("DiT-T/2", "f8p2", 128, torch.device("cpu"))
    assert config.patch_size == 2 and diff < 1e-5
    x = torch.randn(3, 4, 16, 16)
    t, y = torch.tensor([0.0, 250.0, 999.0]), torch.tensor([0, 5, 1000])
    with torch.no_grad():
        a, b = ours.eval()(x, t, y), theirs.eval()(x, t, y)
    assert a.abs().mean() > 1e-3 and torch.allclose(a, b, atol=1e-5)
