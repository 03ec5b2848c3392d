"""dcae.images over a generated set of good and bad image files: modes, bit depths, EXIF, alpha, limits, writing."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path, PurePath

import numpy as np
import pytest
import torch
from PIL import Image

from dcae.errors import DCAEError
from dcae.images import (DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, find_images, from_model_range, read_image,
                         read_image_with_alpha, to_model_range, write_image)


# --- a generated image set, also used by test_image_cli.py --------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png16(path: Path, samples: np.ndarray) -> None:
    """Hand-written 16-bit RGB PNG (Pillow cannot write one): (H, W, 3) uint16."""
    height, width = samples.shape[:2]
    raw = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(raw))
                     + _png_chunk(b"IEND", b""))


def write_png_bomb(path: Path, width: int, height: int) -> None:
    """A 100-byte PNG whose header claims width x height RGB pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
                     + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


def rng_image(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8).squeeze()


# name -> (height, width) after orientation, for every image that must decode
GOOD_SIZES = {
    "odd_333x517.png": (517, 333),
    "one_1x1.png": (1, 1),
    "gray16.png": (20, 30),
    "rgb16.png": (3, 4),
    "cmyk.jpg": (24, 40),
    "rgba.png": (40, 36),
    "palette.png": (16, 16),
    "exif_rotated.jpg": (48, 24),  # stored 48 wide x 24 high, EXIF orientation 6 turns it upright
    "la.png": (10, 12),
    "float.tif": (9, 7),
    "sub/wide_8x700.png": (8, 700),
}
BAD_FILES = {  # name -> a phrase the one-line error must contain
    "empty.png": "empty",
    "truncated.png": "cannot decode",
    "text.png": "not an image",
    "bomb.png": "over the limit",
}


