"""The latent cache: a dataset encoded once into safetensors shards plus a JSON index, read back for training.

Layout of a cache folder:
  index.json                 what the cache holds (see `write_index`); written first, by rank 0
  shard-00000.safetensors    tensors latents (n, c, h, w), latents_flip (n, c, h, w) if flipped copies were asked for,
                             labels (n,) int64, indices (n,) int64 (positions in the index's file list)
A shard exists only once complete (written under a temporary name, then os.replace), so a rerun after a crash
encodes only the shards that are missing. Shard k holds images [k * shard_size, (k + 1) * shard_size) of the sorted
file list; under torchrun, rank r encodes the shards k with k % world_size == r.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dcae.errors import DCAEError, write_failure
from dcae.images import find_images, read_image, to_model_range
from dcae.metrics import adm_center_crop

INDEX_NAME = "index.json"
CACHE_FORMAT = "dcae-latent-cache"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# What must agree between an existing cache and a rerun that would add shards to it.
_PLAN_KEYS = ("files", "labels", "class_names", "resolution", "flip", "dtype", "shard_size", "latent_shape",
              "autoencoder_config_hash")


def list_labeled_images(roots: list[str | os.PathLike]) -> tuple[list[Path], list[int], list[str]]:
    """Image folders -> (files, labels, class_names). The class is the top-level folder under a root; the images of a
    flat root (no class folders) form the class '' (class 0 when it is the only one). Class names are sorted."""
    entries: list[tuple[Path, str]] = []
    for root in roots:
        if not Path(root).is_dir():
            raise DCAEError(f"{root}: not a folder of images")
        found = find_images([root])
        if not found:
            raise DCAEError(f"{root}: no images found")
        classes = {rel.parts[0] if len(rel.parts) > 1 else "" for _, rel in found}
        if "" in classes and len(classes) > 1:
            loose = next(rel for _, rel in found if len(rel.parts) == 1)
            raise DCAEError(f"{root}: images both in class folders and at the top level (e.g. {loose}); "
                            f"move the top-level ones into a folder")
        entries += [(path, rel.parts[0] if len(rel.parts) > 1 else "") for path, rel in found]
    class_names = sorted({name for _, name in entries})
    class_of = {name: i for i, name in enumerate(class_names)}
    return [path for path, _ in entries], [class_of[name] for _, name in entries], class_names


def load_cropped(path: str | os.PathLike, resolution: int) -> torch.Tensor:
    """Image file -> (3, R, R) float in [-1, 1]: RGB, EXIF-rotated, shorter side resized and centre-cropped (ADM)."""
    return to_model_range(adm_center_crop(read_image(path), resolution))


def autoencoder_config_hash(autoencoder: torch.nn.Module) -> str:
    """sha256 of the autoencoder's JSON config (the first 16 hex digits): which latent space a cache lives in."""
    config = autoencoder.config_dict() if hasattr(autoencoder, "config_dict") else {"repr": repr(autoencoder)}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then rename onto `path`; a failure (full disk, read-only folder) removes tmp, raises DCAEError."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as error:
        tmp.unlink(missing_ok=True)
        raise DCAEError(f"{path}: cannot write: {write_failure(error, path.parent)}") from None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def plan_cache(files: list[Path], labels: list[int], class_names: list[str], autoencoder: torch.nn.Module,
               resolution: int, flip: bool, dtype: str, shard_size: int, autoencoder_source: str) -> dict[str, Any]:
    """The index of the cache these inputs make (nothing is encoded yet)."""
    factor, channels = int(autoencoder.spatial_factor), int(autoencoder.latent_channels)
    if resolution % factor:
        raise DCAEError(f"--resolution {resolution} is not a multiple of the autoencoder's spatial factor {factor}")
    if dtype not in STORAGE_DTYPES:
        raise DCAEError(f"unknown storage dtype {dtype!r}; choose from {', '.join(STORAGE_DTYPES)}")
    counts = [min(shard_size, len(files) - start) for start in range(0, len(files), shard_size)]
    config = getattr(autoencoder, "config", None)
    return {
        "format": CACHE_FORMAT,
        "version": 1,
        "count": len(files),
        "class_names": class_names,
        "num_classes": len(class_names),
        "latent_shape": [channels, resolution // factor, resolution // factor],
        "resolution": resolution,
        "flip": flip,
        "dtype": dtype,
        "shard_size": shard_size,
        "shards": [{"file": shard_name(k), "count": n} for k, n in enumerate(counts)],
        "scaling_factor": getattr(config, "scaling_factor", None),  # None: unpublished; training estimates 1/std
        "autoencoder": {"source": autoencoder_source, "name": getattr(config, "name", type(autoencoder).__name__),
                        "spatial_factor": factor, "latent_channels": channels},
        "autoencoder_config_hash": autoencoder_config_hash(autoencoder),
        "files": [str(path) for path in files],
        "labels": labels,
    }


def read_index(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / INDEX_NAME
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise DCAEError(f"{path}: no latent cache index here (write one with `dcae cache-latents`)") from None
    except (OSError, json.JSONDecodeError) as error:
        raise DCAEError(f"{path}: cannot read the cache index: {error}") from None
    if index.get("format") != CACHE_FORMAT:
        raise DCAEError(f"{path}: not a dcae latent cache index")
    return index


def write_or_check_index(directory: Path, index: dict[str, Any], write: bool) -> None:
    """Write the index (rank 0), or, where one exists, refuse to mix caches that differ in what they encode."""
    path = directory / INDEX_NAME
    if path.exists():
        old = read_index(directory)
        changed = [key for key in _PLAN_KEYS if old.get(key) != index.get(key)]
        if changed:
            raise DCAEError(f"{directory}: holds a cache made with different {', '.join(changed)}; "
                            f"use another output folder or delete this one")
        return
    if write:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(index, indent=1))


@torch.no_grad()
def encode_shard(autoencoder: torch.nn.Module, files: list[Path], resolution: int, flip: bool, batch_size: int,
                 device: torch.device, dtype: torch.dtype,
                 autocast: Callable[[], Any] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Files -> latents (n, c, h, w) and, if flip, the latents of the mirrored images, stored as `dtype` on CPU."""
    latents, flipped = [], []
    for start in range(0, len(files), batch_size):
        x = torch.stack([load_cropped(f, resolution) for f in files[start:start + batch_size]]).to(device)  # (B,3,R,R)
        if flip:
            x = torch.cat([x, x.flip(-1)])  # one pass for both
        with autocast() if autocast is not None else contextlib.nullcontext():
            z = autoencoder.encode(x).float()  # (B or 2B, c, h, w)
        z = z.to("cpu", dtype)
        n = len(files[start:start + batch_size])
        latents.append(z[:n])
        if flip:
            flipped.append(z[n:])
    return torch.cat(latents), (torch.cat(flipped) if flip else None)


def cache_latents(autoencoder: torch.nn.Module, index: dict[str, Any], out: str | os.PathLike, batch_size: int = 16,
                  rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                  autocast: Callable[[], Any] | None = None,
                  progress: Callable[[int], None] | None = None) -> list[int]:
    """Encode this rank's missing shards of the planned cache into `out`; returns the shard numbers it wrote."""
    out, device = Path(out), torch.device(device)
    write_or_check_index(out, index, write=rank == 0)
    out.mkdir(parents=True, exist_ok=True)
    files, labels = [Path(f) for f in index["files"]], torch.tensor(index["labels"], dtype=torch.int64)
    written = []
    for k, shard in enumerate(index["shards"]):
        if k % world_size != rank or (out / shard["file"]).exists():
            continue
        start = k * index["shard_size"]
        stop = start + shard["count"]
        latents, flipped = encode_shard(autoencoder, files[start:stop], index["resolution"], index["flip"], batch_size,
                                        device, STORAGE_DTYPES[index["dtype"]], autocast)
        tensors = {"latents": latents.contiguous(), "labels": labels[start:stop].clone(),
                   "indices": torch.arange(start, stop, dtype=torch.int64)}
        if flipped is not None:
            tensors["latents_flip"] = flipped.contiguous()
        metadata = {"shard": str(k), "autoencoder_config_hash": index["autoencoder_config_hash"]}
        atomic_write(out / shard["file"], lambda tmp: save_file(tensors, tmp, metadata=metadata))
        written.append(k)
        if progress is not None:
            progress(shard["count"])
    return written


@dataclass
class LatentCache:
    """A cache read into memory: `latents` (M, c, h, w) float32 (flipped copies appended when used), `labels` (M,)."""

    index: dict[str, Any]
    latents: torch.Tensor
    labels: torch.Tensor


def load_latent_cache(directory: str | os.PathLike, use_flip: bool = True) -> LatentCache:
    """Read every shard of a complete cache (flipped copies appended after the originals if use_flip)."""
    directory = Path(directory)
    index = read_index(directory)
    missing = [s["file"] for s in index["shards"] if not (directory / s["file"]).exists()]
    if missing:
        raise DCAEError(f"{directory}: cache incomplete, {len(missing)} of {len(index['shards'])} shards missing "
                        f"(first {missing[0]}); run the same `dcae cache-latents` command again to finish it")
    latents, flipped, labels = [], [], []
    for shard in index["shards"]:
        path = directory / shard["file"]
        with safe_open(str(path), framework="pt") as f:
            if f.metadata().get("autoencoder_config_hash") != index["autoencoder_config_hash"]:
                raise DCAEError(f"{path}: shard was written by another autoencoder than {INDEX_NAME} names")
            latents.append(f.get_tensor("latents").float())
            labels.append(f.get_tensor("labels"))
            if use_flip and index["flip"]:
                flipped.append(f.get_tensor("latents_flip").float())
    latents_t, labels_t = torch.cat(latents), torch.cat(labels)
    if flipped:
        latents_t, labels_t = torch.cat([latents_t, torch.cat(flipped)]), torch.cat([labels_t, labels_t])
    if list(latents_t.shape[1:]) != index["latent_shape"]:
        raise DCAEError(f"{directory}: shards hold latents of shape {list(latents_t.shape[1:])}, "
                        f"the index says {index['latent_shape']}")
    return LatentCache(index=index, latents=latents_t, labels=labels_t)


def estimate_scaling_factor(latents: torch.Tensor) -> float:
    """1 / std of all latent values: what makes unpublished latents unit-variance (as SD's 0.18215 was found)."""
    return float(1.0 / latents.double().std())
