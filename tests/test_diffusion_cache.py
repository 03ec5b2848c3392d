"""The latent cache: labels from folders, ADM crops, flips, shards per rank, resume, atomic writes, index checks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from dcae.diffusion.latents import (
    INDEX_NAME,
    cache_latents,
    list_labeled_images,
    load_cropped,
    load_latent_cache,
    plan_cache,
)
from dcae.errors import DCAEError


pytestmark = pytest.mark.usefixtures("one_thread")


class StandInAE(nn.Module):
    """An 'autoencoder' whose latent is the 4x4 average: flips commute with it, so flipped latents are predictable."""

    spatial_factor = 4
    latent_channels = 3

    def __init__(self):
        super().__init__()
        self.calls = 0

    def config_dict(self) -> dict:
        return {"name": "stand-in", "factor": 4}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return F.avg_pool2d(x, 4)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.interpolate(z, scale_factor=4)


def write_images(root: Path, classes: dict[str, int], size=(20, 16), seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        folder = root / name if name else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(folder / f"{i:02d}.png")


def plan(files, labels, names, ae=None, **kw):
    options = dict(resolution=16, flip=True, dtype="float32", shard_size=3, autoencoder_source="stand-in")
    options.update(kw)
    return plan_cache(files, labels, names, ae or StandInAE(), **options)


def test_class_folders_flat_folders_and_mixed(tmp_path):
    write_images(tmp_path / "a", {"zebra": 2, "ant": 1})
    files, labels, names = list_labeled_images([tmp_path / "a"])
    assert names == ["ant", "zebra"] and labels == [0, 1, 1]
    write_images(tmp_path / "flat1", {"": 2})
    write_images(tmp_path / "flat2", {"": 1})
    files, labels, names = list_labeled_images([tmp_path / "flat1", tmp_path / "flat2"])
    assert names == [""] and labels == [0, 0, 0] and len(files) == 3
    write_images(tmp_path / "a", {"": 1})  # a loose image beside class folders
    with pytest.raises(DCAEError, match="both in class folders and at the top level"):
        list_labeled_images([tmp_path / "a"])
    with pytest.raises(DCAEError, match="not a folder"):
        list_labeled_images([tmp_path / "missing"])


def test_load_cropped_applies_exif_and_adm_center_crop(tmp_path):
    # A 40x20 image whose EXIF says "rotate 90": upright it is 20 wide, 40 tall; left half red, right half blue as stored.
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20, 0] = 255
    array[:, 20:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    Image.fromarray(array).save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    x = load_cropped(tmp_path / "rotated.jpg", 8)
    assert x.shape == (3, 8, 8) and x.min() >= -1 and x.max() <= 1
    # After rotation the red half is on top; the centre crop straddles the boundary: top rows red, bottom rows blue.
    assert x[0, 0].mean() > 0.5 and x[2, 0].mean() < -0.5
    assert x[2, -1].mean() > 0.5 and x[0, -1].mean() < -0.5


def test_cache_shards_labels_and_flips(tmp_path):
    write_images(tmp_path / "data", {"a": 4, "b": 3})
    files, labels, names = list_labeled_images([tmp_path / "data"])
    ae = StandInAE()
    index = plan(files, labels, names, ae)
    written = cache_latents(ae, index, tmp_path / "cache", batch_size=2)
    assert written == [0, 1, 2] and [s["count"] for s in index["shards"]] == [3, 3, 1]
    assert not list((tmp_path / "cache").glob(".*"))  # no temp files left behind
    stored = json.loads((tmp_path / "cache" / INDEX_NAME).read_text())
    assert stored["latent_shape"] == [3, 4, 4] and stored["class_names"] == ["a", "b"] and stored["count"] == 7
    assert stored["scaling_factor"] is None
    cache = load_latent_cache(tmp_path / "cache")
    assert cache.latents.shape == (14, 3, 4, 4)  # originals then mirrored copies
    assert cache.labels.tolist() == [0, 0, 0, 0, 1, 1, 1] * 2
    expected = torch.stack([F.avg_pool2d(load_cropped(f, 16)[None], 4)[0] for f in files])
    assert torch.allclose(cache.latents[:7], expected, atol=1e-6)
    assert torch.allclose(cache.latents[7:], expected.flip(-1), atol=1e-6)
    assert load_latent_cache(tmp_path / "cache", use_flip=False).latents.shape == (7, 3, 4, 4)


def test_ranks_split_shards_and_rerun_resumes(tmp_path):
    write_images(tmp_path / "data", {"": 8})
    files, labels, names = list_labeled_images([tmp_path / "data"])
    index = plan(files, labels, names)
    out = tmp_path / "cache"
    assert cache_latents(StandInAE(), index, out, rank=1, world_size=2) == [1]  # rank 1 does not write the index
    assert not (out / INDEX_NAME).exists()
    assert cache_latents(StandInAE(), index, out, rank=0, world_size=2) == [0, 2]
    with pytest.raises(DCAEError, match="cache incomplete"):
        (out / "shard-00002.safetensors").unlink()
        load_latent_cache(out)
    ae = StandInAE()
    assert cache_latents(ae, index, out) == [2]  # only the missing shard is encoded again
    assert ae.calls == 1
    assert torch.equal(load_latent_cache(out).labels, torch.zeros(16, dtype=torch.int64))
    assert cache_latents(ae, index, out) == [] and ae.calls == 1


def test_rerun_with_different_settings_is_refused(tmp_path):
    write_images(tmp_path / "data", {"": 3})
    files, labels, names = list_labeled_images([tmp_path / "data"])
    cache_latents(StandInAE(), plan(files, labels, names), tmp_path / "cache")
    with pytest.raises(DCAEError, match="resolution"):
        cache_latents(StandInAE(), plan(files, labels, names, resolution=32), tmp_path / "cache")
    with pytest.raises(DCAEError, match="not a multiple"):
        plan(files, labels, names, resolution=18)


def test_cli_cache_latents_with_tiny_preset(tmp_path, capsys):
    import dcae
    from dcae.cli import main

    write_images(tmp_path / "data", {"x": 2, "y": 1}, size=(40, 36))
    rc = main(["cache-latents", "--model", "dc-ae-tiny-f32c32", "--data", str(tmp_path / "data"), "-o",
               str(tmp_path / "cache"), "--resolution", "32", "--flip", "--device", "cpu", "--dtype", "fp32"])
    assert rc == 0  # fp32: compared with an fp32 encode below
    cache = load_latent_cache(tmp_path / "cache")
    assert cache.latents.shape == (6, 32, 1, 1) and cache.index["num_classes"] == 2
    torch.manual_seed(0)  # the CLI builds random presets with seed 0
    ae = dcae.create_model("dc-ae-tiny-f32c32").eval()
    with torch.no_grad():
        z = ae.encode(load_cropped(cache.index["files"][0], 32)[None])
    assert torch.allclose(cache.latents[0], z[0], atol=2e-3, rtol=1e-3)  # stored as float16
    assert "RANDOM weights" in capsys.readouterr().err
    rc = main(["cache-latents", "--model", "dc-ae-tiny-f32c32", "--data", str(tmp_path / "data"), "-o",
               str(tmp_path / "cache"), "--resolution", "64"])
    assert rc == 2 and "different resolution" in capsys.readouterr().err
