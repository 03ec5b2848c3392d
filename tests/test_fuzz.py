"""Fuzzing every parser of outside data: images, latent files, checkpoints and configs, tar shards, CLI values.

Each parser has a hypothesis strategy of hostile inputs (`*_inputs`) and a checker (`check_*`) that states the contract:
a result of the right shape, or a clean `DCAEError` (for the CLI: a non-zero exit and one `dcae <cmd>: error:` line, or
argparse's usage error); never another exception type, never a hang (an alarm per input), never a huge allocation (an
address-space cap while the parser runs, and the resident-set high-water mark measured around it). The default suite
runs a few dozen inputs per parser; `scripts/fuzz.py` runs the same strategies and checkers for thousands.

Bugs this file found are fixed; each keeps a deterministic `@example` that reproduced it (docs/hardening.md lists them).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import os
import resource
import signal
import struct
import tarfile
import tempfile
import warnings
import zlib
from functools import cache
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from PIL import Image

import dcae
from dcae.autoencoder import DCAEConfig, DecoderConfig, EncoderConfig
from dcae.errors import DCAEError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # corrupt files make Pillow warn; we judge outcomes
HANG_SECONDS = 60  # per input; generous because the CI machine may be shared
EXAMPLES = 25  # per parser in the default suite; scripts/fuzz.py runs many more
# derandomize: the default suite tries the same inputs every run (no flaky CI); scripts/fuzz.py explores at random.
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])

# Open bugs (see docs/hardening.md for the fix of each); each test that reproduces one is marked with it.


# ----------------------------------------------------------------------------------------------------------------------
# Guards: hang, address space, resident memory
class Hang(Exception):
    """A parser ran past HANG_SECONDS on one input."""


def _vm_size() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_hwm() -> int | None:
    """The resident-set high-water mark in bytes (Linux), or None where it cannot be read."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_rss_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class _Guard:
    """See `guarded`. A class, not a generator: __exit__ restores the address-space cap as its very first step, before
    anything else can need memory (a half-built model held by the traceback may have used up the headroom)."""

    def __init__(self, seconds: float | None, cap_bytes: int, max_growth: int | None):
        self.seconds, self.cap_bytes, self.max_growth = seconds or HANG_SECONDS, cap_bytes, max_growth

    def __enter__(self) -> "_Guard":
        self.limits = resource.getrlimit(resource.RLIMIT_AS)
        soft, hard = self.limits
        cap = _vm_size() + self.cap_bytes
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        self.baseline = _rss_hwm() if _reset_rss_hwm() else None
        self.previous = signal.signal(signal.SIGALRM, self._on_alarm)
        signal.setitimer(signal.ITIMER_REAL, self.seconds, 0.5)  # re-fires: a Hang raised inside a gc callback is lost
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        return self

    def _on_alarm(self, signum, frame):
        raise Hang(f"no result after {self.seconds} s")

    def __exit__(self, exc_type, exc, tb) -> bool:
        resource.setrlimit(resource.RLIMIT_AS, self.limits)
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.previous)
        growth = (_rss_hwm() or 0) - self.baseline if self.baseline is not None else 0
        if self.max_growth is not None and growth > self.max_growth:  # whether the parser returned or raised
            raise AssertionError(f"resident memory grew by {growth / 2**20:.0f} MiB "
                                 f"(limit {self.max_growth / 2**20:.0f})") from exc
        return False


def guarded(seconds: float | None = None, cap_bytes: int = 3 << 30, max_growth: int | None = 512 << 20) -> _Guard:
    """Run a parser under an alarm (HANG_SECONDS, read at call time), an address-space cap of current + `cap_bytes`,
    and a resident-growth check: the cap keeps a bug from taking the machine down (the allocation fails instead),
    the growth check makes a large but successful allocation a failure."""
    return _Guard(seconds, cap_bytes, max_growth)


def one_line_dcae_error(error: BaseException) -> None:
    assert isinstance(error, DCAEError), f"{type(error).__name__}: {error}"
    assert str(error).strip() and "\n" not in str(error).strip(), f"not one line: {error!r}"


def expect_clean(fn: Callable[[], Any], **guard: Any) -> Any:
    """fn() under `guarded`: its result, or None after a one-line DCAEError; anything else fails the check."""
    try:
        with guarded(**guard):
            return fn()
    except DCAEError as error:
        one_line_dcae_error(error)
        return None


# ----------------------------------------------------------------------------------------------------------------------
# Byte-level mutations shared by every binary format
def _apply(data: bytes, op: tuple) -> bytes:
    kind = op[0]
    n = max(len(data), 1)
    if kind == "truncate":
        return data[: op[1] % n]
    if kind == "flip":
        pos = op[1] % n
        return data[:pos] + bytes([data[pos] ^ (1 << op[2])]) + data[pos + 1:] if data else data
    if kind == "insert":
        pos = op[1] % n
        return data[:pos] + op[2] + data[pos:]
    if kind == "overwrite":
        pos = op[1] % n
        return data[:pos] + op[2] + data[pos + len(op[2]):]
    if kind == "delete":
        pos = op[1] % n
        return data[:pos] + data[pos + op[2]:]
    raise ValueError(kind)


BYTE_OPS = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20)),
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(0, 7)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("overwrite"), st.integers(0, 1 << 20),
              st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00"])
              | st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 20), st.integers(1, 64)),
)


