"""`dcae reconstruct / encode / decode` over a generated set of good and bad files: outputs, error lines, exit codes."""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_images import BAD_FILES, GOOD_SIZES, make_image_set, rng_image

import dcae
from dcae.cli import main

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("model")
    dcae.create_model("dc-ae-tiny-f32c32").save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def image_set(tmp_path_factory) -> Path:
    return make_image_set(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def reconstructed(image_set, model_dir, tmp_path_factory):
    """One reconstruct run over the whole set: (exit status, stdout, stderr, output folder)."""
    out = tmp_path_factory.mktemp("reconstructed")
    rc, stdout, stderr = run_cli("reconstruct", str(image_set), "-o", str(out), "--model", str(model_dir))
    return rc, stdout, stderr, out


def run_cli(*argv: str) -> tuple[int, str, str]:
    """main(argv) in process -> (exit status, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(list(argv))
    return rc, stdout.getvalue(), stderr.getvalue()


def error_lines(stderr: str, command: str) -> list[str]:
    return re.findall(rf"dcae {command}: error: ([^\r\n]*)", stderr)


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# --- reconstruct ------------------------------------------------------------------------------------------------------
def test_reconstruct_image_set_outputs_and_errors(reconstructed, image_set):
    rc, stdout, stderr, out = reconstructed
    assert rc == 1  # some inputs were bad
    assert files_under(out) == sorted(str(Path(name).with_suffix(".png")) for name in GOOD_SIZES)  # no temp files
    for name, (height, width) in GOOD_SIZES.items():
        with Image.open(out / Path(name).with_suffix(".png")) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (width, height), name
    errors = error_lines(stderr, "reconstruct")
    assert len(errors) == len(BAD_FILES)
    for name, phrase in BAD_FILES.items():
        assert any(line.startswith(f"{image_set / name}: ") and phrase in line for line in errors), name
    assert "Traceback" not in stderr
    assert "notes.txt" not in stdout + stderr  # a folder yields image names only
    per_image = re.findall(r"PSNR (\S+) dB\s+SSIM (\S+)", stdout)
    assert len(per_image) == len(GOOD_SIZES) and all(float(p) > 0 for p, _ in per_image)
    assert "reconstructed 11/15 images" in stdout and "images/s" in stdout and "compression" in stdout


def test_reconstruct_metrics_match_the_written_file(reconstructed, image_set):
    from dcae.images import read_image
    from dcae.metrics import psnr

    _, stdout, _, out = reconstructed
    line = next(line for line in stdout.splitlines() if "odd_333x517.png" in line)
    original = read_image(image_set / "odd_333x517.png")[None].float() / 255
    written = read_image(out / "odd_333x517.png")[None].float() / 255
    assert f"PSNR {float(psnr(original, written)):.2f} dB" in line
    assert "latent 32x17x11" in line  # 517 x 333 pads to 544 x 352


def test_reconstruct_options(tmp_path, model_dir):
    Image.fromarray(rng_image(40, 50, 4, seed=5), "RGBA").save(tmp_path / "a.png")
    Image.fromarray(rng_image(40, 50, seed=6)).save(tmp_path / "b.png")
    rc, stdout, stderr = run_cli("reconstruct", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "-o",
                                 str(tmp_path / "keep"), "--model", str(model_dir), "--keep-alpha", "--batch-size", "2")
    assert rc == 0 and not error_lines(stderr, "reconstruct"), stderr
    with Image.open(tmp_path / "keep" / "a.png") as image:  # alpha carried through unchanged
        assert image.mode == "RGBA" and np.array_equal(np.asarray(image)[..., 3], rng_image(40, 50, 4, seed=5)[..., 3])
    rc, _, _ = run_cli("reconstruct", str(tmp_path / "b.png"), "-o", str(tmp_path / "one"), "--model",
                       str(model_dir))
    batched = np.asarray(Image.open(tmp_path / "keep" / "b.png"), dtype=int)
    alone = np.asarray(Image.open(tmp_path / "one" / "b.png"), dtype=int)
    assert rc == 0 and np.abs(batched - alone).max() <= 1  # batching changes nothing beyond rounding
    rc, _, _ = run_cli("reconstruct", str(tmp_path / "b.png"), "-o", str(tmp_path / "sbs"), "--model",
                       str(model_dir), "--side-by-side", "--format", "jpg", "--quality", "80")
    with Image.open(tmp_path / "sbs" / "b.jpg") as image:
        assert rc == 0 and image.format == "JPEG" and image.size == (100, 40)


def test_reconstruct_tiled_and_dtypes(tmp_path, model_dir):
    Image.fromarray(rng_image(100, 130, seed=7)).save(tmp_path / "c.png")
    for extra in (["--tile", "64", "--overlap", "32"], ["--dtype", "bf16"], ["--dtype", "fp16", "--tile", "64"]):
        out = tmp_path / "_".join(extra).replace("-", "")
        rc, stdout, stderr = run_cli("reconstruct", str(tmp_path / "c.png"), "-o", str(out), "--model",
                                     str(model_dir), *extra)
        assert rc == 0, (extra, stderr)
        with Image.open(out / "c.png") as image:
            assert image.size == (130, 100)
    rc, _, stderr = run_cli("reconstruct", str(tmp_path / "c.png"), "-o", str(tmp_path / "x"), "--model",
                            str(model_dir), "--tile", "50")
    assert rc == 2 and "multiple of the spatial factor 32" in error_lines(stderr, "reconstruct")[0]
    assert not (tmp_path / "x").exists()


def test_never_overwrites_an_input(tmp_path, model_dir):
    Image.fromarray(rng_image(20, 20, seed=8)).save(tmp_path / "in.png")
    before = (tmp_path / "in.png").read_bytes()
    rc, _, stderr = run_cli("reconstruct", str(tmp_path), "-o", str(tmp_path), "--model", str(model_dir))
    assert rc == 1 and "would overwrite an input" in error_lines(stderr, "reconstruct")[0]
    assert (tmp_path / "in.png").read_bytes() == before and files_under(tmp_path) == ["in.png"]


def test_unwritable_output_and_missing_input(tmp_path, model_dir):
    Image.fromarray(rng_image(20, 20, seed=9)).save(tmp_path / "in.png")
    (tmp_path / "file").write_text("not a folder")
    rc, _, stderr = run_cli("reconstruct", str(tmp_path / "in.png"), str(tmp_path / "gone.png"), "-o",
                            str(tmp_path / "file" / "out"), "--model", str(model_dir))
    errors = error_lines(stderr, "reconstruct")
    assert rc == 1 and len(errors) == 2
    assert errors[0].startswith(f"{tmp_path / 'gone.png'}: no such file")
    assert errors[1] == f"{tmp_path / 'in.png'}: cannot write {tmp_path / 'file' / 'out' / 'in.png'}: Not a directory"
    assert not list((tmp_path).glob("**/*.tmp"))


def test_max_pixels_flag(tmp_path, model_dir):
    Image.fromarray(rng_image(64, 64, seed=10)).save(tmp_path / "in.png")
    rc, _, stderr = run_cli("reconstruct", str(tmp_path / "in.png"), "-o", str(tmp_path / "o"), "--model",
                            str(model_dir), "--max-pixels", "4000")
    assert rc == 1 and "over the limit of 0.0 Mpx" in error_lines(stderr, "reconstruct")[0]
    for option in (["--quality", "0"], ["--batch-size", "0"], ["--max-pixels", "-1"]):
        rc, _, stderr = run_cli("decode", str(tmp_path), "-o", str(tmp_path / "o"), "--model", "no-such", *option)
        assert rc == 2 and len(error_lines(stderr, "decode")) == 1  # refused before the model is even looked up


def test_max_memory_shrinks_tiles_or_refuses(tmp_path, model_dir):
    """A memory budget that cannot hold an untiled pass: auto tiles shrink to fit, --tile none is refused per file."""
    Image.fromarray(rng_image(512, 640)).save(tmp_path / "wide.png")
    Image.fromarray(rng_image(64, 64)).save(tmp_path / "small.png")
    # tiny f32c32: ~640 B per pixel + 0.27 GB fixed, so 0.3 GB holds ~50k pixels: a 128 px tile, not 512x640 at once
    rc, stdout, stderr = run_cli("reconstruct", str(tmp_path / "wide.png"), "-o", str(tmp_path / "auto"),
                                 "--model", str(model_dir), "--max-memory", "0.3")
    assert rc == 0, stderr
    assert Image.open(tmp_path / "auto" / "wide.png").size == (640, 512)
    rc, stdout, stderr = run_cli("reconstruct", str(tmp_path / "wide.png"), str(tmp_path / "small.png"),
                                 "-o", str(tmp_path / "none"), "--model", str(model_dir), "--tile", "none",
                                 "--max-memory", "0.3")
    assert rc == 1
    [line] = error_lines(stderr, "reconstruct")
    assert "wide.png: an untiled pass over 640x512 needs ~" in line and "--max-memory" in line
    assert files_under(tmp_path / "none") == ["small.png"]  # the other file still runs
    for command, value in (("reconstruct", "0"), ("encode", "-1"), ("decode", "nan")):
        rc, _, stderr = run_cli(command, str(tmp_path / "small.png"), "-o", str(tmp_path / "x"),
                                "--model", str(model_dir), "--max-memory", value)
        assert rc == 2 and f"--max-memory {float(value)}: expected a positive number of GB" in stderr


def test_model_resolution(tmp_path, monkeypatch):
    import dcae.weights

    monkeypatch.setattr(dcae.weights, "default_model_path", lambda: None, raising=False)
    Image.fromarray(rng_image(8, 8, seed=11)).save(tmp_path / "in.png")
    rc, _, stderr = run_cli("reconstruct", str(tmp_path / "in.png"), "-o", str(tmp_path / "o"))
    assert rc == 2 and "pass --model" in stderr and "Traceback" not in stderr
    rc, _, stderr = run_cli("reconstruct", str(tmp_path / "in.png"), "-o", str(tmp_path / "o"), "--model",
                            "dc-ae-tiny-f32c32")
    assert rc == 0 and "RANDOM weights" in stderr
    rc, _, stderr = run_cli("reconstruct", str(tmp_path / "in.png"), "-o", str(tmp_path / "o"), "--model",
                            str(tmp_path / "no-such-model"))
    assert rc == 2 and str(tmp_path / "no-such-model") in stderr and len(stderr.strip().splitlines()) == 1


def test_subprocess_has_no_traceback(tmp_path, model_dir):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    Image.fromarray(rng_image(9, 9, seed=12)).save(tmp_path / "good.png")
    result = subprocess.run([sys.executable, "-m", "dcae.cli", "reconstruct", str(tmp_path / "bad.png"),
                             str(tmp_path / "good.png"), "-o", str(tmp_path / "o"), "--model", str(model_dir)],
                            capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = error_lines(result.stderr, "reconstruct")
    assert len(errors) == 1 and errors[0].startswith(f"{tmp_path / 'bad.png'}: ")
    assert (tmp_path / "o" / "good.png").exists() and not (tmp_path / "o" / "bad.png").exists()


# --- encode / decode --------------------------------------------------------------------------------------------------
def test_encode_decode_round_trip_matches_reconstruct(reconstructed, image_set, model_dir, tmp_path):
    _, _, _, recon = reconstructed
    names = ["odd_333x517.png", "one_1x1.png", "exif_rotated.jpg", "rgba.png", "empty.png"]
    rc, stdout, stderr = run_cli("encode", *(str(image_set / n) for n in names), "-o", str(tmp_path / "z"),
                                 "--model", str(model_dir), "--keep-alpha")
    assert rc == 1 and len(error_lines(stderr, "encode")) == 1 and "empty" in error_lines(stderr, "encode")[0]
    assert files_under(tmp_path / "z") == sorted(Path(n).stem + ".safetensors" for n in names[:-1])
    meta_tensors = load_file(tmp_path / "z" / "odd_333x517.safetensors")
    assert meta_tensors["latent"].shape == (32, 17, 11) and meta_tensors["latent"].dtype == torch.float32
    rc, stdout, stderr = run_cli("decode", str(tmp_path / "z"), "-o", str(tmp_path / "y"), "--model",
                                 str(model_dir))
    assert rc == 0, stderr
    for name in names[:-1]:
        height, width = GOOD_SIZES[name]
        decoded = np.asarray(Image.open(tmp_path / "y" / Path(name).with_suffix(".png")))
        assert decoded.shape[:2] == (height, width)
        reference = np.asarray(Image.open(recon / Path(name).with_suffix(".png")))
        assert np.array_equal(decoded[..., :3], reference), name  # encode + decode == reconstruct, bit for bit
    rgba = np.asarray(Image.open(tmp_path / "y" / "rgba.png"))
    assert rgba.shape[2] == 4 and np.array_equal(rgba[..., 3], np.asarray(Image.open(image_set / "rgba.png"))[..., 3])


def test_decode_refuses_bad_latents(tmp_path, model_dir):
    from dcae.latent_file import latent_metadata

    model = dcae.DCAE.from_pretrained(model_dir)
    good = latent_metadata(model, "tiny", (64, 64), torch.float32)
    z = torch.zeros(32, 2, 2)
    cases = {
        "ndim.safetensors": ({"latent": torch.zeros(32, 2)}, good, "shape (32, 2)"),
        "channels.safetensors": ({"latent": torch.zeros(16, 2, 2)}, good, "16 channels"),
        "dtype.safetensors": ({"latent": z.long()}, good, "dtype int64"),
        "nan.safetensors": ({"latent": z.clone().fill_(float("nan"))}, good, "NaN or Inf"),
        "inf.safetensors": ({"latent": z.clone().fill_(float("inf"))}, good, "NaN or Inf"),
        "other.safetensors": ({"latent": z}, dict(good, config_hash="ab" * 32), "another model"),
    }
    for name, (tensors, metadata, _) in cases.items():
        save_file(tensors, tmp_path / name, metadata=metadata)
    (tmp_path / "text.safetensors").write_text("not safetensors")
    save_file({"latent": z}, tmp_path / "fine.safetensors", metadata=good)
    rc, stdout, stderr = run_cli("decode", str(tmp_path), "-o", str(tmp_path / "out"), "--model", str(model_dir))
    errors = error_lines(stderr, "decode")
    assert rc == 1 and len(errors) == len(cases) + 1 and "Traceback" not in stderr
    for name, (_, _, phrase) in cases.items():
        assert any(line.startswith(f"{tmp_path / name}: ") and phrase in line for line in errors), name
    assert files_under(tmp_path / "out") == ["fine.png"] and "decoded 1/8 latents" in stdout


def _recorded_default() -> dict:
    """results/default_model.json, checked to be a record of the shipped file (not of a model it replaced)."""
    import json

    from dcae.provenance import EMBEDDED_DEFAULT, file_sha256

    recorded = json.loads((REPO / "results" / "default_model.json").read_text())
    assert recorded["provenance"]["models"]["model"]["sha256"] == file_sha256(EMBEDDED_DEFAULT)
    assert recorded["weights"] == "model" and recorded["tile"] is None and recorded["data"] == "kodak24"
    return recorded


def _recompute(names: list[str]) -> dict[str, dict[str, float]]:
    """eval_default's per-image metrics of the shipped weights, recomputed now, for some Kodak24 images."""
    import math

    from experiments.eval_default import KODAK, evaluate_image

    from dcae.images import read_image
    from dcae.perceptual import LPIPS
    from dcae.provenance import EMBEDDED_DEFAULT

    if not KODAK.is_dir():
        pytest.skip(f"shared data not found at {KODAK}")
    model = dcae.DCAE.from_pretrained(EMBEDDED_DEFAULT.parent).eval()
    shrink = math.sqrt(3 * model.config.spatial_factor**2 / model.config.latent_channels)
    lpips = LPIPS("alex")
    return {name: evaluate_image(model, lpips, read_image(KODAK / name), shrink) for name in names}


def test_embedded_default_reproduces_its_recorded_scores(tmp_path):
    """The shipped weights give, now, the PSNR/SSIM/LPIPS that results/default_model.json records for three images
    (the whole set is the slow test below), and the README's no-`--model` reconstruct prints the same PSNR."""
    recorded = {row["image"]: row for row in _recorded_default()["rows"]}
    names = ["kodim08.png", "kodim03.png", "kodim23.png"]  # the lowest- and highest-scoring, and the bundled photo
    for name, row in _recompute(names).items():
        for key, tolerance in (("dcae_psnr", 1e-3), ("dcae_ssim", 1e-4), ("dcae_lpips", 1e-4)):
            assert row[key] == pytest.approx(recorded[name][key], abs=tolerance), (name, key)
        assert row["dcae_psnr"] > row["bicubic_psnr"], name  # measured here, not read from the JSON
    rc, stdout, stderr = run_cli("reconstruct", str(REPO / "examples" / "kodim23.png"), "-o", str(tmp_path),
                                 "--dtype", "fp32")  # the recorded score is fp32's; auto may pick bf16
    assert rc == 0, stderr
    assert "RANDOM" not in stderr and "default-f32c32" in stdout
    measured = float(re.search(r"kodim23\.png .* PSNR ([0-9.]+) dB", stdout).group(1))
    assert measured == pytest.approx(recorded["kodim23.png"]["dcae_psnr"], abs=0.006)  # printed to 0.01 dB


@pytest.mark.slow
def test_embedded_default_reproduces_its_recorded_kodak24_mean():
    """The model card's headline: the full Kodak24 mean PSNR of the shipped weights, recomputed from the file."""
    recorded = _recorded_default()
    rows = _recompute([row["image"] for row in recorded["rows"]])
    assert len(rows) == recorded["n"] == 24
    for key in ("dcae_psnr", "bicubic_psnr", "dcae_ssim", "dcae_lpips"):
        assert np.mean([r[key] for r in rows.values()]) == pytest.approx(recorded["mean"][key], abs=1e-3), key
    assert np.mean([r["dcae_psnr"] - r["bicubic_psnr"] for r in rows.values()]) >= 1.0  # issue 6's target
