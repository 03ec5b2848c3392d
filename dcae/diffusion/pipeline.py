"""From a trained diffusion checkpoint to images and gFID: noise -> latents -> autoencoder decode -> uint8 -> Inception."""
from __future__ import annotations

import math
import os
from typing import Callable

import torch
import torch.nn as nn

from dcae.diffusion.objectives import EpsilonPrediction, FlowMatching
from dcae.diffusion.samplers import generate
from dcae.errors import DCAEError


def sample_noise(n: int, latent_shape: list[int] | tuple[int, ...], seed: int) -> torch.Tensor:
    """(n, C, H, W) standard normal from one CPU generator: sample i is the same whatever the batch size or device."""
    return torch.randn(n, *latent_shape, generator=torch.Generator().manual_seed(seed))


def sample_labels(n: int, num_classes: int, seed: int, class_index: int | None = None) -> torch.Tensor | None:
    """One class for all (class_index), else uniform random classes (seeded), or None for an unconditional model."""
    if num_classes == 0:
        return None
    if class_index is not None:
        return torch.full((n,), class_index, dtype=torch.int64)
    return torch.randint(num_classes, (n,), generator=torch.Generator().manual_seed(seed + 1))


@torch.no_grad()
def sample_images(net: nn.Module, autoencoder: nn.Module, objective: FlowMatching | EpsilonPrediction,
                  noise: torch.Tensor, labels: torch.Tensor | None, scaling_factor: float, cfg_scale: float = 1.0,
                  sampler: str | None = None, steps: int | None = None, batch_size: int = 16,
                  device: torch.device | str = "cpu", on_batch: Callable[[int, torch.Tensor], None] | None = None
                  ) -> torch.Tensor:
    """Noise (N, C, H, W) -> decoded images (N, 3, H*f, W*f) float in about [-1, 1], on CPU.

    on_batch(start, images) sees each decoded batch as it is ready (to write files while sampling goes on).
    """
    null_class = getattr(net, "null_class", None)
    out = []
    for start in range(0, len(noise), batch_size):
        z = noise[start:start + batch_size].to(device)
        y = labels[start:start + batch_size].to(device) if labels is not None else None
        latents = generate(net, objective, z, y, cfg_scale=cfg_scale, null_class=null_class, sampler=sampler,
                           steps=steps)
        images = autoencoder.decode(latents / scaling_factor).float().cpu()  # (b, 3, H*f, W*f)
        if on_batch is not None:
            on_batch(start, images)
        out.append(images)
    return torch.cat(out)


def image_grid(images: torch.Tensor, columns: int | None = None) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> one (3, rows*H, columns*W) uint8 grid, row-major, black where a row runs short."""
    n, c, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = torch.zeros(c, rows * h, columns * w, dtype=images.dtype)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[:, r * h:(r + 1) * h, col * w:(col + 1) * w] = image
    return grid


@torch.no_grad()
def inception_stats(images: torch.Tensor, inception: nn.Module, batch_size: int = 32,
                    device: torch.device | str = "cpu"):
    """uint8 (N, 3, H, W) -> dcae.metrics.FeatureStats of InceptionV3 pool3 features."""
    from dcae.metrics import FeatureStats

    stats = FeatureStats(2048)
    for start in range(0, len(images), batch_size):
        stats.update(inception(images[start:start + batch_size].to(device)).cpu())
    return stats


def reference_images(folder: str | os.PathLike, resolution: int, limit: int | None = None) -> torch.Tensor:
    """A folder's images, ADM centre-cropped to `resolution`: uint8 (N, 3, R, R), sorted by name."""
    from dcae.images import find_images, read_image
    from dcae.metrics import adm_center_crop

    files = [path for path, _ in find_images([folder])][:limit]
    if len(files) < 2:
        raise DCAEError(f"{folder}: gFID needs at least 2 reference images, found {len(files)}")
    return torch.stack([adm_center_crop(read_image(f), resolution) for f in files])


def gfid(generated: torch.Tensor, reference_folder: str | os.PathLike, device: torch.device | str = "cpu",
         reference_limit: int | None = None) -> tuple[float, int]:
    """FID between generated uint8 images and a folder's images, centre-cropped to the same size:
    (fid, number of reference images). Needs dcae.perceptual's InceptionV3."""
    from dcae.metrics import fid_from_stats
    from dcae.perceptual import InceptionFeatures

    if len(generated) < 2:
        raise DCAEError("gFID needs at least 2 generated images (-n 2 or more)")
    inception = InceptionFeatures().to(device)
    reference = reference_images(reference_folder, generated.shape[-1], reference_limit)
    score = fid_from_stats(inception_stats(generated, inception, device=device),
                           inception_stats(reference, inception, device=device))
    return score, len(reference)
