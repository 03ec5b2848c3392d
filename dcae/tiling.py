"""Any-size and tiled encode/decode: pad to the spatial factor, run tiles one at a time, blend the overlaps.

How an image runs is decided once, by `plan_tiles`, into a `TilePlan` (its size, padding and tiles, or none) that
travels with the image through encode and decode. Device placement lives here too: inputs and outputs stay where the
caller keeps them (usually the CPU); each pass, whole image or one tile, is moved to the model's device and back.

Tiles are squares of `tile` image pixels that overlap their neighbours by `overlap` pixels; both are multiples
of the spatial factor f, so every tile boundary falls on a whole latent pixel. Each tile's output is weighted
by a separable window that ramps linearly over the overlap on the sides that touch another tile (flat 1 on
image borders) and accumulated into one preallocated float32 tensor, then divided by the summed weights.
Peak memory is one tile's activations plus the input and the output.

Memory-aware: a `MemoryBudget` (bytes one pass may use, and an estimate of activation bytes per image pixel for
this model) shrinks "auto" tiles until one fits, and refuses an untiled pass or a tile size that would not fit,
with a one-line error, instead of letting the kernel's OOM killer end the process.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dcae.errors import DCAEError

TileSpec = int | str | None  # "auto", "none" / None, or a tile side in image pixels
AUTO_TILE_ABOVE_PIXELS = 1024 * 1024  # "auto" tiles images larger than 1 Mpx (after padding)


def padding_for(height: int, width: int, factor: int) -> tuple[int, int]:
    """Rows and columns to add at the bottom and right so that both sides are multiples of `factor`."""
    return (-height) % factor, (-width) % factor


def pad_to_multiple(x: torch.Tensor, factor: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, C, H, W) -> (B, C, H', W') padded at bottom/right to multiples of `factor`: reflect, else replicate.

    Reflection needs the pad to be smaller than the side it mirrors; tiny images (1x1, 20x20 at f32) replicate.
    """
    pad_h, pad_w = padding_for(x.shape[-2], x.shape[-1], factor)
    if pad_h == 0 and pad_w == 0:
        return x, (0, 0)
    mode = "reflect" if pad_h < x.shape[-2] and pad_w < x.shape[-1] else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode), (pad_h, pad_w)


