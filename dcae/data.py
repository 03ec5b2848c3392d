"""Training and validation images: image folders and webdataset tar shards, random crops, deterministic by position.

Determinism (what exact resume rests on): every training sample is named by its position in an infinite stream, and
everything about it (which image, which crop, whether flipped) is a pure function of (seed, position). Nothing depends
on worker processes, timing or a global RNG, so a run restarted from a saved position sees the same batches.

- Image folders (map-style): the stream is the concatenation of per-epoch permutations of the sorted file list,
  permutation e seeded by (seed, e). A step with global batch B*W covers stream positions [p, p + B*W); rank r takes
  p + r, p + r + W, ... (DistributedSampler-style interleaving), so W ranks of batch B see exactly the images one
  process of batch B*W sees. The checkpoint stores the next position.
- Tar shards (streaming, `pip install webdataset`): members are read into memory, never extracted to disk, so `..` or
  absolute member names cannot write anywhere. Each (rank, worker) owns a logical stream: in epoch e the shard list is
  permuted with (seed, e) and stream j of S = W * max(1, num_workers) streams reads shards j, j+S, ...; samples are
  batched inside the worker and the DataLoader interleaves streams round-robin. The checkpoint stores each stream's
  (epoch, shard, sample) position and which stream comes next; resuming re-reads (without decoding) only the part of
  the current shard already used. Resume must keep the same world size and num_workers.

Crops: images whose shorter side is below `min_size` are skipped as too small; images smaller than the crop (but not
too small) have their shorter side resized up to the crop size (bicubic), then a random square crop is taken at the
phase resolution, then a horizontal flip with probability 1/2. Unreadable or too-small images are skipped and counted
(the count travels with each batch into the training log), never crash a run: a folder sample that fails is replaced by
the next image of the same epoch permutation; a shard sample that fails is dropped from its stream.
"""
from __future__ import annotations

import glob
import io
import os
import signal
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from dcae.errors import DCAEError
from dcae.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, find_images, read_image, to_model_range

SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")


@dataclass
class DataConfig:
    path: str = ""  # image folder (recursive), a .tar shard, a brace pattern "shards/{000..099}.tar", or a folder of .tar
    val_path: str | None = None  # held-out image folder for validation (PSNR / LPIPS) and the sample grid
    num_workers: int = 2  # DataLoader worker processes (0 = load in the training process)
    hflip: bool = True  # random horizontal flips
    min_size: int = 32  # shorter side below this: skipped as too small (upscaling it would be mostly blur)
    max_retries: int = 16  # folder images tried in a row before a sample gives up (then the run stops with a message)
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb guard; larger images are skipped
    val_images: int = 16  # validation uses the first N images of val_path (sorted), center-cropped
    val_resolution: int | None = None  # validation crop size; None: the phase resolution
    prefetch_factor: int = 2  # batches each worker prepares ahead


class SkippedImage(Exception):
    """An image that cannot be used: unreadable, or too small for a crop."""


# ----------------------------------------------------------------------------------------------------------------------
# Decoding and cropping (pure functions of the bytes/path and an RNG)
def decode_image_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Encoded image bytes -> (3, H, W) uint8 RGB, EXIF orientation applied; raises SkippedImage if unreadable."""
    from dcae.images import _to_rgb_and_alpha, composite_on_white

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > max_pixels or image.width < 1 or image.height < 1:
                raise SkippedImage(f"image size {image.width}x{image.height} outside [1, {max_pixels}] pixels")
            image.load()
            rgb, alpha = _to_rgb_and_alpha(ImageOps.exif_transpose(image))
    except SkippedImage:
        raise
    except Exception as error:  # noqa: BLE001 - a corrupt file can make a Pillow decoder raise almost anything
        raise SkippedImage(f"cannot decode image: {type(error).__name__}: {error}") from None
    rgb_t = torch.tensor(rgb).permute(2, 0, 1).contiguous()  # (3, H, W); a copy: Pillow's arrays are read-only
    return rgb_t if alpha is None else composite_on_white(rgb_t, torch.tensor(alpha)[None])


def load_image_file(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """(3, H, W) uint8 from a file; raises SkippedImage instead of DCAEError so a run can skip and count it."""
    try:
        return read_image(path, max_pixels=max_pixels)
    except DCAEError as error:
        raise SkippedImage(str(error)) from None


def resize_shorter_side(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, H', W') uint8 with min(H', W') == size (bicubic; used to upscale small images)."""
    h, w = image.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    out = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bicubic", align_corners=False,
                        antialias=scale < 1)
    return out[0].round().clamp(0, 255).to(torch.uint8)