def mutate(data: bytes, ops: list[tuple]) -> bytes:
    for op in ops:
        data = _apply(data, op)
    return data


# ----------------------------------------------------------------------------------------------------------------------
# Images: every format Pillow decodes for us, mutated; declared sizes patched in the headers
def _encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@cache
def image_seeds() -> dict[str, bytes]:
    """Small valid files of each format and several modes (16x12: big enough for real structure)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (12, 16, 4), dtype=np.uint8), "RGBA")
    gray16 = Image.fromarray(rng.integers(0, 65536, (12, 16), dtype=np.uint16))
    return {
        "png": _encode(rgb, "PNG"),
        "png_rgba": _encode(rgba, "PNG"),
        "png_16bit": _encode(gray16, "PNG"),
        "jpeg": _encode(rgb, "JPEG", quality=90),
        "jpeg_progressive": _encode(rgb, "JPEG", progressive=True),
        "webp": _encode(rgb, "WEBP", quality=80),
        "webp_lossless": _encode(rgba, "WEBP", lossless=True),
        "tiff": _encode(rgb, "TIFF"),
        "tiff_deflate": _encode(rgb, "TIFF", compression="tiff_adobe_deflate"),
        "gif": _encode(rgb.convert("P"), "GIF"),
        "gif_animated": _encode(rgb.convert("P"), "GIF", save_all=True, append_images=[rgba.convert("P")]),
        "bmp": _encode(rgb, "BMP"),
    }


def declare_size(data: bytes, width: int, height: int) -> bytes:
    """Patch the declared width and height in the header (the decompression-bomb case), leaving the pixels short."""
    b = bytearray(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":  # IHDR at 8: length, type, width, height, ..., CRC over type + fields
        b[16:24] = struct.pack(">II", width & 0xFFFFFFFF, height & 0xFFFFFFFF)
        b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    elif data[:3] == b"GIF":  # logical screen and the first image descriptor
        b[6:10] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
        pos = data.find(b"\x2c", 13)
        if pos > 0:
            b[pos + 5:pos + 9] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
    elif data[:2] == b"BM":
        b[18:26] = struct.pack("<ii", width & 0x7FFFFFFF, height & 0x7FFFFFFF)
    elif data[:2] == b"\xff\xd8":  # the first SOFn marker: precision, height, width
        for marker in (b"\xff\xc0", b"\xff\xc2"):
            pos = data.find(marker)
            if pos > 0:
                b[pos + 5:pos + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
                break
    elif data[:4] == b"RIFF" and data[12:16] == b"VP8 ":  # lossy frame header: 14-bit sizes
        b[26:30] = struct.pack("<HH", width & 0x3FFF, height & 0x3FFF)
    elif data[:4] == b"RIFF" and data[12:16] == b"VP8L":  # lossless: 14-bit (size - 1) fields packed after 0x2f
        bits = ((width - 1) & 0x3FFF) | (((height - 1) & 0x3FFF) << 14) | (data[24] >> 4 & 0xF) << 28
        b[21:25] = struct.pack("<I", bits)
    elif data[:4] == b"II*\x00":  # little-endian TIFF: ImageWidth (256) and ImageLength (257) in the first IFD
        ifd = struct.unpack("<I", data[4:8])[0]
        count = struct.unpack("<H", data[ifd:ifd + 2])[0]
        for i in range(count):
            entry = ifd + 2 + 12 * i
            tag, kind = struct.unpack("<HH", data[entry:entry + 4])
            if tag in (256, 257):
                value = width if tag == 256 else height
                b[entry + 2:entry + 4] = struct.pack("<H", 4)  # LONG
                b[entry + 8:entry + 12] = struct.pack("<I", value & 0xFFFFFFFF)
    return bytes(b)


SIZES = st.one_of(st.integers(0, 64), st.integers(1 << 14, 1 << 16), st.integers(1 << 30, (1 << 32) - 1))


@st.composite
def image_inputs(draw) -> bytes:
    seeds = image_seeds()
    data = seeds[draw(st.sampled_from(sorted(seeds)))]
    if draw(st.booleans()):
        data = declare_size(data, draw(SIZES), draw(SIZES))
    data = mutate(data, draw(st.lists(BYTE_OPS, max_size=4)))
    if draw(st.integers(0, 19)) == 0:
        data = draw(st.binary(max_size=256))  # or no image at all
    return data


IMAGE_MAX_PIXELS = 1 << 16  # small, so that the limit itself is exercised


def check_image(data: bytes) -> None:
    """read_image and the shard decoder: (3, H, W) uint8 within the pixel limit, or their clean errors."""
    from dcae.data import SkippedImage, decode_image_bytes
    from dcae.images import read_image_with_alpha

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "input.img"
        path.write_bytes(data)
        result = expect_clean(lambda: read_image_with_alpha(path, max_pixels=IMAGE_MAX_PIXELS), max_growth=256 << 20)
    if result is not None:
        rgb, alpha = result
        assert rgb.dtype == torch.uint8 and rgb.ndim == 3 and rgb.shape[0] == 3
        assert rgb.shape[1] * rgb.shape[2] <= IMAGE_MAX_PIXELS
        assert alpha is None or (alpha.dtype == torch.uint8 and alpha.shape == (1, *rgb.shape[1:]))
    try:
        with guarded(max_growth=256 << 20):
            image = decode_image_bytes(data, max_pixels=IMAGE_MAX_PIXELS)
        assert image.dtype == torch.uint8 and image.shape[0] == 3 and image.shape[1] * image.shape[2] <= IMAGE_MAX_PIXELS
    except SkippedImage:
        pass


@FUZZ
@given(image_inputs())
@example(declare_size(image_seeds()["png"], 100_000, 100_000))  # a decompression bomb header
@example(b"")
def test_fuzz_image_decoding(data):
    check_image(data)


def test_image_pixel_limit_is_checked_from_the_header(tmp_path):
    """A 3 GB-pixel PNG header with no pixels: refused from its header, in milliseconds and without memory."""
    path = tmp_path / "bomb.png"
    path.write_bytes(declare_size(image_seeds()["png"], 60_000, 50_000))
    from dcae.images import read_image

    with pytest.raises(DCAEError, match="over the limit"), guarded(seconds=20, max_growth=64 << 20):
        read_image(path)


# ----------------------------------------------------------------------------------------------------------------------
# safetensors files: header-level mutations (the JSON header and its length prefix), then byte-level ones
def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


def join_safetensors(header: dict, body: bytes, length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length & 0xFFFFFFFFFFFFFFFF) + text + body


JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 40), 1 << 40),
                      st.sampled_from([0, -1, 1 << 31, 10 ** 9, 10 ** 18, 1 << 64]),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                      st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "C64", "nope"]))
JSON_VALUES = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)
DTYPES = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3",
                          "F8_E5M2", "U64", "C64", "XX", ""])
SHAPES = st.lists(st.one_of(st.integers(-2, 40), st.sampled_from([0, 1 << 20, 1 << 31, 1 << 40, 1 << 62])),
                  max_size=5)
OFFSETS = st.lists(st.one_of(st.integers(-4, 4096), st.sampled_from([1 << 31, 1 << 40, 1 << 63])), min_size=0,
                   max_size=3)


@st.composite
def header_ops(draw, header: dict) -> list[tuple]:
    """Edits of a safetensors JSON header: metadata values, a tensor's dtype/shape/offsets, keys, the length prefix."""
    tensors = tuple(sorted(k for k in header if k != "__metadata__"))
    meta_keys = tuple(sorted(header.get("__metadata__", {})) + ["height", "width", "dcae_config", "dcae_format",
                                                                  "other"])
    return draw(_header_op_lists(tensors, meta_keys))


