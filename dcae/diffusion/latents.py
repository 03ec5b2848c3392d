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
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dcae.config import is_integer
from dcae.errors import DCAEError, first_line
from dcae.files import atomic_write, atomic_write_text
from dcae.images import find_images, read_image, to_model_range
from dcae.latent_file import autoencoder_config_hash
from dcae.metrics import adm_center_crop
from dcae.tiling import available_memory

INDEX_NAME = "index.json"
CACHE_FORMAT = "dcae-latent-cache"
HASH_DIGITS = 16  # of the autoencoder's config hash, in the index, every shard and diffusion checkpoints
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


def cache_hash(autoencoder: torch.nn.Module) -> str:
    """The autoencoder's config hash, first HASH_DIGITS hex digits: which latent space a cache (and a diffusion model
    trained on it) lives in."""
    return autoencoder_config_hash(autoencoder, HASH_DIGITS)


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
                        "spatial_factor": factor, "latent_channels": channels,
                        # whether any k-channel prefix decodes (train-diffusion --latent-channels); null: unknown
                        "structured_latent": getattr(config, "structured_latent", None)},
        "autoencoder_config_hash": cache_hash(autoencoder),
        "files": [str(path) for path in files],
        "labels": labels,
    }


MAX_INDEX_BYTES = 256 * 2**20  # an index lists every file: 1M files fit; a bigger "index" is not one


