"""Training data: deterministic crops and order, resume positions, rank sharding, bad images, tar shards."""
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcae.data import (
    DataConfig,
    SkippedImage,
    TrainStream,
    center_crop,
    expand_shards,
    is_shard_spec,
    load_validation_images,
    random_crop,
    resize_shorter_side,
)
from dcae.errors import DCAEError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BSDS_VAL = DATA / "bsds500" / "val"


def _write(path: Path, size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path):
    """Eight random 80x72 images in a nested folder."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for i in range(8):
        _write((root / "sub" if i % 2 else root) / f"{i}.png", (80, 72), i)
    return root


def _batches(cfg, n, resolution=32, batch=2, seed=0, rank=0, world=1, state=None):
    stream = TrainStream(cfg, resolution, batch, seed, rank, world, state)
    try:
        return [next(stream) for _ in range(n)], stream.state_dict()
    finally:
        stream.close()


def test_random_crop_is_deterministic_and_upscales_small_images():
    image = torch.randint(0, 256, (3, 50, 40), dtype=torch.uint8)
    a = random_crop(image, 48, np.random.default_rng([1, 2]), hflip=True, min_size=32)
    b = random_crop(image, 48, np.random.default_rng([1, 2]), hflip=True, min_size=32)
    assert a.shape == (3, 48, 48) and a.dtype == torch.uint8 and torch.equal(a, b)
    up = resize_shorter_side(image, 48)
    assert min(up.shape[-2:]) == 48 and up.shape[-2] == 60  # aspect ratio kept
    with pytest.raises(SkippedImage):
        random_crop(image, 48, np.random.default_rng(0), hflip=False, min_size=41)
    crops = {random_crop(image, 40, np.random.default_rng(s), True, 8).flip(-1).equal(image[:, :40, :40])
             for s in range(40)}
    assert crops == {True, False}  # flips happen, and not always


def test_center_crop():
    image = torch.arange(3 * 6 * 8, dtype=torch.uint8).reshape(3, 6, 8)
    torch.testing.assert_close(center_crop(image, 4), image[:, 1:5, 2:6])


def test_folder_stream_is_deterministic_resumable_and_worker_independent(folder):
    cfg = DataConfig(path=str(folder), num_workers=0)
    first, state = _batches(cfg, 6)
    assert state == {"kind": "folder", "position": 12}
    x, skipped = first[0]
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32 and skipped == 0
    assert -1.0 <= x.min() and x.max() <= 1.0
    again, _ = _batches(cfg, 6)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    resumed, _ = _batches(cfg, 3, state={"kind": "folder", "position": 6})  # after 3 batches of 2
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first[3:], resumed))
    other_seed, _ = _batches(cfg, 1, seed=1)
    assert not torch.equal(first[0][0], other_seed[0][0])
    # Epochs: 8 images, 12 samples -> every image once in the first epoch (no duplicates within 4 batches).
    epoch = torch.cat([b[0] for b in first[:4]])
    assert len({tuple(img.flatten()[:64].tolist()) for img in epoch}) == 8


def test_folder_stream_with_worker_processes_matches(folder):
    serial, _ = _batches(DataConfig(path=str(folder), num_workers=0), 4)
    workers, _ = _batches(DataConfig(path=str(folder), num_workers=2), 4)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(serial, workers))


def test_ranks_split_the_global_batch(folder):
    """Two ranks of batch 2 see exactly the images one process of batch 4 sees (same crops)."""
    cfg = DataConfig(path=str(folder), num_workers=0)
    single, _ = _batches(cfg, 3, batch=4)
    rank0, _ = _batches(cfg, 3, batch=2, rank=0, world=2)
    rank1, _ = _batches(cfg, 3, batch=2, rank=1, world=2)
    for (s, _), (r0, _), (r1, _) in zip(single, rank0, rank1):
        torch.testing.assert_close(s[0::2], r0, rtol=0, atol=0)  # interleaved like DistributedSampler
        torch.testing.assert_close(s[1::2], r1, rtol=0, atol=0)


def test_bad_and_small_images_are_skipped_and_counted(folder):
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    (folder / "empty.png").write_bytes(b"")
    _write(folder / "tiny.png", (10, 12), 99)  # below min_size: skipped
    _write(folder / "small.png", (40, 36), 98)  # above min_size, below the crop: upscaled and used
    cfg = DataConfig(path=str(folder), num_workers=0, min_size=16)
    batches, _ = _batches(cfg, 12, resolution=48)  # 12 images, 24 samples: two epochs
    assert all(x.shape == (2, 3, 48, 48) for x, _ in batches)
    assert sum(s for _, s in batches) >= 2 * 3  # three unusable files, met at least once per epoch


def test_all_bad_folder_stops_with_a_message(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"garbage")
    with pytest.raises(DCAEError, match="could not be used"):
        _batches(DataConfig(path=str(tmp_path), num_workers=0, max_retries=3), 1)
    with pytest.raises(DCAEError, match="no such folder"):
        _batches(DataConfig(path=str(tmp_path / "nothing"), num_workers=0), 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DCAEError, match="no images"):
        _batches(DataConfig(path=str(tmp_path / "empty"), num_workers=0), 1)


def _make_shards(root: Path, n_shards: int, per_shard: int, extra: dict[str, bytes] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    k = 0
    for s in range(n_shards):
        with tarfile.open(root / f"shard-{s:03d}.tar", "w") as tar:
            members = {}
            for _ in range(per_shard):
                buffer = io.BytesIO()
                rng = np.random.default_rng(k)
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buffer, format="PNG")
                members[f"sample{k:05d}.png"] = buffer.getvalue()
                members[f"sample{k:05d}.cls"] = b"0"
                k += 1
            if s == 0 and extra:
                members.update(extra)
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return root


def test_shard_specs(tmp_path):
    root = _make_shards(tmp_path / "shards", 3, 2)
    assert is_shard_spec(str(root)) and is_shard_spec(str(root / "shard-000.tar"))
    assert is_shard_spec(str(root) + "/shard-{000..002}.tar")
    assert len(expand_shards(str(root) + "/shard-{000..002}.tar")) == 3
    assert expand_shards(str(root)) == sorted(str(p) for p in root.glob("*.tar"))
    assert not is_shard_spec(str(BSDS_VAL))


def test_shards_stream_without_extracting_and_resume_exactly(tmp_path, monkeypatch):
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    evil = {"../escaped.png": b"x", "/tmp/dcae_absolute_member.png": b"y", "corrupt.png": b"not png"}
    root = _make_shards(tmp_path / "shards", 3, 3, extra=evil)
    cfg = DataConfig(path=str(root), num_workers=0, min_size=16)
    batches, state = _batches(cfg, 7, resolution=32)
    assert all(x.shape == (2, 3, 32, 32) for x, _ in batches)
    assert sum(s for _, s in batches) >= 3  # the three bad members, each counted
    assert not (tmp_path / "escaped.png").exists() and not os.path.exists("/tmp/dcae_absolute_member.png")
    assert list(workdir.iterdir()) == []
    assert state["kind"] == "shards" and len(state["streams"]) == 1
    # Resume after 3 batches gives batches 4.. exactly.
    _, mid = _batches(cfg, 3, resolution=32)
    resumed, _ = _batches(cfg, 4, resolution=32, state=mid)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches[3:], resumed))


def test_shards_with_workers_resume_exactly(tmp_path):
    root = _make_shards(tmp_path / "shards", 4, 3)
    cfg = DataConfig(path=str(root), num_workers=2)
    batches, _ = _batches(cfg, 6, resolution=32)
    _, mid = _batches(cfg, 3, resolution=32)
    assert mid["next"] == 1  # batch 4 comes from stream 1
    resumed, _ = _batches(cfg, 3, resolution=32, state=mid)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches[3:], resumed))
    with pytest.raises(DCAEError, match="num_workers"):
        TrainStream(DataConfig(path=str(root), num_workers=3), 32, 2, 0, state=mid)


def test_validation_images_are_center_crops():
    cfg = DataConfig(val_path=str(BSDS_VAL), val_images=3)
    images = load_validation_images(cfg, 64)
    assert images.shape == (3, 3, 64, 64) and images.min() >= -1 and images.max() <= 1
    assert load_validation_images(DataConfig(), 64).shape == (0, 3, 64, 64)