@cache
def _header_op_lists(tensors: tuple[str, ...], meta_keys: tuple[str, ...]) -> st.SearchStrategy:
    """The strategy of header_ops for one seed's names, built once (building strategies is most of a draw's cost)."""
    op = st.one_of(
        st.tuples(st.just("meta"), st.sampled_from(meta_keys), st.text(max_size=24)
                  | st.sampled_from(["0", "-1", "1e999", "nan", "99999999999999999999", "[1,2]", "{}", "efficientvit",
                                     "diffusers", "dcae"])),
        st.tuples(st.just("meta_raw"), JSON_VALUES),
        st.tuples(st.just("dtype"), st.sampled_from(tensors), DTYPES),
        st.tuples(st.just("shape"), st.sampled_from(tensors), SHAPES),
        st.tuples(st.just("offsets"), st.sampled_from(tensors), OFFSETS),
        st.tuples(st.just("drop"), st.sampled_from(tensors)),
        st.tuples(st.just("rename"), st.sampled_from(tensors), st.text(max_size=20)),
        st.tuples(st.just("entry"), st.sampled_from(tensors), JSON_VALUES),
        st.tuples(st.just("length"), st.one_of(st.integers(0, 1 << 20), st.sampled_from([1 << 32, 1 << 63]))),
    )
    return st.lists(op, min_size=1, max_size=3)


def apply_header_ops(data: bytes, ops: list[tuple]) -> bytes:
    header, body = split_safetensors(data)
    header = copy.deepcopy(header)
    length = None
    for op in ops:
        kind = op[0]
        if kind == "meta":
            if not isinstance(header.get("__metadata__"), dict):
                header["__metadata__"] = {}
            header["__metadata__"][op[1]] = op[2]
        elif kind == "meta_raw":
            header["__metadata__"] = op[1]
        elif op[1] not in header and kind != "length":
            continue
        elif kind in ("dtype", "shape", "offsets") and not isinstance(header[op[1]], dict):
            continue  # an earlier "entry" op made this tensor's entry something else
        elif kind == "dtype":
            header[op[1]]["dtype"] = op[2]
        elif kind == "shape":
            header[op[1]]["shape"] = op[2]
        elif kind == "offsets":
            header[op[1]]["data_offsets"] = op[2]
        elif kind == "drop":
            header.pop(op[1])
        elif kind == "rename":
            header[op[2]] = header.pop(op[1])
        elif kind == "entry":
            header[op[1]] = op[2]
        elif kind == "length":
            length = op[1]
    return join_safetensors(header, body, length)


@st.composite
def safetensors_inputs(draw, seed: bytes) -> bytes:
    header, _ = split_safetensors(seed)
    data = seed
    if draw(st.booleans()):
        data = apply_header_ops(data, draw(header_ops(header)))
    (length,) = struct.unpack("<Q", seed[:8])
    return mutate(data, draw(_raw_header_op_lists(length, len(seed))))