def read_index(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and validate `directory/index.json` -> the index; anything malformed is a one-line DCAEError."""
    path = Path(directory) / INDEX_NAME
    try:
        if path.stat().st_size > MAX_INDEX_BYTES:
            raise DCAEError(f"{path}: {path.stat().st_size} bytes, larger than any cache index")
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise DCAEError(f"{path}: no latent cache index here (write one with `dcae cache-latents`)") from None
    except (OSError, ValueError, RecursionError) as error:  # ValueError: bad JSON or bad UTF-8
        raise DCAEError(f"{path}: cannot read the cache index: {first_line(error)}") from None
    if not isinstance(index, dict) or index.get("format") != CACHE_FORMAT:
        raise DCAEError(f"{path}: not a dcae latent cache index")
    problem = _index_problem(index)
    if problem:
        raise DCAEError(f"{path}: bad cache index: {problem}")
    return index


def _index_problem(index: dict[str, Any]) -> str | None:
    """What is wrong with a parsed index (types, ranges, shard names, counts), or None."""
    shape = index.get("latent_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(is_integer(v, 1, 2**20) for v in shape)):
        return "latent_shape must be three positive integers"
    if not is_integer(index.get("count")) or not is_integer(index.get("shard_size"), 1):
        return "count and shard_size must be non-negative integers (shard_size positive)"
    if not isinstance(index.get("dtype"), str) or index["dtype"] not in STORAGE_DTYPES or \
            not isinstance(index.get("flip"), bool):
        return f"dtype must be one of {', '.join(STORAGE_DTYPES)} and flip a boolean"
    if not is_integer(index.get("resolution"), 1, 2**20):
        return "resolution must be a positive integer"
    names = index.get("class_names")
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)) or \
            index.get("num_classes") != len(names):
        return "class_names must be a list of strings and num_classes its length"
    labels = index.get("labels")
    if not (isinstance(labels, list) and len(labels) == index["count"]
            and all(is_integer(v, 0, max(len(names) - 1, 0)) for v in labels)):
        return "labels must hold one class number in [0, num_classes) per image"
    files = index.get("files")
    if not (isinstance(files, list) and len(files) == index["count"] and all(isinstance(f, str) for f in files)):
        return "files must list one path per image"
    shards = index.get("shards")
    if not isinstance(shards, list) or not all(isinstance(sh, dict) for sh in shards):
        return "shards must be a list of {file, count}"
    for k, shard in enumerate(shards):
        if shard.get("file") != shard_name(k):  # names are fixed: an index cannot point outside its folder
            return f"shard {k} must be named {shard_name(k)}, not {str(shard.get('file'))[:80]!r}"
        expected = min(index["shard_size"], index["count"] - k * index["shard_size"])
        if shard.get("count") != expected or expected <= 0:
            return f"shard {k} must hold {max(expected, 0)} images (count {index['count']}, shard_size " \
                   f"{index['shard_size']})"
    if sum(sh["count"] for sh in shards) != index["count"]:
        return f"the shards hold {sum(sh['count'] for sh in shards)} images, count says {index['count']}"
    scale = index.get("scaling_factor")
    if scale is not None and not (isinstance(scale, (int, float)) and not isinstance(scale, bool)
                                  and 0 < scale < float("inf")):
        return "scaling_factor must be a positive number or null"
    if not isinstance(index.get("autoencoder_config_hash"), str):
        return "autoencoder_config_hash must be a string"
    return None


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
    """A cache read into memory: `latents` (M, c, h, w) float32 (flipped copies appended when used; c the index's
    channels, or the first `channels` of them), `labels` (M,)."""

    index: dict[str, Any]
    latents: torch.Tensor
    labels: torch.Tensor


def load_latent_cache(directory: str | os.PathLike, use_flip: bool = True, max_bytes: int | None = None,
                      channels: int | None = None, index: dict[str, Any] | None = None) -> LatentCache:
    """Read every shard of a complete cache (flipped copies appended after the originals if use_flip).

    Every shard's names, dtypes and shapes are checked against the index from the safetensors header before a tensor
    is read, the total is bounded by `max_bytes` (default: 80% of the free memory) before anything is read, and the
    values are checked (finite latents, labels equal to the index's). `channels` keeps only the first that many
    latent channels, shard by shard (memory holds the prefix only); `index` is read_index(directory) if the caller
    has it already.
    """
    directory = Path(directory)
    index = read_index(directory) if index is None else index
    shape = list(index["latent_shape"])
    if channels is not None:
        if isinstance(channels, bool) or not isinstance(channels, int) or not 1 <= channels <= shape[0]:
            raise DCAEError(f"{directory}: cannot keep {channels!r} latent channels of {shape[0]}")
        shape[0] = channels
    shards = index["shards"]
    missing = [s["file"] for s in shards if not (directory / s["file"]).is_file()]
    if missing:
        raise DCAEError(f"{directory}: cache incomplete, {len(missing)} of {len(shards)} shards missing "
                        f"(first {missing[0]}); run the same `dcae cache-latents` command again to finish it")
    copies = 2 if use_flip and index["flip"] else 1
    need = index["count"] * copies * 4 * math.prod(shape)  # float32 in memory
    if max_bytes is None:
        max_bytes = int(0.8 * available_memory(torch.device("cpu")))
    if need > max_bytes:
        raise DCAEError(f"{directory}: the cache needs {need / 1e9:.1f} GB in memory, over the limit of "
                        f"{max_bytes / 1e9:.1f} GB")
    latents, flipped, labels = [], [], []
    all_labels = torch.tensor(index["labels"], dtype=torch.int64)
    for k, shard in enumerate(shards):
        start, n = k * index["shard_size"], shard["count"]
        tensors = _read_shard(directory / shard["file"], index, n, want_flip=copies == 2, channels=shape[0])
        if not torch.equal(tensors["labels"], all_labels[start:start + n]):
            raise DCAEError(f"{directory / shard['file']}: labels differ from {INDEX_NAME}")
        latents.append(tensors["latents"])
        labels.append(tensors["labels"])
        if copies == 2:
            flipped.append(tensors["latents_flip"])
    latents_t = torch.cat(latents) if latents else torch.zeros(0, *shape)
    labels_t = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
    if flipped:
        latents_t, labels_t = torch.cat([latents_t, torch.cat(flipped)]), torch.cat([labels_t, labels_t])
    return LatentCache(index=index, latents=latents_t, labels=labels_t)


def _read_shard(path: Path, index: dict[str, Any], n: int, want_flip: bool, channels: int
                ) -> dict[str, torch.Tensor]:
    """One shard's tensors, checked from the header (names, dtypes, shapes) before reading and for values after;
    latents cut to their first `channels` channels."""
    shape = [n, *index["latent_shape"]]
    wanted = {"latents": shape, "labels": [n]} | ({"latents_flip": shape} if want_flip else {})
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("autoencoder_config_hash") != index["autoencoder_config_hash"]:
                raise DCAEError(f"{path}: shard was written by another autoencoder than {INDEX_NAME} names")
            for name, want in wanted.items():
                if name not in f.keys():
                    raise DCAEError(f"{path}: no {name!r} tensor")
                piece = f.get_slice(name)
                dtype, got = piece.get_dtype(), list(piece.get_shape())
                floating = dtype in ("F32", "F16", "BF16")
                if got != want or (floating if name == "labels" else not floating):
                    raise DCAEError(f"{path}: {name} is {dtype} {got}, expected "
                                    f"{'I64' if name == 'labels' else 'a float'} {want}")
            tensors = {name: f.get_tensor(name) for name in wanted}
    except DCAEError:
        raise
    except Exception as error:  # safetensors' own errors (bad header, truncated data), OSError
        raise DCAEError(f"{path}: cannot read the shard: {first_line(error)}") from None
    for name in ("latents", "latents_flip"):
        if name in tensors:
            tensors[name] = tensors[name][:, :channels].contiguous().float()  # a prefix is copied, the shard freed
            if not torch.isfinite(tensors[name]).all():
                raise DCAEError(f"{path}: {name} has NaN/Inf values")
    tensors["labels"] = tensors["labels"].to(torch.int64)
    return tensors


def estimate_scaling_factor(latents: torch.Tensor) -> float:
    """1 / std of all latent values: what makes unpublished latents unit-variance (as SD's 0.18215 was found)."""
    return float(1.0 / latents.double().std())