def make_image_set(root: Path) -> Path:
    """Write the good and bad files under root; returns root."""
    (root / "sub").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng_image(517, 333, seed=1)).save(root / "odd_333x517.png")
    Image.fromarray(rng_image(1, 1, seed=2).reshape(1, 1, 3)).save(root / "one_1x1.png")
    gray16 = (np.arange(20 * 30).reshape(20, 30) * 100).astype(np.uint16)
    gray16[0, 0], gray16[0, 1], gray16[0, 2] = 65535, 0, 128 * 257
    Image.fromarray(gray16).save(root / "gray16.png")  # mode I;16
    write_png16(root / "rgb16.png", (np.arange(36).reshape(3, 4, 3) * 1800).astype(np.uint16))
    Image.new("CMYK", (40, 24), (0, 255, 255, 0)).save(root / "cmyk.jpg", quality=95)  # red
    rgba = rng_image(40, 36, 4, seed=3)
    rgba[:20, :, 3] = 0  # top half fully transparent
    rgba[20:, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.paste(1, (8, 0, 16, 16))
    palette.save(root / "palette.png", transparency=0)
    stored = np.zeros((24, 48, 3), np.uint8)
    stored[:4, :4] = (255, 0, 0)  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(stored).save(root / "exif_rotated.jpg", exif=exif, quality=95)
    Image.fromarray(np.stack([np.full((10, 12), 77, np.uint8), np.full((10, 12), 255, np.uint8)], -1), "LA").save(
        root / "la.png")
    Image.fromarray(np.full((9, 7), 0.25, np.float32)).save(root / "float.tif")
    Image.fromarray(rng_image(8, 700, seed=4)).save(root / "sub" / "wide_8x700.png")
    (root / "empty.png").write_bytes(b"")
    good = (root / "odd_333x517.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "text.png").write_text("this is not an image\n")
    write_png_bomb(root / "bomb.png", 20000, 20000)  # 400 Mpx > the 67 Mpx default
    (root / "notes.txt").write_text("not picked up from a folder\n")
    return root


@pytest.fixture(scope="module")
def image_set(tmp_path_factory) -> Path:
    return make_image_set(tmp_path_factory.mktemp("images"))


# --- reading --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(GOOD_SIZES))
def test_good_images_decode_to_rgb_uint8(image_set, name):
    image = read_image(image_set / name)
    assert image.dtype == torch.uint8 and image.shape == (3, *GOOD_SIZES[name])


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files_raise_one_line_naming_the_file(image_set, name):
    with pytest.raises(DCAEError) as info:
        read_image(image_set / name)
    message = str(info.value)
    assert str(image_set / name) in message and BAD_FILES[name] in message and "\n" not in message


def test_sixteen_bit_is_scaled_not_truncated(image_set):
    image = read_image(image_set / "gray16.png")
    assert image[:, 0, :3].tolist() == [[255, 0, 128]] * 3
    source = (np.arange(20 * 30).reshape(20, 30) * 100).astype(np.float64)
    expected = np.clip(np.rint(source * 255 / 65535), 0, 255)
    assert np.array_equal(image[0, 1:].numpy(), expected[1:])  # rows below the three marked pixels
    rgb16 = read_image(image_set / "rgb16.png")  # Pillow keeps the high byte of 16-bit RGB: within 1 of exact
    exact = np.rint(np.arange(36).reshape(3, 4, 3) * 1800 * 255 / 65535).transpose(2, 0, 1)
    assert np.abs(rgb16.numpy().astype(int) - exact).max() <= 1


def test_int32_and_float_modes(tmp_path):
    Image.fromarray(np.array([[0, 65535, 70000, -5]], np.int32)).save(tmp_path / "i.tif")  # mode I: 16-bit range
    assert read_image(tmp_path / "i.tif")[0, 0].tolist() == [0, 255, 255, 0]
    assert read_image(tmp_path.parent / tmp_path.name / "i.tif").shape == (3, 1, 4)
    Image.fromarray(np.array([[0.0, 0.25, 1.0, 7.0, -1.0]], np.float32)).save(tmp_path / "f.tif")
    assert read_image(tmp_path / "f.tif")[1, 0].tolist() == [0, 64, 255, 255, 0]


def test_cmyk_converted_to_rgb(image_set):
    red = read_image(image_set / "cmyk.jpg")[:, 12, 20].tolist()
    assert red[0] > 240 and red[1] < 15 and red[2] < 15


def test_alpha_is_composited_on_white_and_returned(image_set):
    rgb, alpha = read_image_with_alpha(image_set / "rgba.png")
    source = np.asarray(Image.open(image_set / "rgba.png"))
    assert alpha.shape == (1, 40, 36) and alpha[0, :20].eq(0).all() and alpha[0, 20:].eq(255).all()
    assert rgb[:, :20].eq(255).all()  # transparent -> white
    assert np.array_equal(rgb[:, 20:].permute(1, 2, 0).numpy(), source[20:, :, :3])  # opaque -> unchanged
    assert read_image_with_alpha(image_set / "odd_333x517.png")[1] is None


def test_palette_transparency_and_la(image_set):
    rgb, alpha = read_image_with_alpha(image_set / "palette.png")
    assert rgb[:, 0, 0].tolist() == [255, 255, 255] and alpha[0, 0, 0] == 0  # transparent index -> white
    assert rgb[:, 0, 12].tolist() == [200, 100, 50] and alpha[0, 0, 12] == 255
    rgb, alpha = read_image_with_alpha(image_set / "la.png")
    assert rgb.eq(77).all() and alpha.eq(255).all()


def test_exif_orientation_applied(image_set):
    image = read_image(image_set / "exif_rotated.jpg")
    assert image.shape == (3, 48, 24)
    assert image[0, 1, 22] > 200 and image[1, 1, 22] < 60  # stored top-left is now top-right
    assert image[0, 1, 1] < 60


def test_pixel_limit_is_configurable_and_restored(image_set):
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(DCAEError, match=r"image is 0.2 Mpx, over the limit of 0.1 Mpx \(raise it with --max-pixels\)"):
        read_image(image_set / "odd_333x517.png", max_pixels=100_000)
    assert read_image(image_set / "odd_333x517.png", max_pixels=333 * 517).shape == (3, 517, 333)
    assert Image.MAX_IMAGE_PIXELS == before
    assert DEFAULT_MAX_PIXELS == 8192 * 8192


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DCAEError, match="cannot read"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(DCAEError, match="is a directory"):
        read_image(tmp_path)


# --- range conversion and writing -----------------------------------------------------------------------------------
def test_model_range_round_trip_is_exact():
    values = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16).expand(3, 16, 16)
    x = to_model_range(values)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    assert torch.equal(from_model_range(x), values)
    assert from_model_range(torch.tensor([-3.0, 3.0, 0.0])).tolist() == [0, 255, 128]


@pytest.mark.parametrize("suffix", [".png", ".webp"])
def test_write_lossless_round_trip_and_alpha(tmp_path, suffix):
    rgba = torch.from_numpy(rng_image(13, 17, 4)).permute(2, 0, 1).contiguous()
    path = tmp_path / f"out{suffix}"
    write_image(path, rgba, quality=100)
    back = np.asarray(Image.open(path))
    assert np.array_equal(back, rgba.permute(1, 2, 0).numpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left


def test_write_jpeg_composites_alpha_and_honours_format(tmp_path):
    rgba = torch.zeros(4, 16, 16, dtype=torch.uint8)  # black, fully transparent -> white
    write_image(tmp_path / "a.out", rgba, format="jpg", quality=90)
    with Image.open(tmp_path / "a.out") as image:
        assert image.format == "JPEG" and image.mode == "RGB" and min(image.getpixel((5, 5))) > 250


def test_write_failure_leaves_nothing(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DCAEError, match="cannot write"):
        write_image(tmp_path / "file" / "out.png", torch.zeros(3, 4, 4, dtype=torch.uint8))
    with pytest.raises(DCAEError, match="cannot write format"):
        write_image(tmp_path / "out.gif", torch.zeros(3, 4, 4, dtype=torch.uint8))
    target = tmp_path / "keep.png"
    target.write_bytes(b"old")
    with pytest.raises(ValueError):
        write_image(target, torch.zeros(3, 4, 4))  # float: refused before anything is written
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["file", "keep.png"]


# --- finding files --------------------------------------------------------------------------------------------------
def test_find_images_recursive_relative_names(image_set):
    found = find_images([image_set])
    relative = [str(r) for _, r in found]
    assert "sub/wide_8x700.png" in relative and "notes.txt" not in relative
    assert relative == sorted(relative) and all(p.suffix.lower() in IMAGE_EXTENSIONS for p, _ in found)
    assert find_images([image_set / "notes.txt"]) == [(image_set / "notes.txt", PurePath("notes.txt"))]
    with pytest.raises(DCAEError, match="no such file"):
        find_images([image_set / "missing.png"])


def test_find_images_skips_hidden(tmp_path):
    (tmp_path / ".cache").mkdir()
    Image.new("RGB", (2, 2)).save(tmp_path / ".cache" / "x.png")
    Image.new("RGB", (2, 2)).save(tmp_path / ".hidden.png")
    Image.new("RGB", (2, 2)).save(tmp_path / "Visible.PNG")
    assert [str(r) for _, r in find_images([tmp_path])] == ["Visible.PNG"]
