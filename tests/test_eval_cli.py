"""`dcae metrics` and `dcae eval` end to end, in process."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from dcae.cli import main
from dcae.metrics import adm_center_crop, psnr, quantize, ssim
from dcae.perceptual import LPIPS

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KODAK = DATA / "kodak24"


def kodak(index: int) -> Path:
    if not KODAK.exists():
        pytest.skip("shared data missing")
    return KODAK / f"kodim{index:02d}.png"


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """Two folders of 3 small crops: PNG references and blurred JPEG copies with the same stems."""
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "sub").mkdir(parents=True)
    (b / "sub").mkdir(parents=True)
    for i, name in [(2, "x"), (8, "y"), (19, "sub/z")]:
        image = Image.open(kodak(i)).convert("RGB").crop((200, 150, 264, 198))  # 64x48
        image.save(a / f"{name}.png")
        image.filter(ImageFilter.GaussianBlur(1.2)).save(b / f"{name}.jpg", quality=85)
    return a, b


def read01(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 255


def test_metrics_folders_json(folders, tmp_path, capsys):
    a, b = folders
    out = tmp_path / "m.json"
    assert main(["metrics", str(a), str(b), "--json", str(out), "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"psnr", "ssim", "lpips", "fid", "n", "rows", "runtime"}
    assert result["runtime"]["dtype"] == "fp32" and "cpu_isa" in result["runtime"]  # the metric networks: fp32
    assert result["n"] == 3 and [r["name"] for r in result["rows"]] == ["sub/z", "x", "y"]
    lpips = LPIPS("alex")
    for row in result["rows"]:
        x, y = read01(a / f"{row['name']}.png"), read01(b / f"{row['name']}.jpg")
        assert row["psnr"] == pytest.approx(psnr(x, y).item(), abs=1e-9)
        assert row["ssim"] == pytest.approx(ssim(x, y).item(), abs=1e-9)
        assert row["lpips"] == pytest.approx(lpips(x * 2 - 1, y * 2 - 1).item(), abs=1e-6)
    assert result["psnr"] == pytest.approx(np.mean([r["psnr"] for r in result["rows"]]))
    assert result["fid"] > 0
    printed = capsys.readouterr().out
    assert "mean" in printed and "fid" in printed


def test_metrics_identical_images(folders, tmp_path, capsys):
    a, _ = folders
    out = tmp_path / "same.json"
    assert main(["metrics", str(a / "x.png"), str(a / "x.png"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "fid" not in result and result["n"] == 1
    assert result["psnr"] is None  # inf is not JSON: identical images give null
    assert result["ssim"] == pytest.approx(1.0) and result["lpips"] == 0.0
    assert "inf" in capsys.readouterr().out


def test_metrics_size_mismatch_is_one_line_error(folders, capsys):
    a, b = folders
    Image.open(kodak(2)).convert("RGB").crop((0, 0, 32, 32)).save(b / "x.jpg")
    assert main(["metrics", str(a), str(b)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("dcae metrics: error:") and "x.png is 64x48" in err and "x.jpg is 32x32" in err


def test_metrics_missing_counterpart(folders, capsys):
    a, b = folders
    (b / "y.jpg").unlink()
    shutil.copy(a / "x.png", b / "extra.png")
    assert main(["metrics", str(a), str(b)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "y" in err and "extra" in err


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    import dcae

    torch.manual_seed(0)
    model = dcae.create_model("dc-ae-tiny-f32c32")
    directory = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(directory)
    return directory


@pytest.fixture
def eval_data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    for i in (1, 4, 9):  # two landscape, one portrait
        shutil.copy(kodak(i), data / f"kodim{i:02d}.png")
    return data


def test_eval_end_to_end(tiny_checkpoint, eval_data, tmp_path):
    import dcae

    cache, out = tmp_path / "cache", tmp_path / "eval.json"
    args = ["eval", "--dtype", "fp32",  # checked below against an fp32 reconstruction by hand
            "--model", str(tiny_checkpoint), "--data", str(eval_data), "--resolution", "64",
            "--json", str(out), "--stats-cache", str(cache), "--batch-size", "2", "--device", "cpu"]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert {"psnr", "ssim", "lpips", "rfid", "n", "resolution", "model"} <= set(result)
    assert result["n"] == 3 and result["resolution"] == 64 and result["model"] == str(tiny_checkpoint)
    assert result["rfid"] > 0 and 0 < result["lpips"] and -1 <= result["ssim"] <= 1
    cached = list(cache.glob("*.npz"))
    assert len(cached) == 1

    # the same numbers by hand: ADM crop, reconstruct, quantise
    model = dcae.DCAE.from_pretrained(tiny_checkpoint).eval()
    images = torch.stack([adm_center_crop(torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1), 64)
                          for p in sorted(eval_data.glob("*.png"))])
    with torch.no_grad():
        recon = quantize(model((images.float() / 255 - 0.5) / 0.5))
    ref = images.float() / 255
    assert result["psnr"] == pytest.approx(psnr(ref, recon).mean().item(), abs=1e-4)
    assert result["ssim"] == pytest.approx(ssim(ref, recon).mean().item(), abs=1e-4)

    # second run reads the cached reference statistics and reproduces the result
    stamp = cached[0].stat().st_mtime_ns
    out2 = tmp_path / "eval2.json"
    assert main(args[:-6] + ["--json", str(out2), "--stats-cache", str(cache), "--batch-size", "2"]) == 0
    assert cached[0].stat().st_mtime_ns == stamp
    again = json.loads(out2.read_text())
    for key in ("psnr", "ssim", "lpips", "rfid"):
        assert again[key] == pytest.approx(result[key], rel=1e-6)


def test_eval_bad_resolution(tiny_checkpoint, eval_data, tmp_path, capsys):
    args = ["eval", "--model", str(tiny_checkpoint), "--data", str(eval_data), "--stats-cache", str(tmp_path / "c")]
    assert main(args + ["--resolution", "48"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "multiple of the model's spatial factor 32" in err


def test_eval_preset_name_warns_and_limit(eval_data, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["eval", "--model", "dc-ae-tiny-f32c32", "--data", str(eval_data), "--resolution", "32",
                 "--limit", "1", "--json", str(out), "--stats-cache", str(tmp_path / "c")]) == 0
    assert "RANDOM weights" in capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["n"] == 1 and result["rfid"] is None  # FID needs at least two images


def _eval_rank(rank: int, port: int, args: list[str]) -> None:
    import os

    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    assert main(args) == 0


@pytest.mark.slow
def test_eval_two_ranks_match_one(tiny_checkpoint, eval_data, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["eval", "--model", str(tiny_checkpoint), "--data", str(eval_data), "--resolution", "32",
              "--batch-size", "1", "--device", "cpu"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert main(common + ["--json", str(one), "--stats-cache", str(tmp_path / "c1")]) == 0
    mp.spawn(_eval_rank, args=(port, common + ["--json", str(two), "--stats-cache", str(tmp_path / "c2")]), nprocs=2)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["n"] == b["n"] == 3
    for key in ("psnr", "ssim", "lpips", "rfid"):
        assert b[key] == pytest.approx(a[key], rel=1e-6)
    assert len(list((tmp_path / "c2").glob("*.npz"))) == 1  # rank 0 wrote the gathered reference statistics


# ----------------------------------------------------------------------------------------------------------------------
# Structured latent (DC-AE 1.5): one evaluation, metrics per kept-channel count
@pytest.fixture(scope="module")
def structured_checkpoint(tmp_path_factory) -> Path:
    import dcae

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny15")
    dcae.create_model("dc-ae-tiny-f32c128-1.5").save_pretrained(directory)
    return directory


class ColourFeatures(torch.nn.Module):
    """A cheap stand-in for InceptionFeatures (B, 2048): its TorchScript warm-up is most of an eval's time on a CPU,
    and rFID itself is checked by the tests above; here only the per-K bookkeeping is."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(images.float().mean((2, 3)), (0, 2045))  # (B, 2048)