@cache
def _raw_header_op_lists(length: int, size: int) -> st.SearchStrategy:
    """Raw byte edits aimed at the length prefix and the header, where the structure is."""
    return st.lists(st.one_of(
        st.tuples(st.just("flip"), st.integers(0, length + 8), st.integers(0, 7)),
        st.tuples(st.just("truncate"), st.integers(0, size)),
        st.tuples(st.just("overwrite"), st.integers(0, length + 8), st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("delete"), st.integers(0, length + 8), st.integers(1, 32)),
    ), max_size=3)


# ----------------------------------------------------------------------------------------------------------------------
# Latent files written by `dcae encode`, checked by `dcae decode` (dcae.latent_file.read_latent)
class LatentModel(torch.nn.Module):
    """What read_latent asks of a model: f, c and a config to hash."""

    spatial_factor, latent_channels = 4, 4

    def config_dict(self) -> dict:
        return {"name": "fuzz-stub", "f": 4, "c": 4}


class StructuredLatentModel(LatentModel):
    """A DC-AE 1.5 stand-in: any first k <= c channels decode (read_latent reads `config.structured_latent`)."""

    config = DCAEConfig(name="fuzz-stub-1.5", structured_latent=True)


@cache
def latent_seeds() -> dict[str, bytes]:
    from dcae.latent_file import latent_metadata, write_latent

    model = LatentModel()
    seeds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (height, width, alpha) in {"plain": (20, 24, False), "alpha": (7, 9, True)}.items():
            latent = torch.randn(4, -(-height // 4), -(-width // 4))
            meta = latent_metadata(model, "stub", (height, width), torch.float32, source="x.png", tile="auto")
            path = Path(tmp) / f"{name}.safetensors"
            write_latent(path, latent, meta, torch.full((1, height, width), 7, dtype=torch.uint8) if alpha else None)
            seeds[name] = path.read_bytes()
    return seeds


@st.composite
def latent_inputs(draw) -> tuple[bytes, bool]:
    """(file, structured): a latent file mutated, read for a plain or a structured-latent model."""
    seed = latent_seeds()[draw(st.sampled_from(sorted(latent_seeds())))]
    return draw(safetensors_inputs(seed)), draw(st.booleans())


def check_latent(data: bytes, structured: bool = False) -> None:
    from dcae.latent_file import read_latent

    model = StructuredLatentModel() if structured else LatentModel()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "latent.safetensors"
        path.write_bytes(data)
        result = expect_clean(lambda: read_latent(path, model), max_growth=256 << 20)
    if result is None:
        return
    latent, size, alpha, metadata = result
    assert latent.dtype == torch.float32 and latent.ndim == 4 and latent.shape[0] == 1
    assert latent.shape[1] == 4 or (structured and 1 <= latent.shape[1] < 4)
    assert torch.isfinite(latent).all()
    full = (latent.shape[2] * 4, latent.shape[3] * 4)
    assert size is None or (0 < size[0] <= full[0] and 0 < size[1] <= full[1])
    assert alpha is None or (alpha.dtype == torch.uint8 and tuple(alpha.shape) == (1, *(size or full)))
    assert isinstance(metadata, dict)


@FUZZ
@given(latent_inputs())
def test_fuzz_latent_files(case):
    check_latent(*case)


# ----------------------------------------------------------------------------------------------------------------------
# Latent caches written by `dcae cache-latents`, read by `dcae train-diffusion` (dcae.diffusion.latents)
class CacheModel(torch.nn.Module):
    """A stand-in autoencoder for the cache: the 4x4 average of the image."""

    spatial_factor, latent_channels = 4, 3

    def config_dict(self) -> dict:
        return {"name": "fuzz-cache-stub"}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x, 4)


@cache
def cache_seed() -> tuple[dict, dict[str, bytes]]:
    """(index, {shard file name: bytes}) of a 5-image, 2-class, flipped cache in shards of 2."""
    from PIL import Image

    from dcae.diffusion.latents import cache_latents, list_labeled_images, plan_cache

    root = Path(_WORKDIR.name) / "cache-seed"
    for i in range(5):
        folder = root / "images" / ("cat" if i < 3 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    files, labels, names = list_labeled_images([root / "images"])
    index = plan_cache(files, labels, names, CacheModel(), resolution=8, flip=True, dtype="float16", shard_size=2,
                       autoencoder_source="stub")
    cache_latents(CacheModel(), index, root / "cache")
    return index, {p.name: p.read_bytes() for p in sorted((root / "cache").glob("shard-*.safetensors"))}


@st.composite
def cache_inputs(draw) -> tuple[Any, dict[str, bytes]]:
    """(index as parsed JSON, shard files): the index's values mutated, or one shard's bytes, or both."""
    index, shards = cache_seed()
    index, shards = _json_safe(index), dict(shards)
    what = draw(st.sampled_from(["index", "shard", "both"]))
    if what in ("index", "both"):
        index = _json_safe(draw(config_mutations(index)))
    if what in ("shard", "both"):
        name = draw(st.sampled_from(sorted(shards)))
        shards[name] = draw(safetensors_inputs(shards[name]))
    return index, shards, draw(RAW_JSON) if draw(st.integers(0, 14)) == 0 else None


def check_cache(index: Any, shards: dict[str, bytes], raw: str | None = None) -> None:
    from dcae.diffusion.latents import load_latent_cache

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "index.json").write_text(json.dumps(index) if raw is None else raw, encoding="utf-8",
                                              errors="surrogatepass")
        for name, data in shards.items():
            (Path(tmp) / name).write_bytes(data)
        cache = expect_clean(lambda: load_latent_cache(tmp), max_growth=256 << 20)
    if cache is None:
        return
    n = cache.index["count"] * (2 if cache.index["flip"] else 1)
    assert cache.latents.dtype == torch.float32 and list(cache.latents.shape) == [n, *cache.index["latent_shape"]]
    assert torch.isfinite(cache.latents).all()
    assert cache.labels.shape == (n,) and bool(((cache.labels >= 0) & (cache.labels < max(1, cache.index["num_classes"]))).all())


@FUZZ
@given(cache_inputs())
def test_fuzz_latent_caches(case):
    check_cache(*case)


def test_cache_index_cannot_point_outside_its_folder(tmp_path):
    """A shard named '../x' or '/etc/passwd' in index.json is refused: shard names are fixed."""
    from dcae.diffusion.latents import load_latent_cache

    index, shards = cache_seed()
    for name in ("../shard-00000.safetensors", "/etc/passwd"):
        bad = _json_safe(index)
        bad["shards"][0]["file"] = name
        (tmp_path / "index.json").write_text(json.dumps(bad))
        with pytest.raises(DCAEError, match="shard 0 must be named shard-00000.safetensors"):
            load_latent_cache(tmp_path)


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints and configs: from_pretrained on mutated safetensors, random dcae configs, diffusers config.json
def micro_config() -> DCAEConfig:
    """A 33k-parameter DCAE (f4c4) with every block kind: building and loading it takes milliseconds."""
    blocks = ("ResBlock", "ResBlock", "EViT_GLU")
    return DCAEConfig(name="micro", latent_channels=4, attention_head_dim=8,
                      encoder=EncoderConfig(width_list=(8, 16, 16), depth_list=(0, 1, 1), block_type=blocks),
                      decoder=DecoderConfig(width_list=(8, 16, 16), depth_list=(0, 1, 1), block_type=blocks,
                                            norm=("bn2d", "bn2d", "rms2d"), act=("relu", "relu", "silu")))


_WORKDIR = tempfile.TemporaryDirectory(prefix="dcae-fuzz-")  # module lifetime: seeds written once


LAYOUTS = ("dcae", "diffusers", "efficientvit")


@cache
def micro_checkpoint(layout: str = "dcae") -> Path:
    """save_pretrained of the micro model (seeded), in one of the three layouts."""
    torch.manual_seed(0)
    directory = Path(_WORKDIR.name) / f"micro-{layout}"
    dcae.DCAE(micro_config()).save_pretrained(directory, format=layout)
    return directory


# The newer published families, each as a micro twin: the published config with three of its six stages (the stem, a
# convolution stage, the last stage: attention where the family has it), widths 8-16, at most one block per stage,
# 8 latent channels; every other field (blocks, norms, activations, resampling, shortcuts, structured latent, scaling
# factor) as published.
FAMILIES = {"sana-1.1": "dc-ae-f32c32-sana-1.1", "lite": "dc-ae-lite-f32c32-sana-1.1",
            "1.1": "dc-ae-f32c128-1.1", "1.5": "dc-ae-f32c128-1.5"}
_TWIN_STAGES = (0, 2, 5)


def family_config(family: str) -> DCAEConfig:
    """The micro twin of a published family (`micro` is the original micro config)."""
    from dcae.presets import get_config

    if family == "micro":
        return micro_config()
    published = get_config(FAMILIES[family])

    def pick(value: Any) -> Any:
        return tuple(value[i] for i in _TWIN_STAGES) if isinstance(value, (tuple, list)) else value

    def shrink(side: Any) -> Any:
        fields = {f.name: pick(getattr(side, f.name)) for f in dataclasses.fields(side)}
        depths = tuple(min(d, 1) for d in fields["depth_list"])  # an empty stage stays empty (a strided stem)
        return dataclasses.replace(side, **{**fields, "width_list": (8, 16, 16), "depth_list": depths})

    return dataclasses.replace(published, name=f"micro-{family}", latent_channels=8, attention_head_dim=8,
                               encoder=shrink(published.encoder), decoder=shrink(published.decoder))


@cache
def family_checkpoint(family: str, layout: str) -> Path:
    """save_pretrained of a family's micro twin (seeded) in one layout; `micro` is micro_checkpoint."""
    if family == "micro":
        return micro_checkpoint(layout)
    torch.manual_seed(0)
    directory = Path(_WORKDIR.name) / f"{family}-{layout}"
    with warnings_ignored():  # the diffusers layout warns that a twin has no measured scaling factor
        dcae.DCAE(family_config(family)).save_pretrained(directory, format=layout)
    return directory


@contextlib.contextmanager
def warnings_ignored() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def family_checkpoints() -> list[Path]:
    """Every family's twin in every layout, and the preset shapes a config-less file is matched against (cached, so
    that the children of scripts/fuzz.py inherit them)."""
    from dcae.presets import infer_config

    paths = [family_checkpoint(f, layout) for f in ("micro", *FAMILIES) for layout in LAYOUTS]
    with contextlib.suppress(DCAEError):
        infer_config({}, "efficientvit", None, "warm-up")
    return paths


def _weights_file(directory: Path) -> Path:
    return next(p for p in sorted(directory.glob("*.safetensors")))


def without_config(data: bytes) -> bytes:
    """A safetensors file with its metadata (and so the dcae config in it) removed."""
    header, body = split_safetensors(data)
    header.pop("__metadata__", None)
    return join_safetensors(header, body)


@st.composite
def checkpoint_inputs(draw) -> tuple[str, bytes]:
    layout = draw(st.sampled_from(LAYOUTS))
    seed = _weights_file(micro_checkpoint(layout)).read_bytes()
    return layout, draw(safetensors_inputs(seed))


@st.composite
def family_checkpoint_inputs(draw) -> tuple[str, bytes, str, str]:
    """(layout, weights file, family, config): a newer family's twin, mutated, with its config in the metadata and
    config.json, in the metadata only, or nowhere (loaded by matching keys and shapes against the presets)."""
    family, layout = draw(st.sampled_from(sorted(FAMILIES))), draw(st.sampled_from(LAYOUTS))
    config = draw(st.sampled_from(["metadata+config.json", "metadata", "none"]))
    seed = _weights_file(family_checkpoint(family, layout)).read_bytes()
    if config == "none":
        seed = without_config(seed)
    return layout, draw(safetensors_inputs(seed)), family, config


def check_loaded(model: Any) -> None:
    assert isinstance(model, dcae.DCAE)
    x = torch.zeros(1, model.config.in_channels, model.spatial_factor, model.spatial_factor)
    assert model.encode(x).shape[1] == model.latent_channels


def check_checkpoint(layout: str, data: bytes, family: str = "micro", config: str = "metadata+config.json") -> None:
    """A checkpoint directory (a micro model's, its weights file mutated) loads or gives a DCAEError."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "ckpt"
        source = family_checkpoint(family, layout)
        directory.mkdir()
        if config == "metadata+config.json":
            (directory / "config.json").write_bytes((source / "config.json").read_bytes())
        (directory / _weights_file(source).name).write_bytes(data)
        model = expect_clean(lambda: dcae.DCAE.from_pretrained(directory), max_growth=512 << 20)
    if model is not None:
        check_loaded(model)


@FUZZ
@given(checkpoint_inputs())
def test_fuzz_checkpoint_files(case):
    check_checkpoint(*case)


@FUZZ
@given(family_checkpoint_inputs())
def test_fuzz_checkpoints_of_the_newer_families(case):
    check_checkpoint(*case)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_family_twins_load_in_every_layout(family, layout):
    """The seeds of the family fuzzer are real checkpoints: each twin saves and loads back in every layout."""
    source = family_checkpoint(family, layout)
    model = dcae.DCAE.from_pretrained(source)
    assert model.config.structured_latent == family_config(family).structured_latent
    check_loaded(model)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a node of a nested JSON value."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, inner in value.items():
            out += _paths(inner, prefix + (key,))
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            out += _paths(inner, prefix + (i,))
    return out


def _set(value: Any, path: tuple, new: Any) -> Any:
    value = copy.deepcopy(value)
    target = value
    for key in path[:-1]:
        target = target[key]
    if new is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = new
    return value


_DELETE = object()
CONFIG_VALUES = st.one_of(
    JSON_VALUES,
    st.sampled_from([-1, 0, 10 ** 9, 1 << 40, "32", 3.5, True, None, [], {}, [10 ** 9] * 3, [-8, 16, 16], [0, 0, 0],
                     [8] * 40, [1 << 20, 1, 1], "rms2d", "bn2d", "ResBlock", "EViTS5_GLU", "relu", "gelu", "none"]),
)


@st.composite
def config_mutations(draw, base: dict) -> dict:
    config = base
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(config)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        new = _DELETE if draw(st.integers(0, 9)) == 0 and not isinstance(path[-1], int) else draw(CONFIG_VALUES)
        config = _set(config, path, new)
    if draw(st.integers(0, 9)) == 0:
        config = draw(JSON_VALUES)  # not even an object
    return config


# JSON texts no mutation of a value writes: nesting past the decoder's recursion limit, a byte-order mark, a lone
# surrogate, NaN, an empty file, a value that is not an object.
RAW_JSON = st.sampled_from(["[" * 100_000, '{"a":' * 100_000, "", "NaN", "1e999", '"\\ud800"', "\ufeff{}", "{}", "[]",
                            "null", '{"encoder": {}, "decoder": {}}', "\x00", "[" * 50 + "]" * 50])


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value))  # NaN/Infinity survive as JSON extensions, like a hand-edited file


@st.composite
def config_inputs(draw) -> tuple[str, Any, str]:
    """(where, config, family): a dcae config in the safetensors metadata or in config.json, or a diffusers
    config.json, of the micro model or of a newer family's twin."""
    where = draw(st.sampled_from(["metadata", "config.json", "diffusers"]))
    family = draw(st.sampled_from(["micro", *sorted(FAMILIES)]))
    if where == "diffusers":
        from dcae.weights import diffusers_config

        with warnings_ignored():
            base = diffusers_config(family_config(family))
    else:
        base = family_config(family).to_dict()
    raw = draw(RAW_JSON) if draw(st.integers(0, 14)) == 0 else None
    return where, _json_safe(draw(config_mutations(_json_safe(base)))), family, raw


def check_config(where: str, config: Any, family: str = "micro", raw: str | None = None) -> None:
    """Write a micro model's weights with a mutated config; loading gives a model or a DCAEError, quickly."""
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "ckpt"
        directory.mkdir()
        layout = "diffusers" if where == "diffusers" else "dcae"
        source = _weights_file(family_checkpoint(family, layout))
        tensors = load_file(str(source))
        text = json.dumps(config) if raw is None else raw
        if where == "metadata":
            save_file(tensors, str(directory / source.name), metadata={"format": "pt", "dcae_config": text})
        else:
            save_file(tensors, str(directory / source.name), metadata={"format": "pt"})
            (directory / "config.json").write_text(text, encoding="utf-8", errors="surrogatepass")
        model = expect_clean(lambda: dcae.DCAE.from_pretrained(directory), max_growth=512 << 20)
    if model is not None:
        check_loaded(model)


_ABSURD = micro_config().to_dict()
_ABSURD["encoder"]["width_list"] = [8, 10 ** 9, 16]  # 10^9 channels: gigabytes before any check
@FUZZ
@given(config_inputs())
@example(("metadata", _ABSURD))
@example(("config.json", {**micro_config().to_dict(), "latent_channels": "4"}))
def test_fuzz_configs(case):
    check_config(*case)


# ----------------------------------------------------------------------------------------------------------------------
# Webdataset tar shards: hostile member names and types, corrupt bytes; read in memory, never extracted
@cache
def shard_images() -> list[bytes]:
    rng = np.random.default_rng(1)
    pictures = [Image.fromarray(rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)) for _ in range(2)]
    return [_encode(pictures[0], "JPEG"), _encode(pictures[1], "PNG")]