def random_crop(image: torch.Tensor, size: int, rng: np.random.Generator, hflip: bool, min_size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, size, size) uint8: upscale if smaller than the crop, random crop, random flip."""
    h, w = image.shape[-2:]
    if min(h, w) < min_size:
        raise SkippedImage(f"image is {w}x{h}, shorter side below min_size={min_size}")
    if min(h, w) < size:
        image = resize_shorter_side(image, size)
        h, w = image.shape[-2:]
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    crop = image[:, top:top + size, left:left + size]
    if hflip and rng.random() < 0.5:
        crop = crop.flip(-1)
    return crop.contiguous()


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, size, size): shorter side resized to `size` only if smaller, then the center square."""
    if min(image.shape[-2:]) < size:
        image = resize_shorter_side(image, size)
    h, w = image.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return image[:, top:top + size, left:left + size].contiguous()


def sample_rng(seed: int, *position: int) -> np.random.Generator:
    """The augmentation RNG of one sample: a pure function of the seed and the sample's position."""
    return np.random.default_rng([seed, *position])


# ----------------------------------------------------------------------------------------------------------------------
# Image folders
class FolderDataset(torch.utils.data.Dataset):
    """Map-style: index (epoch, position in that epoch's permutation) -> (crop (3, R, R) uint8, images skipped)."""

    def __init__(self, files: list[Path], resolution: int, seed: int, cfg: DataConfig):
        self.files, self.resolution, self.seed, self.cfg = files, resolution, seed, cfg
        self._perm_epoch, self._perm = -1, np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:  # one epoch's permutation cached per process (workers each hold their own)
            self._perm, self._perm_epoch = np.random.default_rng([self.seed, epoch]).permutation(len(self.files)), epoch
        return self._perm

    def __getitem__(self, index: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, q = index
        perm, n = self.permutation(epoch), len(self.files)
        for attempt in range(self.cfg.max_retries):
            path = self.files[perm[(q + attempt) % n]]
            try:
                image = load_image_file(path, self.cfg.max_pixels)
                rng = sample_rng(self.seed, epoch, q, attempt)
                return random_crop(image, self.resolution, rng, self.cfg.hflip, self.cfg.min_size), attempt
            except SkippedImage:
                continue
        raise DCAEError(f"{self.cfg.path}: {self.cfg.max_retries} images in a row could not be used "
                        f"(unreadable or shorter side < {self.cfg.min_size}); check the data folder")


class PositionBatchSampler:
    """Infinite batches of (epoch, position) indices for one rank, starting at global stream position `start`."""

    def __init__(self, num_images: int, batch_size: int, rank: int, world_size: int, start: int = 0):
        self.n, self.batch_size, self.rank, self.world_size, self.start = num_images, batch_size, rank, world_size, start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        p = self.start
        global_batch = self.batch_size * self.world_size
        while True:
            positions = range(p + self.rank, p + global_batch, self.world_size)
            yield [(pos // self.n, pos % self.n) for pos in positions]
            p += global_batch


def collate_crops(items: list[tuple[torch.Tensor, int]]) -> dict[str, Any]:
    return {"images": torch.stack([image for image, _ in items]), "skipped": sum(s for _, s in items)}


# ----------------------------------------------------------------------------------------------------------------------
# Webdataset tar shards
def expand_shards(spec: str) -> list[str]:
    """'a.tar', 'dir/' (its *.tar), 'shards/{000..099}.tar' (brace expansion), 'pipe:...', 'a.tar::b.tar' -> URLs."""
    import braceexpand

    urls: list[str] = []
    for part in spec.split("::"):
        if os.path.isdir(part):
            urls += sorted(glob.glob(os.path.join(part, "*.tar")))
        else:
            urls += list(braceexpand.braceexpand(part))
    return urls


MAX_MEMBER_BYTES = 64 << 20  # an encoded training image larger than 64 MiB is not one


def _shard_samples(url: str, counter: list[int], max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[dict[str, Any]]:
    """The samples (dicts of key -> bytes) of one shard, streamed; a broken shard ends early and counts one skip."""
    from webdataset.gopen import gopen
    from webdataset.tariterators import group_by_keys

    def count_and_continue(error: Exception) -> bool:
        counter[0] += 1
        return False  # a broken tar cannot be resynchronised: stop reading this shard

    try:
        stream = gopen(url, "rb")
    except Exception:  # noqa: BLE001 - missing file, failed pipe: skip the whole shard
        counter[0] += 1
        return
    try:
        files = _tar_members(url, stream, max_member_bytes, counter)
        yield from group_by_keys(files, handler=count_and_continue)
    finally:
        stream.close()


def _tar_members(url: str, stream: Any, max_member_bytes: int, counter: list[int]) -> Iterator[dict[str, Any]]:
    """(name, bytes) of a tar's regular members, read in memory; a member declared larger than `max_member_bytes`
    is skipped from its header (a compressed shard could otherwise inflate without bound); a broken tar ends."""
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():  # links, devices, directories: nothing to read
                    continue
                if info.size > max_member_bytes:
                    counter[0] += 1
                    continue
                yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": url}
                tar.members = []  # streaming: do not keep every header
    except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error):  # truncated or corrupt: stop this shard
        counter[0] += 1


def _image_bytes(sample: dict[str, Any]) -> bytes | None:
    for key in SHARD_IMAGE_KEYS:
        if key in sample:
            return sample[key]
    return None


class ShardStream(torch.utils.data.IterableDataset):
    """Iterable over whole batches; each worker process runs one logical stream (see the module docstring)."""

    def __init__(self, urls: list[str], resolution: int, batch_size: int, seed: int, rank: int, world_size: int,
                 cfg: DataConfig, state: dict | None = None):
        self.urls, self.resolution, self.batch_size, self.seed = urls, resolution, batch_size, seed
        self.rank, self.world_size, self.cfg = rank, world_size, cfg
        self.streams_per_rank = max(1, cfg.num_workers)
        self.state = state or {"streams": [[0, 0, 0]] * self.streams_per_rank, "next": 0}
        if len(self.state["streams"]) != self.streams_per_rank:
            raise DCAEError(f"{cfg.path}: the run was saved with {len(self.state['streams'])} shard streams per rank "
                            f"(data.num_workers); resume it with the same number")

    def shards_of(self, stream: int, epoch: int) -> list[str]:
        """The shard URLs global stream `stream` reads in `epoch`."""
        n, total = len(self.urls), self.world_size * self.streams_per_rank
        perm = np.random.default_rng([self.seed, epoch]).permutation(n)
        if n < total:  # fewer shards than streams: streams share shards (documented in docs/training.md)
            return [self.urls[perm[stream % n]]]
        return [self.urls[i] for i in perm[stream::total]]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        logical = (worker + self.state["next"]) % self.streams_per_rank  # DataLoader starts with worker 0
        epoch, shard_index, sample_index = self.state["streams"][logical]
        global_stream = self.rank * self.streams_per_rank + logical
        images: list[torch.Tensor] = []
        counter = [0]  # images skipped (and broken shards) since the last batch
        barren_epochs = 0  # epochs in a row that gave no usable image: all shards broken or empty
        while barren_epochs < 2:
            shards, used = self.shards_of(global_stream, epoch), 0
            while shard_index < len(shards):
                for k, sample in enumerate(_shard_samples(shards[shard_index], counter)):
                    if k < sample_index:
                        continue  # resume: already used; read but not decoded
                    sample_index = k + 1
                    try:
                        data = _image_bytes(sample)
                        if data is None:
                            raise SkippedImage(f"sample {sample.get('__key__')} has no image")
                        image = decode_image_bytes(data, self.cfg.max_pixels)
                        rng = sample_rng(self.seed, epoch, global_stream, shard_index, k)
                        images.append(random_crop(image, self.resolution, rng, self.cfg.hflip, self.cfg.min_size))
                        used += 1
                    except SkippedImage:
                        counter[0] += 1
                        continue
                    if len(images) == self.batch_size:
                        yield {"images": torch.stack(images), "skipped": counter[0], "stream": logical,
                               "position": [epoch, shard_index, sample_index]}
                        images, counter[0] = [], 0
                shard_index, sample_index = shard_index + 1, 0
            epoch, shard_index = epoch + 1, 0
            barren_epochs = 0 if used else barren_epochs + 1
        raise DCAEError(f"{self.cfg.path}: no usable images in the shards of stream {global_stream} "
                        f"({counter[0]} skipped)")


# ----------------------------------------------------------------------------------------------------------------------
# The training stream the loop pulls from
def is_shard_spec(path: str) -> bool:
    """True for tar shards (a .tar file, a brace pattern, a pipe:/URL, or a folder holding only .tar files)."""
    if "::" in path or "{" in path or path.endswith(".tar") or ":" in path.split("/")[0] and not os.path.exists(path):
        return True
    if os.path.isdir(path):
        if not any(name.endswith(".tar") for name in os.listdir(path)):
            return False
        return not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in Path(path).rglob("*") if p.is_file())
    return False


def ignore_sigint(worker_id: int) -> None:
    """Workers leave Ctrl-C to the training process, which checkpoints and then shuts them down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TrainStream:
    """Batches of training crops: `next(stream)` -> ((B, 3, R, R) float in [-1, 1], images skipped); resumable."""

    def __init__(self, cfg: DataConfig, resolution: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, state: dict | None = None):
        self.cfg, self.batch_size, self.world_size = cfg, batch_size, world_size
        if not cfg.path:
            raise DCAEError("no training data given (--data DIR_OR_SHARDS)")
        workers: dict[str, Any] = dict(num_workers=cfg.num_workers, pin_memory=False)
        if cfg.num_workers > 0:
            workers.update(prefetch_factor=cfg.prefetch_factor, worker_init_fn=ignore_sigint)
        self.kind = "shards" if is_shard_spec(cfg.path) else "folder"
        if self.kind == "folder":
            if not os.path.isdir(cfg.path):
                raise DCAEError(f"{cfg.path}: no such folder (or not a .tar shard spec)")
            files = [p for p, _ in find_images([cfg.path])]
            if not files:
                raise DCAEError(f"{cfg.path}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
            self.num_images = len(files)
            self.position = int((state or {}).get("position", 0))
            sampler = PositionBatchSampler(len(files), batch_size, rank, world_size, self.position)
            dataset = FolderDataset(files, resolution, seed, cfg)
            self.loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_crops, **workers)
        else:
            urls = expand_shards(cfg.path)
            if not urls:
                raise DCAEError(f"{cfg.path}: no .tar shards found")
            self.num_images = None
            self.shard_state = {"streams": [list(s) for s in (state or {}).get("streams", [[0, 0, 0]] * max(1, cfg.num_workers))],
                                "next": int((state or {}).get("next", 0))}
            dataset = ShardStream(urls, resolution, batch_size, seed, rank, world_size, cfg,
                                  {"streams": [list(s) for s in self.shard_state["streams"]], "next": self.shard_state["next"]})
            self.loader = torch.utils.data.DataLoader(dataset, batch_size=None, **workers)
        self._iterator: Iterator | None = None

    def __iter__(self) -> "TrainStream":
        return self

    def __next__(self) -> tuple[torch.Tensor, int]:
        if self._iterator is None:
            self._iterator = iter(self.loader)
        try:
            batch = next(self._iterator)
        except DCAEError as error:  # raised in a worker: keep the one-line message, not the worker's traceback
            lines = str(error.args[0] if error.args else "").strip().splitlines()  # as raised: str() escapes them
            raise DCAEError(lines[-1].removeprefix("dcae.errors.DCAEError: ") if lines else str(error)) from None
        if self.kind == "folder":
            self.position += self.batch_size * self.world_size
        else:
            self.shard_state["streams"][batch["stream"]] = batch["position"]
            self.shard_state["next"] = (batch["stream"] + 1) % len(self.shard_state["streams"])
        return to_model_range(batch["images"]), int(batch["skipped"])

    def state_dict(self) -> dict[str, Any]:
        """The data position after the last batch returned (plain ints and lists: safe for weights_only loading)."""
        if self.kind == "folder":
            return {"kind": "folder", "position": self.position}
        return {"kind": "shards", "streams": [list(s) for s in self.shard_state["streams"]],
                "next": self.shard_state["next"]}

    def close(self) -> None:
        """Stop worker processes now (an abandoned iterator stops them at garbage collection otherwise)."""
        if self._iterator is not None and hasattr(self._iterator, "_shutdown_workers"):
            self._iterator._shutdown_workers()
        self._iterator = None


def load_validation_images(cfg: DataConfig, resolution: int) -> torch.Tensor:
    """The first `val_images` images of `val_path` (sorted), center-cropped: (N, 3, R, R) float in [-1, 1]."""
    if not cfg.val_path:
        return torch.zeros(0, 3, resolution, resolution)
    if not os.path.isdir(cfg.val_path):
        raise DCAEError(f"{cfg.val_path}: validation data must be an image folder")
    crops = []
    for path, _ in find_images([cfg.val_path]):
        if len(crops) == cfg.val_images:
            break
        try:
            image = load_image_file(path, cfg.max_pixels)
        except SkippedImage:
            continue
        if min(image.shape[-2:]) >= cfg.min_size:
            crops.append(center_crop(image, resolution))
    if not crops:
        raise DCAEError(f"{cfg.val_path}: no usable validation images")
    return to_model_range(torch.stack(crops))
