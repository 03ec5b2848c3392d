"""The DC-AE encoder, decoder and autoencoder, built from a typed config."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from dcae.errors import DCAEError
from dcae.nn import (
    DOWNSAMPLE_BLOCKS,
    UPSAMPLE_BLOCKS,
    DownsampleBlock,
    LatentProjectIn,
    LatentProjectOut,
    UpsampleBlock,
    build_act,
    build_block,
    build_norm,
)


def _per_stage(value: str | tuple | list, stages: int, what: str) -> tuple:
    """A single value for all stages, or one per stage."""
    if isinstance(value, (tuple, list)):
        if len(value) != stages:
            raise ValueError(f"{what} has {len(value)} entries for {stages} stages")
        return tuple(value)
    return (value,) * stages


@dataclass
class EncoderConfig:
    width_list: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)  # one stage per width; f = 2^(stages-1)
    depth_list: tuple[int, ...] = (0, 4, 8, 2, 2, 2)  # blocks per stage; an empty stage 0 means a strided stem
    block_type: tuple[str, ...] = ("ResBlock",) * 3 + ("EViT_GLU",) * 3  # convs at high resolution, attention deep
    norm: str = "rms2d"  # RMSNorm over channels: no batch statistics, so inference matches training at any batch
    act: str = "silu"
    downsample_block: str = "pixel_unshuffle"  # conv to out/4 + pixel_unshuffle; "conv": stride-2 conv (Sana)
    downsample_shortcut: str | None = "averaging"  # residual autoencoding: space-to-channel then channel averaging
    out_shortcut: bool = True  # the latent is learned as a residual to the channel-averaged last stage


@dataclass
class DecoderConfig:
    width_list: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    depth_list: tuple[int, ...] = (0, 5, 10, 2, 2, 2)  # the decoder is deeper: it carries the reconstruction
    block_type: tuple[str, ...] = ("ResBlock",) * 3 + ("EViT_GLU",) * 3
    norm: tuple[str, ...] = ("bn2d",) * 3 + ("rms2d",) * 3  # published in/mix models use BatchNorm in stages 0-2
    act: tuple[str, ...] = ("relu",) * 3 + ("silu",) * 3
    upsample_block: str = "pixel_shuffle"  # conv to out*4 + pixel_shuffle; "interpolate": nearest 2x + conv (Sana)
    upsample_shortcut: str | None = "duplicating"  # residual autoencoding: channel duplication then channel-to-space
    in_shortcut: bool = True  # the first feature map is learned as a residual to the duplicated latent
    out_norm: str = "rms2d"  # decoder head: norm -> act -> conv (-> pixel shuffle); no tanh
    out_act: str = "relu"


@dataclass
class DCAEConfig:
    name: str = "custom"  # preset name, recorded in checkpoints
    in_channels: int = 3
    latent_channels: int = 32
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    attention_head_dim: int = 32  # LiteMLA head width; heads = channels / 32
    scaling_factor: float | None = None  # 1 / RMS of latents (docs/models.md), applied by diffusion code; None: unmeasured
    structured_latent: bool = False  # DC-AE 1.5: encode(x, channels=k) emits the first k channels, decode takes any k <= c

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.encoder.width_list) - 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DCAEConfig":
        """Rebuild from `to_dict()`; unknown keys are an error (a typo in a config must not pass silently)."""
        if not isinstance(d, dict):
            raise ValueError(f"config: expected an object, got {type(d).__name__}")
        d = dict(d)
        encoder = _dataclass_from_dict(EncoderConfig, d.pop("encoder", {}), "encoder")
        decoder = _dataclass_from_dict(DecoderConfig, d.pop("decoder", {}), "decoder")
        top = _dataclass_from_dict(cls, d, "config", skip=("encoder", "decoder"))
        config = dataclasses.replace(top, encoder=encoder, decoder=decoder)
        config.validate()
        return config

    def validate(self) -> None:
        """Check types and ranges before any weight exists (a config file is outside data); ValueError names the key."""
        _check_int(self.in_channels, "in_channels", 1, MAX_CHANNELS)
        _check_int(self.latent_channels, "latent_channels", 1, MAX_CHANNELS)
        _check_int(self.attention_head_dim, "attention_head_dim", 1, MAX_WIDTH)
        if not isinstance(self.name, str):
            raise ValueError(f"name={self.name!r}: expected a string")
        scaling = self.scaling_factor
        if scaling is not None and (isinstance(scaling, bool) or not isinstance(scaling, (int, float))
                                    or not math.isfinite(scaling) or scaling <= 0):
            raise ValueError(f"scaling_factor={scaling!r}: expected a positive finite number or null")
        stages = []
        for side, cfg in (("encoder", self.encoder), ("decoder", self.decoder)):
            widths, depths = cfg.width_list, cfg.depth_list
            if not isinstance(widths, (tuple, list)) or not 2 <= len(widths) <= MAX_STAGES:
                raise ValueError(f"{side}.width_list={widths!r}: expected 2 to {MAX_STAGES} widths")
            if not isinstance(depths, (tuple, list)) or len(depths) != len(widths):
                raise ValueError(f"{side}.depth_list={depths!r}: expected one depth per width ({len(widths)})")
            for i, (width, depth) in enumerate(zip(widths, depths)):
                _check_int(width, f"{side}.width_list[{i}]", 1, MAX_WIDTH)
                _check_int(depth, f"{side}.depth_list[{i}]", 0, MAX_DEPTH)
            choices = [("block_type", BLOCK_TYPES)]
            choices += [("norm", NORMS), ("act", ACTS)] if side == "decoder" else []
            for key, allowed in choices:
                for value in _per_stage(getattr(cfg, key), len(widths), f"{side}.{key}"):
                    if not isinstance(value, (str, type(None))) or value not in allowed:
                        raise ValueError(f"{side}.{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
            stages.append(len(widths))
        enc, dec = self.encoder, self.decoder
        for key, value, allowed in (("encoder.norm", enc.norm, NORMS), ("encoder.act", enc.act, ACTS),
                                    ("encoder.downsample_shortcut", enc.downsample_shortcut, DOWNSAMPLE_SHORTCUTS),
                                    ("decoder.upsample_shortcut", dec.upsample_shortcut, UPSAMPLE_SHORTCUTS),
                                    ("decoder.out_norm", dec.out_norm, NORMS), ("decoder.out_act", dec.out_act, ACTS),
                                    ("encoder.out_shortcut", enc.out_shortcut, (True, False)),
                                    ("decoder.in_shortcut", dec.in_shortcut, (True, False))):
            if not isinstance(value, (str, bool, type(None))) or value not in allowed:
                raise ValueError(f"{key}={value!r}: expected one of {', '.join(map(str, allowed))}")
        if stages[0] != stages[1]:
            raise ValueError("encoder and decoder must have the same number of stages")
        if enc.downsample_block not in DOWNSAMPLE_BLOCKS:
            raise ValueError(f"encoder.downsample_block={enc.downsample_block!r}: expected one of "
                             f"{', '.join(DOWNSAMPLE_BLOCKS)}")
        if dec.upsample_block not in UPSAMPLE_BLOCKS:
            raise ValueError(f"decoder.upsample_block={dec.upsample_block!r}: expected one of {', '.join(UPSAMPLE_BLOCKS)}")
        if self.structured_latent not in (True, False):
            raise ValueError(f"structured_latent={self.structured_latent!r}: expected true or false")
        if self.structured_latent and (enc.out_shortcut or dec.in_shortcut):
            # The averaging/duplicating latent shortcuts group channels by c: a k-channel prefix has no such form.
            raise ValueError("structured_latent needs encoder.out_shortcut and decoder.in_shortcut off")


# Bounds for configs read from files: far above every preset, far below what would exhaust a machine.
MAX_STAGES, MAX_WIDTH, MAX_DEPTH, MAX_CHANNELS = 10, 16384, 64, 4096
BLOCK_TYPES = ("ResBlock", "EViT_GLU", "EViTS5_GLU")
NORMS = ("rms2d", "trms2d", "bn2d", "none", None)
ACTS = ("silu", "relu", "gelu", "none", None)
DOWNSAMPLE_SHORTCUTS = ("averaging", "pooling", None)
UPSAMPLE_SHORTCUTS = ("duplicating", "interpolate", None)


def _check_int(value: Any, what: str, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what}={value!r}: expected an integer from {low} to {high}")


def _dataclass_from_dict(cls, d: dict, where: str, skip: tuple[str, ...] = ()):
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)} - set(skip)
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**kwargs)


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig, in_channels: int, latent_channels: int, head_dim: int):
        super().__init__()
        widths, depths = cfg.width_list, cfg.depth_list
        n = len(widths)
        if len(depths) != n:
            raise ValueError(f"encoder: {len(depths)} depths for {n} widths")
        block_types = _per_stage(cfg.block_type, n, "encoder.block_type")
        # Stem: a 3x3 conv, or (empty stage 0) a down-sampling block without shortcut straight to stage 1's width.
        if depths[0] > 0:
            self.project_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        else:
            self.project_in = DownsampleBlock(in_channels, widths[1], shortcut=None, block=cfg.downsample_block)
        self.stages = nn.ModuleList()
        for i, (width, depth) in enumerate(zip(widths, depths)):
            blocks = [build_block(block_types[i], width, cfg.norm, cfg.act, head_dim) for _ in range(depth)]
            if i < n - 1 and depth > 0:
                blocks.append(DownsampleBlock(width, widths[i + 1], shortcut=cfg.downsample_shortcut,
                                              block=cfg.downsample_block))
            self.stages.append(nn.Sequential(*blocks))
        self.project_out = LatentProjectOut(widths[-1], latent_channels, shortcut=cfg.out_shortcut)

    def forward(self, x: torch.Tensor, channels: int | None = None) -> torch.Tensor:
        x = self.project_in(x)  # (B, C0, H, W) or (B, C1, H/2, W/2)
        for stage in self.stages:
            x = stage(x)  # each non-final stage halves H, W
        return self.project_out(x, channels)  # (B, c or k, H/f, W/f)


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, out_channels: int, latent_channels: int, head_dim: int):
        super().__init__()
        widths, depths = cfg.width_list, cfg.depth_list
        n = len(widths)
        if len(depths) != n:
            raise ValueError(f"decoder: {len(depths)} depths for {n} widths")
        block_types = _per_stage(cfg.block_type, n, "decoder.block_type")
        norms = _per_stage(cfg.norm, n, "decoder.norm")
        acts = _per_stage(cfg.act, n, "decoder.act")
        self.project_in = LatentProjectIn(latent_channels, widths[-1], shortcut=cfg.in_shortcut)
        # Stages are stored shallow-to-deep (index = resolution level) like the encoder, and run deep-to-shallow.
        stages: list[nn.Module] = [nn.Sequential()] * n
        for i in reversed(range(n)):
            blocks: list[nn.Module] = []
            if i < n - 1 and depths[i] > 0:
                blocks.append(UpsampleBlock(widths[i + 1], widths[i], shortcut=cfg.upsample_shortcut,
                                            block=cfg.upsample_block))
            blocks += [build_block(block_types[i], widths[i], norms[i], acts[i], head_dim) for _ in range(depths[i])]
            stages[i] = nn.Sequential(*blocks)
        self.stages = nn.ModuleList(stages)
        head_width = widths[0] if depths[0] > 0 else widths[1]
        self.norm_out = build_norm(cfg.out_norm, head_width)
        self.act_out = build_act(cfg.out_act)
        if depths[0] > 0:
            self.project_out = nn.Conv2d(head_width, out_channels, 3, padding=1)
        else:
            self.project_out = UpsampleBlock(head_width, out_channels, shortcut=None, block=cfg.upsample_block)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project_in(z)  # (B, C_last, h, w)
        for stage in reversed(self.stages):
            x = stage(x)  # each non-final stage doubles H, W
        return self.project_out(self.act_out(self.norm_out(x)))  # (B, 3, H, W)


class DCAE(nn.Module):
    """Deep Compression Autoencoder: `encode` images in [-1, 1] to raw latents, `decode` latents back."""

    def __init__(self, config: DCAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.encoder, config.in_channels, config.latent_channels, config.attention_head_dim)
        self.decoder = Decoder(config.decoder, config.in_channels, config.latent_channels, config.attention_head_dim)
        if config.spatial_factor != 2 ** (len(config.decoder.width_list) - 1):
            raise ValueError("encoder and decoder must have the same number of stages")

    @property
    def spatial_factor(self) -> int:
        return self.config.spatial_factor

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def scaling_factor(self) -> float | None:
        return self.config.scaling_factor

    def config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    def _check_input(self, x: torch.Tensor, channels: int, factor: int, what: str) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{what}: expected (B, {channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"{what}: H and W must be multiples of {factor}, got {tuple(x.shape[-2:])}")

    def encode(self, x: torch.Tensor, channels: int | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> raw latent (B, c, H/f, W/f) (not multiplied by scaling_factor).

        channels=k (structured-latent models): only the first k latent channels, (B, k, H/f, W/f).
        """
        self._check_input(x, self.config.in_channels, self.spatial_factor, "encode")
        if channels is not None:
            check_latent_channels(self.config, channels)
        return self.encoder(x, channels)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent (B, c, h, w) -> (B, 3, h*f, w*f), roughly in [-1, 1] (not clamped).

        Structured-latent models also take (B, k, h, w) for any k <= c: the first k channels of a latent.
        """
        if self.config.structured_latent and z.ndim == 4 and 1 <= z.shape[1] <= self.latent_channels:
            self._check_input(z, z.shape[1], 1, "decode")
        else:
            self._check_input(z, self.latent_channels, 1, "decode")
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # --- parameter groups used by the training phases --------------------------------------------------------------
    def latent_adaptation_parameters(self) -> Iterator[nn.Parameter]:
        """Phase 2 (high-resolution latent adaptation): the layers next to the latent. The encoder's deepest stage and
        output projection, the decoder's input projection and deepest stage: these see the latent's low-resolution
        context, the part of the model whose behaviour changes when images (and so latents) get larger."""
        deepest_encoder = _deepest_nonempty(self.encoder.stages)
        deepest_decoder = _deepest_nonempty(self.decoder.stages)
        for module in (deepest_encoder, self.encoder.project_out, self.decoder.project_in, deepest_decoder):
            yield from module.parameters()

    def decoder_head_parameters(self) -> Iterator[nn.Parameter]:
        """Phase 3 (local refinement): the decoder head, output norm and the last conv (+ pixel shuffle)."""
        yield from self.decoder.norm_out.parameters()
        yield from self.decoder.project_out.parameters()

    # --- checkpoints --------------------------------------------------------------------------------------------------
    # Conveniences in the diffusers style. The model does not depend on checkpoint code: `dcae.pretrained` (which
    # needs the preset registry, which needs this module) is imported when these are called, never at import time.
    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, **kwargs: Any) -> "DCAE":
        """Load a dcae, diffusers or efficientvit checkpoint: a file, a directory, or a Hugging Face Hub id."""
        from dcae.pretrained import load_pretrained

        return load_pretrained(path_or_id, **kwargs)

    def save_pretrained(self, directory: str | Path, format: str = "dcae") -> Path:
        """Write the weights (and config) in the `dcae`, `diffusers` or `efficientvit` layout; returns the directory."""
        from dcae.weights import save_pretrained

        return save_pretrained(self, directory, format=format)


def check_latent_channels(config: DCAEConfig, channels: int) -> None:
    """DCAEError unless `channels` latent channels can be asked of this model (`--channels`, `encode(channels=)`)."""
    if isinstance(channels, bool) or not isinstance(channels, int) or not 1 <= channels <= config.latent_channels:
        raise DCAEError(f"channels={channels!r}: expected an integer from 1 to {config.latent_channels}")
    if channels != config.latent_channels and not config.structured_latent:
        raise DCAEError(f"model {config.name!r} has no structured latent: it encodes all {config.latent_channels} "
                        "channels or none (DC-AE 1.5 models, e.g. dc-ae-f32c128-1.5, can emit fewer)")


def _deepest_nonempty(stages: nn.ModuleList) -> nn.Module:
    for stage in reversed(stages):
        if len(stage) > 0:
            return stage
    raise ValueError("model has no non-empty stage")