MEMBER_NAMES = st.one_of(
    st.sampled_from(["0001.jpg", "0002.png", "../escape.jpg", "/tmp/dcae-fuzz-abs.jpg", "a/../../up.png",
                     "./dot.jpg", "dir/deep/x.jpg", "noext", ".hidden.jpg", "__key__.jpg", "a" * 300 + ".jpg",
                     "x.jpg/", "x.JPG", "dup.jpg"]),
    st.text(min_size=1, max_size=30).map(lambda s: s + ".jpg"),
)
MEMBER_TYPES = st.sampled_from(["file", "file", "file", "symlink", "hardlink", "dir", "fifo", "chardev"])


@st.composite
def shard_inputs(draw) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for _ in range(draw(st.integers(0, 5))):
            info = tarfile.TarInfo(draw(MEMBER_NAMES))
            kind = draw(MEMBER_TYPES)
            payload = b""
            if kind == "file":
                payload = draw(st.sampled_from(shard_images()) | st.binary(max_size=64))
                info.size = len(payload)
            else:
                info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "dir": tarfile.DIRTYPE,
                             "fifo": tarfile.FIFOTYPE, "chardev": tarfile.CHRTYPE}[kind]
                info.linkname = draw(st.sampled_from(["/etc/passwd", "../../etc/shadow", "0001.jpg"]))
            tar.addfile(info, io.BytesIO(payload) if payload else None)
    data = buffer.getvalue()
    if draw(st.booleans()):
        data = mutate(data, draw(st.lists(BYTE_OPS, min_size=1, max_size=3)))
    return data