def test_eval_channel_sweep_json_and_plot(structured_checkpoint, eval_data, tmp_path, capsys, monkeypatch):
    import dcae
    import dcae.commands.eval

    pytest.importorskip("matplotlib")
    monkeypatch.setattr(dcae.commands.eval, "InceptionFeatures", ColourFeatures)
    out, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    assert main(["eval", "--dtype", "fp32", "--model", str(structured_checkpoint), "--data", str(eval_data),
                 "--resolution", "32", "--channels", "128", "16", "16", "--json", str(out), "--plot", str(plot),
                 "--stats-cache", str(tmp_path / "cache"), "--batch-size", "2", "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert result["channels"] == [16, 128] and result["latent_channels"] == 128 and result["n"] == 3
    assert [e["channels"] for e in result["by_channels"]] == [16, 128]
    assert all(e["n"] == 3 and e["rfid"] >= 0 for e in result["by_channels"])
    assert all(set(e) == {"channels", "psnr", "ssim", "lpips", "rfid", "n"} for e in result["by_channels"])
    assert {"resolution", "model", "reference_stats", "runtime", "provenance"} <= set(result)
    assert "psnr" not in result  # no top-level number that could be mistaken for the full latent's
    assert result["provenance"]["models"]["model"]["sha256"]
    # each entry is the reconstruction from that prefix, by hand
    model = dcae.DCAE.from_pretrained(structured_checkpoint).eval()
    images = torch.stack([adm_center_crop(torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1), 32)
                          for p in sorted(eval_data.glob("*.png"))])
    x = (images.float() / 255 - 0.5) / 0.5
    for entry in result["by_channels"]:
        with torch.no_grad():
            recon = quantize(model.decode(model.encode(x, channels=entry["channels"])))
        assert entry["psnr"] == pytest.approx(psnr(images.float() / 255, recon).mean().item(), abs=1e-4)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "@ 16 channels" in printed and "@ 128 channels" in printed and f"wrote {plot}" in printed


def test_eval_no_rfid_never_builds_inception(structured_checkpoint, eval_data, tmp_path, monkeypatch):
    """--no-rfid: PSNR/SSIM/LPIPS as with rFID, no InceptionV3 built (machines without its weights), rfid null."""
    import dcae.commands.eval

    def refuse(*args, **kwargs):
        raise AssertionError("InceptionV3 built under --no-rfid")

    monkeypatch.setattr(dcae.commands.eval, "InceptionFeatures", ColourFeatures)
    common = ["eval", "--dtype", "fp32", "--model", str(structured_checkpoint), "--data", str(eval_data),
              "--resolution", "32", "--channels", "16", "128", "--batch-size", "2", "--device", "cpu",
              "--stats-cache", str(tmp_path / "cache")]
    assert main([*common, "--json", str(tmp_path / "with.json")]) == 0
    monkeypatch.setattr(dcae.commands.eval, "InceptionFeatures", refuse)
    assert main([*common, "--json", str(tmp_path / "without.json"), "--no-rfid"]) == 0
    with_rfid, without = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("with", "without"))
    assert without["reference_stats"] is None
    for a, b in zip(with_rfid["by_channels"], without["by_channels"]):
        assert b["rfid"] is None and a["rfid"] is not None
        assert {k: a[k] for k in ("channels", "psnr", "ssim", "lpips", "n")} == \
            {k: b[k] for k in ("channels", "psnr", "ssim", "lpips", "n")}


