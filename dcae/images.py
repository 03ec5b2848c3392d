"""Image files in and out: decode any mode and size safely, convert to model range, write atomically.

Policy (see docs/images.md):
- Every image becomes 8-bit sRGB-coded RGB, (3, H, W) uint8, after the EXIF orientation is applied.
- 16-bit samples (I;16, I;16B, I;16L, and I, which Pillow uses for 16-bit files) are scaled by 255/65535;
  F (float) samples are read as [0, 1] and clipped. Colour profiles are not applied.
- Alpha (RGBA, LA, PA, P with transparency, ...) is composited onto white for the model; the alpha plane is
  returned separately by `read_image_with_alpha` so a caller may carry it to the output unchanged.
- Multi-frame files (GIF, animated WebP, multi-page TIFF) give their first frame.
- A pixel limit guards against decompression bombs; it is checked from the header, before any pixel is decoded.
"""
from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePath

import numpy as np
import torch
from PIL import Image, ImageOps

from dcae.errors import DCAEError, first_line
from dcae.files import atomic_output

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm", ".pnm", ".tga",
)
DEFAULT_MAX_PIXELS = 8192 * 8192  # 67.1 Mpx: a 8192x8192 image passes; raise with --max-pixels
FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}  # what write_image produces
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


@contextlib.contextmanager
def _pixel_limit(max_pixels: int) -> Iterator[None]:
    """Make Pillow's decompression-bomb check use our limit, and raise instead of warn."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _bomb_message(pixels: int, max_pixels: int, size: str = "") -> str:
    return (f"image is {size}{pixels / 1e6:.1f} Mpx, over the limit of {max_pixels / 1e6:.1f} Mpx "
            f"(raise it with --max-pixels)")


def _to_rgb_and_alpha(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Any Pillow mode -> (H, W, 3) uint8 RGB and (H, W) uint8 alpha or None, alpha not yet applied."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        samples = np.asarray(image).astype(np.float64)
        gray = np.clip(np.rint(samples * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2), None
    if mode == "F":
        samples = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        gray = np.rint(np.clip(samples, 0.0, 1.0) * 255.0).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2), None
    has_alpha = mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in image.info)
    if has_alpha:
        rgba = np.asarray(image.convert("RGBA"))
        return np.ascontiguousarray(rgba[:, :, :3]), np.ascontiguousarray(rgba[:, :, 3])
    return np.asarray(image.convert("RGB")), None


def composite_on_white(rgb: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """(3, H, W) uint8 over white with (1, H, W) uint8 alpha -> (3, H, W) uint8."""
    a = alpha.to(torch.float32) / 255.0
    out = rgb.to(torch.float32) * a + 255.0 * (1.0 - a)
    return out.round().clamp(0, 255).to(torch.uint8)


def read_image_with_alpha(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read any image -> ((3, H, W) uint8 RGB composited onto white, (1, H, W) uint8 alpha or None)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise DCAEError(f"{path}: cannot read: {error.strerror or error}") from None
    if path.is_dir():
        raise DCAEError(f"{path}: is a directory, not an image")
    if size == 0:
        raise DCAEError(f"{path}: file is empty (0 bytes)")
    width = height = 0  # known once Image.open has read the header
    try:
        with _pixel_limit(max_pixels), Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise DCAEError(f"{path}: {_bomb_message(width * height, max_pixels, f'{width}x{height} = ')}")
            if width < 1 or height < 1:
                raise DCAEError(f"{path}: image has no pixels ({width}x{height})")
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb, alpha = _to_rgb_and_alpha(image)
    except DCAEError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # Pillow refused in Image.open, before we saw the size: its message holds the pixel count
        found = re.search(r"\((\d+) pixels\)", str(error))
        pixels = int(found.group(1)) if found else width * height
        raise DCAEError(f"{path}: {_bomb_message(pixels, max_pixels)}") from None
    except Image.UnidentifiedImageError:
        raise DCAEError(f"{path}: not an image file Pillow can read") from None
    except MemoryError:
        raise DCAEError(f"{path}: out of memory while decoding the image") from None
    except Exception as error:  # noqa: BLE001 - a corrupt file can make a Pillow decoder raise almost anything
        raise DCAEError(f"{path}: cannot decode image: {first_line(error)}") from None
    rgb_t = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # (3, H, W)
    if alpha is None:
        return rgb_t, None
    alpha_t = torch.from_numpy(np.array(alpha, dtype=np.uint8))[None].contiguous()  # (1, H, W)
    return composite_on_white(rgb_t, alpha_t), alpha_t


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Read any image -> (3, H, W) uint8 RGB, EXIF orientation applied, alpha composited onto white."""
    return read_image_with_alpha(path, max_pixels)[0]


def to_model_range(image: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] (..., 3, H, W) -> float32 [-1, 1]."""
    return image.to(torch.float32) / 127.5 - 1.0


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] (..., 3, H, W), clamped -> uint8 [0, 255], rounded to nearest."""
    return ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def format_for(path: str | os.PathLike, format: str | None = None) -> str:
    """Pillow format name for writing `path`: the explicit `format`, else from the extension."""
    key = (format or Path(path).suffix.lstrip(".")).lower()
    if key not in FORMATS:
        raise DCAEError(f"{path}: cannot write format {key!r}; choose from {', '.join(sorted(set(FORMATS)))}")
    return FORMATS[key]


def write_image(path: str | os.PathLike, image: torch.Tensor, format: str | None = None, quality: int = 95) -> None:
    """Write (3, H, W) RGB or (4, H, W) RGBA uint8 atomically (temp file + os.replace); PNG is lossless.

    JPEG cannot hold alpha: RGBA is composited onto white. WebP at quality 100 is written lossless.
    """
    path = Path(path)
    pil_format = format_for(path, format)
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(f"write_image wants a (3|4, H, W) uint8 tensor, got {tuple(image.shape)} {image.dtype}")
    if image.shape[0] == 4 and pil_format == "JPEG":
        image = composite_on_white(image[:3], image[3:])
    array = image.cpu().permute(1, 2, 0).numpy()  # (H, W, C)
    pil = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    options: dict = {}
    if pil_format == "JPEG":
        options = {"quality": int(quality), "subsampling": 0 if quality >= 90 else 2}
    elif pil_format == "WEBP":
        options = {"quality": int(quality), "lossless": quality >= 100, "exact": True, "method": 4}
    elif pil_format == "PNG":
        options = {"compress_level": 6}
    with atomic_output(path) as handle:
        pil.save(handle, format=pil_format, **options)


def find_images(inputs: Iterable[str | os.PathLike], extensions: tuple[str, ...] = IMAGE_EXTENSIONS
                ) -> list[tuple[Path, PurePath]]:
    """Files and folders (searched recursively) -> sorted (path, name relative to the folder given) pairs.

    A file named explicitly is kept whatever its extension (reading it then says whether it is an image);
    inside folders only names ending in `extensions` are kept, hidden files skipped.
    """
    found: list[tuple[Path, PurePath]] = []
    for item in inputs:
        root = Path(item)
        if root.is_dir():
            matches = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in extensions
                       and not any(part.startswith(".") for part in p.relative_to(root).parts)]
            found.extend((p, PurePath(p.relative_to(root))) for p in sorted(matches))
        elif root.exists():
            found.append((root, PurePath(root.name)))
        else:
            raise DCAEError(f"{root}: no such file or directory")
    return found