def check_shard(data: bytes) -> None:
    """TrainStream over one shard: (1, 3, 32, 32) crops in [-1, 1], or 'no usable images'; nothing written."""
    from dcae.data import DataConfig, TrainStream

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shard = root / "shards" / "train-000.tar"
        shard.parent.mkdir()
        shard.write_bytes(data)
        before_cwd, before_root = set(os.listdir(".")), sorted(str(p) for p in root.rglob("*"))
        before_tmp = set(os.listdir(tempfile.gettempdir()))

        def take() -> list[torch.Tensor]:
            stream = TrainStream(DataConfig(path=str(shard), num_workers=0), resolution=32, batch_size=1, seed=0)
            try:
                return [next(stream)[0] for _ in range(3)]
            finally:
                stream.close()

        batches = expect_clean(take, max_growth=256 << 20)
        assert set(os.listdir(".")) == before_cwd, "a tar member was written into the working directory"
        assert sorted(str(p) for p in root.rglob("*")) == before_root, "a tar member was written beside the shard"
        assert not {n for n in set(os.listdir(tempfile.gettempdir())) - before_tmp if "escape" in n or "dcae-fuzz-abs"
                    in n}, "a tar member escaped to /tmp"
    for x in batches or []:
        assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1


@FUZZ
@given(shard_inputs())
def test_fuzz_tar_shards(data):
    check_shard(data)