def default_tile(factor: int) -> tuple[int, int]:
    """(tile, overlap) in pixels used by "auto": 512 px (at least 8 latent pixels), an eighth of it overlapping.

    512/64 at f32 is diffusers' AutoencoderDC default (tile 512, stride 448); see docs/images.md for its cost.
    """
    tile = max(512, 8 * factor)
    return tile, max(factor, tile // 8 // factor * factor)


# --- memory budget ---------------------------------------------------------------------------------------------------
# Activation bytes per image pixel = (widest stage's channels per image pixel) x 4 bytes x LIVE_TENSORS[op] + the
# float32 input/output and blending buffers (EXTRA_BYTES_PER_PIXEL), plus a fixed OVERHEAD_BYTES for the allocator
# and small tensors. LIVE_TENSORS was measured with peak RSS (benchmarks/tiled_memory.py, tests/test_tiling.py):
# it bounds the measured peak of every preset tried, fp32 and bf16 (autocast keeps norms and attention in fp32).
LIVE_TENSORS = {"encode": 4.0, "decode": 4.5}
EXTRA_BYTES_PER_PIXEL = 64
OVERHEAD_BYTES = 256 * 2**20
MIN_TILE_LATENT = 4  # "auto" shrinks tiles down to 4 latent pixels a side, no further


@dataclass(frozen=True)
class MemoryBudget:
    """What one encode/decode pass may allocate: `bytes`, at an estimated `bytes_per_pixel` of the image."""

    bytes: int
    bytes_per_pixel: float

    @property
    def max_pixels(self) -> int:
        """Image pixels one pass may cover (0 when even the fixed overhead does not fit)."""
        return max(0, int((self.bytes - OVERHEAD_BYTES) // self.bytes_per_pixel))

    def needed_gb(self, pixels: int) -> float:
        return (OVERHEAD_BYTES + pixels * self.bytes_per_pixel) / 1e9


def activation_bytes_per_pixel(model: nn.Module, ops: tuple[str, ...] = ("encode", "decode")) -> float:
    """Estimated peak activation bytes per image pixel of the most expensive of `ops` (see LIVE_TENSORS)."""
    config = model.config
    worst = 0.0
    for op in ops:
        widths = (config.encoder if op == "encode" else config.decoder).width_list
        channels_per_pixel = max(width / 4**stage for stage, width in enumerate(widths))  # stage s is at 1/2^s
        worst = max(worst, channels_per_pixel * 4 * LIVE_TENSORS[op] + EXTRA_BYTES_PER_PIXEL)
    return worst


def available_memory(device: torch.device) -> int:
    """Bytes free for a new allocation: the GPU's free memory, else MemAvailable capped by the cgroup's headroom."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        match = re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        free = int(match.group(1)) * 1024 if match else free
    except OSError:
        pass
    try:  # containers: the cgroup v2 limit can be far below the host's free memory
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(free, 0)


def memory_budget(model: nn.Module, device: torch.device, max_memory_gb: float | None = None,
                  ops: tuple[str, ...] = ("encode", "decode"), batch_size: int = 1) -> MemoryBudget:
    """The budget for one image of a batch: `max_memory_gb`, or 80% of what `device` has free, split over the batch."""
    total = int(max_memory_gb * 1e9) if max_memory_gb is not None else int(0.8 * available_memory(device))
    return MemoryBudget(total // max(1, batch_size), activation_bytes_per_pixel(model, ops))


def _over_budget(what: str, pixels: int, budget: MemoryBudget) -> DCAEError:
    return DCAEError(f"{what} needs ~{budget.needed_gb(pixels):.1f} GB (estimated), over the memory budget of "
                     f"{budget.bytes / 1e9:.1f} GB: use --tile auto or a smaller --tile, or raise --max-memory")


def resolve_tile(tile: TileSpec, height: int, width: int, factor: int, overlap: int | None = None,
                 budget: MemoryBudget | None = None) -> tuple[int, int] | None:
    """Tile option + padded image size -> (tile, overlap) in pixels, or None to run the whole image at once.

    With a `budget`, "auto" runs whole only images that fit it and shrinks its tiles until one fits; an untiled
    pass ("none") or an explicit tile size that does not fit raises DCAEError.
    """
    fits = (lambda pixels: True) if budget is None else (lambda pixels: pixels <= budget.max_pixels)
    if tile is None or (isinstance(tile, str) and tile.lower() in ("none", "off", "0")) or tile == 0:
        if not fits(height * width):
            raise _over_budget(f"an untiled pass over {width}x{height}", height * width, budget)
        return None
    if isinstance(tile, str) and tile.lower() == "auto":
        if height * width <= AUTO_TILE_ABOVE_PIXELS and fits(height * width):
            return None
        size, auto_overlap = default_tile(factor)
        while not fits(size * size) and size > MIN_TILE_LATENT * factor:
            size = max(MIN_TILE_LATENT * factor, size // 2 // factor * factor)
        if not fits(size * size):
            raise _over_budget(f"even a {size}x{size} tile", size * size, budget)
        auto_overlap = min(auto_overlap, max(factor, size // 8 // factor * factor))
        overlap = auto_overlap if overlap is None else overlap
    else:
        try:
            size = int(tile)
        except ValueError:
            raise DCAEError(f"--tile {tile!r}: expected auto, none or a size in pixels") from None
        if size <= 0 or size % factor:
            raise DCAEError(f"tile size {size} must be a positive multiple of the spatial factor {factor}")
        overlap = min(default_tile(factor)[1], size // 8 // factor * factor) if overlap is None else overlap
    if overlap < 0 or overlap % factor or overlap >= size:
        raise DCAEError(f"tile overlap {overlap} must be a multiple of {factor} and smaller than the tile {size}")
    if height <= size and width <= size:
        if not fits(height * width):
            raise _over_budget(f"a {min(size, width)}x{min(size, height)} tile", height * width, budget)
        return None  # one tile covers everything
    if not fits(size * size):
        raise _over_budget(f"a {size}x{size} tile", size * size, budget)
    return size, overlap


@dataclass(frozen=True)
class TilePlan:
    """How one image (or a batch of same-size images) runs: size before padding, padded size, and tiles."""

    size: tuple[int, int]  # (H, W) of the image, before padding
    padded: tuple[int, int]  # (H, W) after padding to multiples of the spatial factor
    tiles: tuple[int, int] | None  # (tile, overlap) in pixels; None runs the whole image at once

    @property
    def tiled(self) -> bool:
        return self.tiles is not None


def plan_tiles(tile: TileSpec, height: int, width: int, factor: int, overlap: int | None = None,
               budget: MemoryBudget | None = None) -> TilePlan:
    """The plan for an (H, W) image (before padding): `resolve_tile` on its padded size. Raises DCAEError like it."""
    pad_h, pad_w = padding_for(height, width, factor)
    padded = (height + pad_h, width + pad_w)
    return TilePlan((height, width), padded, resolve_tile(tile, *padded, factor, overlap, budget))


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Cover [0, length) with (start, size) spans of at most `tile`, neighbours sharing at least `overlap`."""
    if length <= tile:
        return [(0, length)]
    count = math.ceil((length - overlap) / (tile - overlap))
    return [(round(i * (length - tile) / (count - 1)), tile) for i in range(count)]  # evenly spread starts


def _ramp_window(size: int, ramp: int, lead: bool, trail: bool) -> torch.Tensor:
    """(size,) weights: 1 inside, a linear ramp (k + 0.5) / ramp over `ramp` samples at each touching side."""
    window = torch.ones(size, dtype=torch.float32)
    ramp = min(ramp, size)
    if ramp > 0:
        up = (torch.arange(ramp, dtype=torch.float32) + 0.5) / ramp  # strictly positive: no 0/0 anywhere
        if lead:
            window[:ramp] *= up
        if trail:
            window[size - ramp:] *= up.flip(0)
    return window


def _axis_windows(length: int, tile: int, overlap: int, scale: int
                  ) -> tuple[list[tuple[int, int, torch.Tensor]], torch.Tensor]:
    """Spans along one axis in latent units -> [(start, size, window of size*scale)], summed window (length*scale,)."""
    spans = tile_spans(length, tile, overlap)
    total = torch.zeros(length * scale, dtype=torch.float32)
    windows = []
    for start, size in spans:
        window = _ramp_window(size * scale, overlap * scale, lead=start > 0, trail=start + size < length)
        total[start * scale:(start + size) * scale] += window
        windows.append((start, size, window))
    return windows, total


def _device_dtype(model: nn.Module, fallback: torch.Tensor) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters(), None)
    if parameter is None:
        return fallback.device, fallback.dtype
    return parameter.device, parameter.dtype


def _tiled(fn, x: torch.Tensor, factor: int, in_scale: int, out_scale: int, out_channels: int,
           tile: int, overlap: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Run `fn` over overlapping tiles of x (units of 1 latent pixel = in_scale input / out_scale output samples)."""
    t, o = tile // factor, overlap // factor
    batch, _, in_h, in_w = x.shape
    rows, row_total = _axis_windows(in_h // in_scale, t, o, out_scale)
    cols, col_total = _axis_windows(in_w // in_scale, t, o, out_scale)
    out = torch.zeros(batch, out_channels, row_total.numel(), col_total.numel(), dtype=torch.float32, device=x.device)
    for y0, th, wy in rows:
        for x0, tw, wx in cols:
            piece = x[:, :, y0 * in_scale:(y0 + th) * in_scale, x0 * in_scale:(x0 + tw) * in_scale]
            y = fn(piece.to(device=device, dtype=dtype)).to(device=x.device, dtype=torch.float32)  # (B, C, th*s, tw*s)
            weight = (wy[:, None] * wx[None, :]).to(x.device)  # (th*s, tw*s)
            out[:, :, y0 * out_scale:(y0 + th) * out_scale, x0 * out_scale:(x0 + tw) * out_scale] += y * weight
            del y
    out /= row_total.to(x.device)[:, None]
    out /= col_total.to(x.device)[None, :]
    return out


def tiled_encode(model: nn.Module, x: torch.Tensor, tile: int = 512, overlap: int = 128) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1], H and W multiples of f -> (B, c, H/f, W/f) float32 latent, encoded tile by tile."""
    f = model.spatial_factor
    if x.shape[-2] % f or x.shape[-1] % f:
        raise ValueError(f"image {tuple(x.shape[-2:])} is not a multiple of the spatial factor {f}; pad it first")
    device, dtype = _device_dtype(model, x)
    return _tiled(model.encode, x, f, in_scale=f, out_scale=1, out_channels=model.latent_channels,
                  tile=tile, overlap=overlap, device=device, dtype=dtype)


def tiled_decode(model: nn.Module, z: torch.Tensor, tile: int = 512, overlap: int = 128) -> torch.Tensor:
    """(B, c, h, w) latent -> (B, 3, h*f, w*f) float32 image, decoded tile by tile (tile, overlap in pixels)."""
    f = model.spatial_factor
    device, dtype = _device_dtype(model, z)
    return _tiled(model.decode, z, f, in_scale=1, out_scale=f, out_channels=3,
                  tile=tile, overlap=overlap, device=device, dtype=dtype)


def encode_image(model: nn.Module, x: torch.Tensor, tile: TileSpec = "auto", overlap: int | None = None,
                 budget: MemoryBudget | None = None, plan: TilePlan | None = None) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1], any H and W -> (B, c, ceil(H/f), ceil(W/f)) float32 latent of the padded image.

    The latent is returned on x's device. `plan` (from `plan_tiles`) replaces tile/overlap/budget.
    """
    f = model.spatial_factor
    if plan is None:
        plan = plan_tiles(tile, x.shape[-2], x.shape[-1], f, overlap, budget)
    x, _ = pad_to_multiple(x, f)
    if plan.tiled:
        return tiled_encode(model, x, *plan.tiles)
    device, dtype = _device_dtype(model, x)
    return model.encode(x.to(device=device, dtype=dtype)).to(device=x.device, dtype=torch.float32)


def decode_latent(model: nn.Module, z: torch.Tensor, size: tuple[int, int] | None = None, tile: TileSpec = "auto",
                  overlap: int | None = None, budget: MemoryBudget | None = None, plan: TilePlan | None = None
                  ) -> torch.Tensor:
    """(B, c, h, w) latent -> (B, 3, H, W) float32 image on z's device, cropped to `size` (the size before padding).

    `plan` (from `plan_tiles`) replaces tile/overlap/budget, and gives the size to crop to when `size` is None.
    """
    f = model.spatial_factor
    if plan is None:
        plan = plan_tiles(tile, z.shape[-2] * f, z.shape[-1] * f, f, overlap, budget)
    elif size is None:
        size = plan.size
    if plan.tiled:
        y = tiled_decode(model, z, *plan.tiles)
    else:
        device, dtype = _device_dtype(model, z)
        y = model.decode(z.to(device=device, dtype=dtype)).to(device=z.device, dtype=torch.float32)
    if size is not None:
        height, width = size
        if not (0 < height <= y.shape[-2] and 0 < width <= y.shape[-1]):
            raise ValueError(f"cannot crop a {tuple(y.shape[-2:])} image to {size}")
        y = y[:, :, :height, :width]
    return y