def test_eval_channels_errors_are_one_line(tiny_checkpoint, eval_data, tmp_path, capsys):
    from dcae.commands.eval import sweep_channels
    import dcae

    common = ["eval", "--model", str(tiny_checkpoint), "--data", str(eval_data), "--resolution", "32",
              "--stats-cache", str(tmp_path / "c")]
    for extra, message in ((["--channels", "16", "32"], "has no structured latent"),
                           (["--plot", str(tmp_path / "p.png")], "--plot draws quality against --channels")):
        assert main(common + extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert sweep_channels(dcae.DCAE.from_pretrained(tiny_checkpoint), [32, 32]) == [32]  # all of them is fine
    assert not (tmp_path / "p.png").exists()


def test_plot_channel_sweep_draws_several_models(tmp_path):
    pytest.importorskip("matplotlib")
    from dcae.errors import DCAEError
    from dcae.report_plots import plot_channel_sweep

    def sweep(offset: float) -> dict:
        return {"by_channels": [{"channels": k, "psnr": 20 + offset + k / 16, "lpips": 0.5 - k / 512,
                                 "rfid": None if k == 16 else 10 - k / 32} for k in (64, 16, 128)]}

    path = plot_channel_sweep({"a": sweep(0), "b": sweep(1)["by_channels"]}, tmp_path / "two.png",
                              metrics=("psnr", "lpips", "rfid", "ssim"), title="two models")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = plot_channel_sweep({"a": sweep(0), "b": sweep(1)}, tmp_path / "again.png",
                               metrics=("psnr", "lpips", "rfid", "ssim"), title="two models")
    assert again.read_bytes() == path.read_bytes()  # no timestamp or version in the file
    for curves, target, message in (({"a": {"psnr": 1}}, "x.png", "not a channel sweep"),
                                    ({"a": sweep(0)}, "x.xyz", "cannot draw a .xyz file")):
        with pytest.raises(DCAEError, match=message):
            plot_channel_sweep(curves, tmp_path / target)
    with pytest.raises(DCAEError, match="unknown metric"):
        plot_channel_sweep({"a": sweep(0)}, tmp_path / "x.png", metrics=("fid",))