# ----------------------------------------------------------------------------------------------------------------------
# Command-line values
NUMBER_TEXT = st.one_of(
    st.integers(-(1 << 70), 1 << 70).map(str),
    st.sampled_from(["", " ", "nan", "inf", "-inf", "1e999", "-1e999", "1e3", "0x10", "-0", "+5", " 12 ", "１２",
                     "٣", "1_000", "3.5", "0", "-1", "4", "8", "none", "auto", "None", "--", "-", "\x00", "12a"]),
    st.text(max_size=12),
)


@cache
def cli_inputs_dir() -> Path:
    """A 20x24 PNG and its latent from the micro model."""
    from dcae.cli import main
    from dcae.images import write_image

    root = Path(_WORKDIR.name) / "cli"
    (root / "images").mkdir(parents=True)
    write_image(root / "images" / "img.png", torch.randint(0, 256, (3, 20, 24), dtype=torch.uint8,
                                                           generator=torch.Generator().manual_seed(0)))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["encode", str(root / "images"), "-o", str(root / "latents"),
                     "--model", str(micro_checkpoint("dcae"))]) == 0
    return root


IMAGE_OPTIONS = ["--batch-size", "--max-pixels", "--tile", "--overlap", "--max-memory"]  # numeric values
TRAIN_OPTIONS = ["--steps", "--batch-size", "--resolution", "--seed", "--num-workers", "--phase-steps"]
TRAIN_KEYS = ["steps", "seed", "batch_size", "optim.lr", "phase.resolution", "betas", "optim.betas", "ema_decay",
              "data.num_workers", "data.max_pixels", "phase.use_gan", "precision", "val_every", "gan.weight",
              "phase.optim.warmup_steps", "data.val_resolution", "nonexistent", "phase", "data", ""]


