"""PSNR/SSIM against scikit-image, FID/KID maths, accumulators (including a 2-process all-reduce), ADM crop."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image, ImageFilter

from dcae.metrics import (
    FeatureStats,
    MeanAccumulator,
    adm_center_crop,
    fid_from_stats,
    frechet_distance,
    frechet_distance_from_features,
    kernel_inception_distance,
    psnr,
    quantize,
    ssim,
    to_uint8,
)
from dcae.perceptual import InceptionFeatures

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KODAK = DATA / "kodak24"


def kodak_crop(index: int, size: int, top: int = 0, left: int = 0) -> Image.Image:
    if not KODAK.exists():
        pytest.skip("shared data missing")
    return Image.open(KODAK / f"kodim{index:02d}.png").convert("RGB").crop((left, top, left + size, top + size))


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(buffer).convert("RGB")


def noisy(image: Image.Image, std: float, seed: int = 0) -> Image.Image:
    array = np.asarray(image).astype(np.float64) + np.random.default_rng(seed).normal(0, std, (*image.size[::-1], 3))
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))


def as01(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255  # (1, 3, H, W)


def as_uint8(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])  # (B, 3, H, W)


@pytest.mark.parametrize("distortion", ["blur", "noise", "jpeg"])
def test_psnr_ssim_match_scikit_image(distortion):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    ref = kodak_crop(5, 256, 100, 200)
    distorted = {"blur": ref.filter(ImageFilter.GaussianBlur(1.5)), "noise": noisy(ref, 12), "jpeg": jpeg(ref, 20)}
    out = distorted[distortion]
    a, b = np.asarray(ref) / 255.0, np.asarray(out) / 255.0
    expected_psnr = peak_signal_noise_ratio(a, b, data_range=1)
    expected_ssim = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                          data_range=1, channel_axis=2)
    x, y = as01(ref), as01(out)
    assert abs(psnr(x, y).item() - expected_psnr) < 1e-3
    assert abs(ssim(x, y).item() - expected_ssim) < 1e-3


def test_psnr_ssim_are_per_image():
    a = torch.rand(3, 3, 32, 32)
    b = (a + 0.05 * torch.randn_like(a)).clamp(0, 1)
    assert psnr(a, b).shape == (3,) and ssim(a, b).shape == (3,)
    assert torch.allclose(psnr(a, b)[1], psnr(a[1:2], b[1:2])[0])
    assert torch.isinf(psnr(a, a)).all()
    assert torch.allclose(ssim(a, a), torch.ones(3, dtype=torch.float64))


def test_quantize_rounds_through_uint8_like_efficientvit():
    x = torch.linspace(-1.2, 1.2, 1001)
    expected = (255 * ((x + 1) / 2) + 0.5).clamp(0, 255).to(torch.uint8)  # efficientvit's evaluator
    assert torch.equal(to_uint8(x), expected)
    assert torch.equal(quantize(x), expected.float() / 255)
    levels = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8((levels.float() / 255 - 0.5) / 0.5), levels)  # round trip of stored pixels


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.2, 3, 6), rng.uniform(0.2, 3, 6)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0, abs=1e-9)


@pytest.mark.parametrize("n", [10, 40])  # rank-deficient (n < D) and full-rank covariances
def test_low_rank_fid_matches_sqrtm(n):
    rng = np.random.default_rng(n)
    f = rng.normal(size=(n, 16))
    g = rng.normal(size=(n + 3, 16)) * 1.3 + 0.2
    a, b = FeatureStats(16), FeatureStats(16)
    a.update(torch.from_numpy(f[:4]))
    a.update(f[4:])
    b.update(g)
    mu, sigma = a.mean_cov()
    assert np.allclose(mu, f.mean(0)) and np.allclose(sigma, np.cov(f, rowvar=False))
    exact = frechet_distance_from_features(f, g)
    assert exact == pytest.approx(frechet_distance(*a.mean_cov(), *b.mean_cov()), rel=1e-6)
    assert fid_from_stats(a, b) == pytest.approx(exact, rel=1e-6)


def test_feature_stats_save_load(tmp_path):
    rng = np.random.default_rng(1)
    for n in (5, 40):  # with and without the kept raw features
        stats = FeatureStats(16)
        stats.update(rng.normal(size=(n, 16)))
        stats.save(tmp_path / f"s{n}.npz")
        loaded = FeatureStats.load(tmp_path / f"s{n}.npz")
        assert loaded.n == n and (loaded.features is None) == (n > 16)
        for x, y in zip(stats.mean_cov(), loaded.mean_cov()):
            assert np.allclose(x, y, atol=1e-12)
        with np.load(tmp_path / f"s{n}.npz") as data:  # readable by pytorch-fid-style code
            assert set(data.files) >= {"mu", "sigma"}


@pytest.fixture(scope="module")
def inception() -> InceptionFeatures:
    return InceptionFeatures()


def test_fid_with_inception_zero_for_identical_and_monotone_in_distortion(inception):
    crops = [kodak_crop(i, 128, 160, 240) for i in (3, 7, 21)]
    light = [im.filter(ImageFilter.GaussianBlur(0.6)) for im in crops]
    heavy = [im.filter(ImageFilter.GaussianBlur(4)) for im in crops]
    stats = {}
    for name, images in {"ref": crops, "light": light, "heavy": heavy}.items():
        stats[name] = FeatureStats()
        stats[name].update(inception(as_uint8(images)))
    assert abs(fid_from_stats(stats["ref"], stats["ref"])) < 1e-6
    fid_light, fid_heavy = fid_from_stats(stats["ref"], stats["light"]), fid_from_stats(stats["ref"], stats["heavy"])
    assert 0 < fid_light < fid_heavy


def test_kid_near_zero_for_same_distribution_and_positive_for_shift():
    rng = np.random.default_rng(0)
    f, g = rng.normal(size=(200, 32)), rng.normal(size=(200, 32))
    same, _ = kernel_inception_distance(f, g, num_subsets=20, max_subset_size=100)
    shifted, std = kernel_inception_distance(f, g + 0.5, num_subsets=20, max_subset_size=100)
    assert abs(same) < 0.05 < shifted
    assert std >= 0


def test_mean_accumulator():
    acc = MeanAccumulator()
    acc.update(torch.tensor([1.0, 2.0]))
    acc.update(torch.tensor([6.0]))
    assert acc.mean == pytest.approx(3.0) and acc.all_reduce().mean == pytest.approx(3.0)  # no-op without a group


def _all_reduce_worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        rng = np.random.default_rng(rank)
        feats = rng.normal(size=(3 + rank, 8))
        acc, stats = MeanAccumulator(), FeatureStats(8)
        acc.update(torch.arange(3 + rank, dtype=torch.float64) + 10 * rank)
        stats.update(feats)
        acc.all_reduce()
        stats.all_reduce()
        mu, sigma = stats.mean_cov()
        np.savez(f"{out}{rank}.npz", mean=acc.mean, n=stats.n, mu=mu, sigma=sigma, features=stats.features)
    finally:
        dist.destroy_process_group()


def test_all_reduce_across_two_processes(tmp_path):
    mp.spawn(_all_reduce_worker, args=(str(tmp_path / "store"), str(tmp_path / "rank")), nprocs=2, join=True)
    feats = np.concatenate([np.random.default_rng(r).normal(size=(3 + r, 8)) for r in (0, 1)])
    values = np.concatenate([np.arange(3), np.arange(4) + 10])
    for rank in (0, 1):
        with np.load(tmp_path / f"rank{rank}.npz") as data:
            assert data["mean"] == pytest.approx(values.mean())
            assert int(data["n"]) == 7
            assert np.allclose(data["mu"], feats.mean(0)) and np.allclose(data["sigma"], np.cov(feats, rowvar=False))
            assert np.allclose(data["features"], feats)


def test_adm_center_crop_box_halves_then_crops():
    image = kodak_crop(1, 512)  # 512x512: halved three times to 64 (BOX), then no bicubic change, centre crop
    array = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    out = adm_center_crop(array, 64)
    assert out.shape == (3, 64, 64) and out.dtype == torch.uint8
    block_mean = array.double().reshape(3, 64, 8, 64, 8).mean(dim=(2, 4))  # 8x8 box average
    error = (out.double() - block_mean).abs()
    assert error.max() <= 3 and error.mean() < 2  # PIL's fixed-point BOX rounds up a little at each of its 3 steps;
    # a crop misplaced by 4 source pixels would differ by ~8 on average
    wide = torch.zeros(3, 100, 300, dtype=torch.uint8)
    wide[:, :, 100:200] = 255  # the centre third is white
    crop = adm_center_crop(wide, 50)  # 100x300 -> halve to 50x150 -> centre 50x50 is all white
    assert crop.shape == (3, 50, 50) and (crop == 255).all()
