"""Reconstruction metrics as pure functions (PSNR, SSIM, FID, KID) plus accumulators that reduce across ranks.

Conventions follow efficientvit's DC-AE evaluator (`efficientvit/aecore/evaluator.py`): images are rounded through
uint8 first (`quantize`), PSNR and SSIM use data_range 1 on [0,1] images and are averaged per image (SSIM over the
valid window positions, as scikit-image does), FID uses the pytorch-fid formula on InceptionV3 pool3 features
(`dcae.perceptual.InceptionFeatures`). LPIPS lives in `dcae.perceptual.LPIPS`.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dcae.errors import DCAEError


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1,1] float images -> uint8, rounding half up like torchvision's save_image and efficientvit."""
    return (255 * ((x.float() + 1) / 2) + 0.5).clamp(0, 255).to(torch.uint8)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[-1,1] float images -> [0,1] float images that hold exactly the uint8 values a saved PNG would."""
    return to_uint8(x).float() / 255


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (B,3,H,W) images in [0,1] (data_range 1); identical images give inf."""
    mse = (a.double() - b.double()).square().mean(dim=(1, 2, 3))  # (B,)
    return 10 * torch.log10(1.0 / mse)  # torchmetrics' formula, data_range 1 (its import is slow)


def _gaussian_blur_valid(x: torch.Tensor, window: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian filter per channel, 'valid' region only (no padding): (B,C,H,W) -> (B,C,H-w+1,W-w+1)."""
    coords = torch.arange(window, dtype=x.dtype, device=x.device) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    c = x.shape[1]
    x = F.conv2d(x, g.view(1, 1, window, 1).expand(c, 1, window, 1), groups=c)
    return F.conv2d(x, g.view(1, 1, 1, window).expand(c, 1, 1, window), groups=c)


def ssim(a: torch.Tensor, b: torch.Tensor, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) of (B,3,H,W) images in [0,1]: Gaussian window 11/sigma 1.5, data_range 1.

    Averaged over the 'valid' window positions like the original MATLAB code, scikit-image and torchmetrics < 1.5
    (torchmetrics >= 1.5 also averages the reflect-padded border, which shifts values by ~1e-3 on 256px images).
    """
    window = 2 * int(3.5 * sigma + 0.5) + 1  # 11 for sigma 1.5, as scikit-image's truncate=3.5
    if min(a.shape[-2:]) < window:
        raise ValueError(f"ssim needs images of at least {window}x{window}, got {tuple(a.shape[-2:])}")
    a, b = a.double(), b.double()
    c1, c2 = k1**2, k2**2
    stats = _gaussian_blur_valid(torch.cat([a, b, a * a, b * b, a * b]), window, sigma).chunk(5)
    mu_a, mu_b, aa, bb, ab = stats
    var_a, var_b, cov = aa - mu_a**2, bb - mu_b**2, ab - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.mean(dim=(1, 2, 3))  # (B,)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), computed as pytorch-fid does."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"mean/covariance shapes differ: {mu1.shape} vs {mu2.shape}, {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # "Matrix is singular" is expected with few samples; the check below handles it
        warnings.simplefilter("ignore")
        covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():  # product almost singular (few samples): nudge both covariances
        warnings.warn(f"fid: singular covariance product; adding {eps} to the diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"fid: imaginary component {np.max(np.abs(covmean.imag))} in the covariance square root")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_from_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """Exact FID from raw features (n, D), for few samples (n <= D) where the covariances are singular.

    With sigma_i = A_i A_i^T (A_i the centred features / sqrt(n_i - 1), D x n_i), tr sqrt(sigma1 sigma2) equals the
    nuclear norm of A_2^T A_1, so no D x D matrix square root is needed (sqrtm is slow and inaccurate here).
    """
    f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    if min(len(f1), len(f2)) < 2:
        raise ValueError("fid: needs at least 2 samples in each set")
    a1 = (f1 - f1.mean(0)) / np.sqrt(len(f1) - 1)  # (n1, D)
    a2 = (f2 - f2.mean(0)) / np.sqrt(len(f2) - 1)  # (n2, D)
    diff = f1.mean(0) - f2.mean(0)
    tr_covmean = np.linalg.svd(a2 @ a1.T, compute_uv=False).sum()
    return float(diff.dot(diff) + (a1**2).sum() + (a2**2).sum() - 2 * tr_covmean)


def kernel_inception_distance(
    feats1: np.ndarray, feats2: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): unbiased MMD^2 with kernel (x.y/d + 1)^3 over random subsets; (mean, std)."""
    feats1, feats2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    n, d = min(len(feats1), len(feats2), max_subset_size), feats1.shape[1]
    if n < 2:
        raise ValueError("kid: needs at least 2 samples in each set")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        x = feats1[rng.choice(len(feats1), n, replace=False)]
        y = feats2[rng.choice(len(feats2), n, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (n * (n - 1))
        values.append(within - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


def sum_across_ranks(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """All-reduce (sum) float64 tensors when torch.distributed is initialised; identity otherwise."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(tensors)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    out = []
    for t in tensors:
        t = t.to(device).clone()
        dist.all_reduce(t)
        out.append(t.cpu())
    return out


class MeanAccumulator:
    """Running mean of per-image values (sum and count in float64) that can be summed across ranks."""

    def __init__(self):
        self.total = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().double().cpu().reshape(-1)
        self.total += values.sum()
        self.count += values.numel()

    def all_reduce(self) -> "MeanAccumulator":
        """Sum over all ranks in place; call once, on every rank."""
        self.total, self.count = sum_across_ranks(self.total, self.count)
        return self

    @property
    def mean(self) -> float:
        return float(self.total / self.count) if self.count > 0 else float("nan")


class FeatureStats:
    """Mean and covariance of feature vectors from running sums (float64), mergeable across ranks and cacheable.

    While n <= dim the raw features are kept too, so FID of small sets uses the exact low-rank formula.
    """

    def __init__(self, dim: int = 2048):
        self.dim = dim
        self.n = 0
        self.feature_sum = torch.zeros(dim, dtype=torch.float64)  # (D,)
        self.outer_sum = torch.zeros(dim, dim, dtype=torch.float64)  # (D, D)
        self.kept: list[torch.Tensor] | None = []  # raw (B, D) chunks on CPU; None once n > dim

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        f = torch.as_tensor(features).detach().double()  # (B, D)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (B, {self.dim}), got {tuple(f.shape)}")
        self.feature_sum = self.feature_sum.to(f.device) + f.sum(0)
        self.outer_sum = self.outer_sum.to(f.device) + f.T @ f
        self.n += f.shape[0]
        if self.kept is not None:
            self.kept = self.kept + [f.cpu()] if self.n <= self.dim else None

    @property
    def features(self) -> np.ndarray | None:
        """All features seen, (n, D), while n <= dim; else None."""
        if self.kept is None:
            return None
        return torch.cat(self.kept).numpy() if self.kept else np.zeros((0, self.dim))

    def all_reduce(self) -> "FeatureStats":
        """Sum over all ranks in place; call once, on every rank."""
        n = torch.tensor(float(self.n), dtype=torch.float64)
        n, self.feature_sum, self.outer_sum = sum_across_ranks(n, self.feature_sum, self.outer_sum)
        self.n = int(round(n.item()))
        if dist.is_available() and dist.is_initialized():
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.features if self.n <= self.dim else None)
            ok = self.n <= self.dim and all(g is not None for g in gathered)
            self.kept = [torch.from_numpy(np.concatenate(gathered))] if ok else None
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (D,), sigma (D,D)) with the unbiased covariance, like np.cov(features, rowvar=False)."""
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, have {self.n}")
        s, ss = self.feature_sum.cpu().numpy(), self.outer_sum.cpu().numpy()
        mu = s / self.n
        sigma = (ss - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, sigma

    def save(self, path: str | Path) -> None:
        """Write mu, sigma and n (+ the raw features while n <= dim) to .npz; mu/sigma are pytorch-fid's keys."""
        mu, sigma = self.mean_cov()
        extra = {"features": self.features} if self.features is not None else {}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, mu=mu, sigma=sigma, n=np.int64(self.n), **extra)
        tmp.replace(path)  # atomic: a crashed run never leaves a half-written cache file

    @classmethod
    def load(cls, path: str | Path) -> "FeatureStats":
        """Read a file written by `save` (needs n to rebuild the running sums)."""
        try:
            with np.load(path, allow_pickle=False) as data:
                mu, sigma, n = data["mu"], data["sigma"], int(data["n"])
                features = data["features"] if "features" in data else None
        except (OSError, KeyError, ValueError) as error:
            raise DCAEError(f"{path}: not a feature-statistics .npz with mu, sigma and n ({error})") from error
        stats = cls(dim=mu.shape[0])
        stats.n = n
        stats.feature_sum = torch.from_numpy(mu * n)
        stats.outer_sum = torch.from_numpy(sigma * (n - 1) + n * np.outer(mu, mu))
        stats.kept = [torch.from_numpy(features)] if features is not None and len(features) == n else None
        return stats


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """FID between two accumulated feature sets (exact low-rank formula while both are small, else sqrtm)."""
    fa, fb = a.features, b.features
    if fa is not None and fb is not None:
        return frechet_distance_from_features(fa, fb)
    return frechet_distance(*a.mean_cov(), *b.mean_cov())


def adm_center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3,H,W) uint8 -> (3,size,size) uint8 as guided-diffusion's `center_crop_arr` (the DC-AE evaluation crop).

    Halve with BOX filtering while the short side is >= 2*size, BICUBIC-resize the short side to `size`, crop the
    centre. Works through PIL so the result is bit-identical to ADM/efficientvit preprocessing.
    """
    from PIL import Image

    pil = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    while min(*pil.size) >= 2 * size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
    scale = size / min(*pil.size)
    pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
    arr = np.asarray(pil)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return torch.from_numpy(np.array(arr[top : top + size, left : left + size])).permute(2, 0, 1)  # (3, size, size)