@st.composite
def cli_inputs(draw) -> list[str]:
    command = draw(st.sampled_from(["encode", "decode", "reconstruct", "train"]))
    if command == "train":
        args = ["train", "--phase", "1", "--data", "DATA"]
        for _ in range(draw(st.integers(1, 2))):
            if draw(st.booleans()):
                args += [draw(st.sampled_from(TRAIN_OPTIONS)), draw(NUMBER_TEXT)]
            else:
                args.append(f"{draw(st.sampled_from(TRAIN_KEYS))}={draw(NUMBER_TEXT)}")
        return args + ["--print-config"]  # parse and resolve every value, train nothing
    args = [command, "INPUT", "-o", "OUT", "--model", "MODEL"]
    for _ in range(draw(st.integers(1, 2))):
        option = draw(st.sampled_from(IMAGE_OPTIONS if command == "encode" else IMAGE_OPTIONS + ["--quality", "--format"]))
        args += [option, draw(NUMBER_TEXT)]
    return args


def check_cli(argv: list[str]) -> None:
    """main(argv) with its placeholders filled in (INPUT, OUT, MODEL, DATA): see `check_main`."""
    root = cli_inputs_dir()
    with tempfile.TemporaryDirectory() as tmp:
        inputs = {"encode": root / "images", "reconstruct": root / "images", "decode": root / "latents"}
        substitutions = {"INPUT": str(inputs.get(argv[0], "")), "OUT": str(Path(tmp) / "out"),
                         "MODEL": str(micro_checkpoint("dcae")), "DATA": str(root / "images")}
        check_main([substitutions.get(a, a) for a in argv])


def check_main(argv: list[str], max_growth: int = 1 << 30) -> int:
    """main(argv) under `guarded`: exit 0, or non-zero with argparse's usage error or one `dcae <cmd>: error:` line
    (warnings and the runtime's info line aside); returns the exit status."""
    from dcae.cli import main

    err, out = io.StringIO(), io.StringIO()
    code: Any = None
    try:
        with guarded(max_growth=max_growth), contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    stderr = err.getvalue()
    assert isinstance(code, int), f"exit status {code!r}"
    assert "Traceback" not in stderr, stderr
    if code == 0:
        return code
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, f"exit {code} without a message"
    if lines[0].startswith("usage:"):  # argparse: usage lines, then `dcae <cmd>: error: ...`
        assert lines[-1].startswith(f"dcae {argv[0]}: error: "), stderr
        return code
    notes = (f"dcae {argv[0]}: warning: ", "dcae: warning: ", f"dcae {argv[0]}: running on ")  # not errors
    errors = [line for line in lines if not line.startswith(notes)]
    assert len(errors) == 1 and errors[0].startswith(f"dcae {argv[0]}: error: "), stderr
    return code


@FUZZ
@given(cli_inputs())
@example(["encode", "INPUT", "-o", "OUT", "--model", "MODEL", "--tile", "1e3"])
@example(["decode", "INPUT", "-o", "OUT", "--model", "MODEL", "--max-pixels", "-1"])
def test_fuzz_cli_values(argv):
    check_cli(argv)
@pytest.mark.parametrize("value", ["1e999", "-1e999"])
def test_train_override_overflow_is_a_clean_error(value):
    check_cli(["train", "--phase", "1", "--data", "DATA", f"steps={value}", "--print-config"])


@pytest.mark.parametrize("fmt,quality", [("webp", "1000"), ("webp", "-5"), ("jpg", "1000")])
def test_quality_out_of_range_is_refused(fmt, quality):
    """--quality is documented as 1-100: outside it, exit 2 with one line (found here: webp raised ValueError and jpg
    wrote a file; fixed in commands/options.check_options)."""
    from dcae.cli import main

    root = cli_inputs_dir()
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["reconstruct", str(root / "images"), "-o", tmp, "--model", str(micro_checkpoint("dcae")),
                "--format", fmt, "--quality", quality]
        check_cli(argv)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            assert main(argv) == 2
        assert err.getvalue().startswith("dcae reconstruct: error: ") and "quality" in err.getvalue()
@pytest.mark.parametrize("argv", [
    ["train", "--phase", "1", "--data", "DATA", "steps=1\n2", "--print-config"],  # found by the fuzzer with \x1d
    ["train", "--phase", "1", "--data", "DATA", "phase.use_gan=yes\u2028no", "--print-config"],
])
def test_error_messages_stay_one_line_whatever_the_user_typed(argv):
    check_cli(argv)
def test_metrics_on_images_smaller_than_lpips_needs():
    """`dcae metrics a.png b.png` on 20x24 images: a result or one error line, not a RuntimeError traceback."""
    image = cli_inputs_dir() / "images" / "img.png"
    check_cli(["metrics", str(image), str(image)])
