"""Autoencoder training: the three phases of Decoupled High-Resolution Adaptation (DC-AE paper, Sec. 3.3) as data.

A phase is a `PhaseConfig`: which parameters train, which losses with which weights, at which resolution, with which
optimizer. `train(config)` runs one phase from a single CPU process up to `torchrun --nproc_per_node=N` DDP; every
`ckpt_every` steps (and on SIGINT/SIGTERM) it writes an atomic checkpoint from which `train(config, resume=True)`
continues bit-exactly. `train_recipe` chains phase 1 -> 2 -> 3, each initialised from the last. See docs/training.md.

Run directory (the shared layout and its helpers are dcae/runs.py's):
    config.json              the resolved TrainConfig (training config, not the model's)
    log.jsonl                one JSON object per log / validation / event line
    model.safetensors        latest weights (dcae format, config in metadata): DCAE.from_pretrained(run_dir)
    ema.safetensors          latest EMA weights: DCAE.from_pretrained(run_dir, weights="ema")
    samples/step_N.png       validation images (top) over their reconstructions (bottom)
    checkpoints/latest       name of the newest complete checkpoint (replaced atomically)
    checkpoints/step_N/      model.safetensors + config.json (save_pretrained), ema.safetensors, state.pt, train_config.json
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from dcae.config import apply_overrides as config_overrides
from dcae.config import config_from_dict, config_to_dict, is_finite_number, is_integer
from dcae.data import DataConfig, TrainStream, load_validation_images
from dcae.errors import DCAEError
from dcae.losses import GAN_LOSSES, GANConfig, GANLoss, ReconstructionLoss
from dcae.runs import (
    PRECISIONS, Dist, JsonlLog, OptimConfig, StopFlag, all_finite, barrier, build_optimizer, config_text, gather,
    init_distributed, latest_checkpoint, load_optimizer_state, load_state, lr_at, open_run, precision_record,
    read_json_file, reduce_mean, replace_with_link, report_stop, resolve_precision, run_dir_errors, save_run_config,
    update_ema, wrap_ddp, write_checkpoint_dir,
)
from dcae.runtime import autocast
from dcae.tensorboard import TensorBoardLogger

TRAINABLE_SETS = ("all", "latent_adaptation", "decoder_head")
MASK_PER = ("batch", "sample")


# ----------------------------------------------------------------------------------------------------------------------
# Configs
@dataclass
class StructuredLatentConfig:
    """DC-AE 1.5's structured latent (arXiv 2508.00413): each step keeps the first c' latent channels, zeroes the rest.

    Needs a model built with `structured_latent` (no latent shortcuts). See docs/structured_latent.md.
    """
    enabled: bool = False
    channels: tuple[int, ...] = ()  # candidate kept-channel counts c'; () = channel_step, 2*channel_step, ..., and C
    channel_step: int = 16  # spacing of the default candidates (16 -> 8 candidates for c=128)
    per: str = "batch"  # "batch": one c' per step for the global batch (paper: "per iteration"); "sample": per image
    full_prob: float = 0.0  # extra chance of keeping all C channels; 0 = uniform over the candidates (C is one of them)


@dataclass
class PhaseConfig:
    phase: int = 1  # 1 low-res full training, 2 high-res latent adaptation, 3 low-res local refinement
    trainable: str = "all"  # "all" | "latent_adaptation" | "decoder_head" (the model's parameter groups)
    resolution: int = 256  # square random crops
    l1_weight: float = 1.0
    mse_weight: float = 0.0  # squared error in [-1, 1] units: a PSNR-targeted last stage uses it
    lpips_weight: float = 1.0  # LPIPS(alex), as taming's perceptual_weight
    use_gan: bool = False  # add the PatchGAN generator loss (and train the discriminator)
    gan: GANConfig = field(default_factory=GANConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    grad_checkpointing: bool = False  # recompute encoder/decoder stages in backward (saves activation memory)
    structured_latent: StructuredLatentConfig = field(default_factory=StructuredLatentConfig)


def phase_config(phase: int) -> PhaseConfig:
    """The defaults of each phase (paper: lr 6.4e-5 / 1.6e-5 / 5.4e-5, wd 0.1 / 1e-3, phase-3 betas (0.5, 0.9))."""
    if phase == 1:
        return PhaseConfig(phase=1, trainable="all", resolution=256,
                           optim=OptimConfig(lr=6.4e-5, weight_decay=0.1, warmup_steps=500))
    if phase == 2:
        return PhaseConfig(phase=2, trainable="latent_adaptation", resolution=512, grad_checkpointing=True,
                           optim=OptimConfig(lr=1.6e-5, weight_decay=1e-3, warmup_steps=200))
    if phase == 3:
        return PhaseConfig(phase=3, trainable="decoder_head", resolution=256, use_gan=True,
                           gan=GANConfig(weight=0.5, adaptive=True, loss="hinge", disc_warmup_steps=200),
                           optim=OptimConfig(lr=5.4e-5, weight_decay=0.0, betas=(0.5, 0.9), warmup_steps=200))
    raise DCAEError(f"unknown phase {phase}; choose 1, 2 or 3")


@dataclass
class TrainConfig:
    preset: str = "dc-ae-tiny-f32c32"  # model preset (ignored when `init` gives a checkpoint)
    init: str | None = None  # start from these weights: a run dir, a save_pretrained dir, a .safetensors, a Hub id
    run_dir: str = "runs/dcae"
    seed: int = 0  # model init, data order, crops
    steps: int = 1000  # train until this step (a resumed run continues to it)
    batch_size: int = 8  # per process; the global batch is batch_size * world size
    precision: str = "auto"  # "fp32" | "bf16" (autocast) | "auto": bf16 where native (CUDA, AVX512-BF16/AMX CPUs)
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    ema_decay: float = 0.9999
    sync_batchnorm: bool = True  # CUDA DDP only: one set of BatchNorm statistics over all ranks (gloo has no SyncBN)
    log_every: int = 10
    val_every: int = 500  # validation metrics and a sample grid (needs data.val_path)
    ckpt_every: int = 500
    keep_checkpoints: int = 3  # older step_N directories are removed
    max_bad_steps: int = 10  # stop after this many non-finite losses/gradients in a row
    progress: bool = True  # tqdm bar on rank 0
    tensorboard: bool = False  # mirror log.jsonl (and validation sample grids) to RUN_DIR/tensorboard, rank 0
    phase: PhaseConfig = field(default_factory=PhaseConfig)
    data: DataConfig = field(default_factory=DataConfig)


def resolve_key(config: TrainConfig, key: str) -> str:
    """Accept short keys: a first part that is a PhaseConfig field means `phase.` (optim.lr -> phase.optim.lr)."""
    first = key.split(".")[0]
    top = {f.name for f in dataclasses.fields(TrainConfig)}
    if first not in top and first in {f.name for f in dataclasses.fields(PhaseConfig)}:
        return f"phase.{key}"
    return key


def apply_overrides(config: TrainConfig, overrides: Iterable[str] = (),
                    settings: Mapping[str, Any] | None = None) -> TrainConfig:
    """A copy with typed `settings` ({dotted key: value}, e.g. from flags) and then dotted `key=value` overrides
    applied, e.g. ["optim.lr=1e-4", "phase.resolution=256"]; short keys as in `resolve_key`."""
    return config_overrides(config, overrides, settings, resolve_key=lambda key: resolve_key(config, key))


def check_config(config: TrainConfig) -> None:
    """Reject values that would fail later with a less clear message."""
    if config.phase.trainable not in TRAINABLE_SETS:
        raise DCAEError(f"phase.trainable={config.phase.trainable!r}: choose from {', '.join(TRAINABLE_SETS)}")
    if config.precision not in PRECISIONS:
        raise DCAEError(f"precision={config.precision!r}: choose auto, fp32 or bf16")
    for name in ("steps", "batch_size", "log_every", "val_every", "ckpt_every", "max_bad_steps"):
        if getattr(config, name) < (0 if name == "steps" else 1):
            raise DCAEError(f"{name}={getattr(config, name)}: must be positive")
    structured = config.phase.structured_latent
    if structured.per not in MASK_PER:
        raise DCAEError(f"phase.structured_latent.per={structured.per!r}: choose batch or sample")
    if structured.channel_step < 1:
        raise DCAEError(f"phase.structured_latent.channel_step={structured.channel_step}: must be at least 1")
    if not (math.isfinite(structured.full_prob) and 0.0 <= structured.full_prob <= 1.0):
        raise DCAEError(f"phase.structured_latent.full_prob={structured.full_prob}: expected a number from 0 to 1")
    if config.phase.resolution < 8:
        raise DCAEError(f"phase.resolution={config.phase.resolution}: too small")
    if config.phase.resolution ** 2 > config.data.max_pixels:
        raise DCAEError(f"phase.resolution={config.phase.resolution}: a crop over data.max_pixels="
                        f"{config.data.max_pixels} pixels")
    if not 0 <= config.seed < 2 ** 63:
        raise DCAEError(f"seed={config.seed}: must be from 0 to 2^63-1")
    data, optim = config.data, config.phase.optim
    for name, value, low in (("data.num_workers", data.num_workers, 0), ("data.prefetch_factor", data.prefetch_factor, 1),
                             ("data.max_retries", data.max_retries, 1), ("data.max_pixels", data.max_pixels, 1),
                             ("data.min_size", data.min_size, 1), ("optim.warmup_steps", optim.warmup_steps, 0)):
        if value < low:
            raise DCAEError(f"{name}={value}: must be at least {low}")
    checks = (("ema_decay", config.ema_decay, 0.0 <= config.ema_decay <= 1.0, "from 0 to 1"),
              ("optim.lr", optim.lr, optim.lr >= 0, "a finite number >= 0"),
              ("optim.weight_decay", optim.weight_decay, optim.weight_decay >= 0, "a finite number >= 0"),
              ("optim.eps", optim.eps, optim.eps > 0, "a finite number > 0"),
              ("optim.grad_clip", optim.grad_clip, optim.grad_clip >= 0, "a finite number >= 0 (0 = off)"),
              ("optim.betas", optim.betas, len(optim.betas) == 2 and all(0.0 <= b < 1.0 for b in optim.betas),
               "two numbers in [0, 1)"))
    for name, value, ok, expected in checks:
        finite = all(math.isfinite(v) for v in (value if isinstance(value, tuple) else (value,)))
        if not (ok and finite):
            raise DCAEError(f"{name}={value}: expected {expected}")
    check_gan(config.phase.gan)


def check_gan(gan: GANConfig) -> None:
    """phase.gan: every field the discriminator, its loss or its AdamW would refuse later with a traceback."""
    number, integer = is_finite_number, is_integer
    checks = (("loss", gan.loss in GAN_LOSSES, f"one of {', '.join(GAN_LOSSES)}"),
              ("norm", gan.norm in ("group", "batch"), "group or batch"),
              ("weight", number(gan.weight, 0), "a finite number >= 0"),
              ("disc_lr", gan.disc_lr is None or number(gan.disc_lr, 0),
               "a finite number >= 0 (or null: the phase's lr)"),
              ("disc_warmup_steps", integer(gan.disc_warmup_steps, 0, 2 ** 62), "an integer >= 0"),
              ("n_layers", integer(gan.n_layers, 1, 8), "an integer from 1 to 8"),
              ("ndf", integer(gan.ndf, 1, 4096) and (gan.norm != "group" or gan.ndf % 32 == 0),
               "an integer from 1 to 4096 (a multiple of 32 with norm=group: GroupNorm(32))"))
    for name, ok, expected in checks:
        if not ok:
            raise DCAEError(f"phase.gan.{name}={getattr(gan, name)!r}: expected {expected}")


# ----------------------------------------------------------------------------------------------------------------------
# Small named helpers
def trainable_parameters(model: nn.Module, which: str) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze the phase's parameter set; returns it in a stable order."""
    chosen = {"all": model.parameters, "latent_adaptation": model.latent_adaptation_parameters,
              "decoder_head": model.decoder_head_parameters}[which]()
    chosen_ids = {id(p) for p in chosen}
    model.requires_grad_(False)
    params = [p for p in model.parameters() if id(p) in chosen_ids]
    for p in params:
        p.requires_grad_(True)
    return params


def set_train_mode(model: nn.Module) -> None:
    """model.train(), but modules whose own parameters are all frozen stay in eval (frozen BatchNorm keeps its stats)."""
    model.train()
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if own and not any(p.requires_grad for p in own):
            module.eval()


@contextlib.contextmanager
def _batchnorm_stats_frozen(module: nn.Module) -> Iterator[None]:
    """During checkpoint recomputation: normalise with batch stats as before, but do not update running stats twice."""
    saved = [(m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in module.modules() if isinstance(m, _BatchNorm) and m.training]
    for m, _, _ in saved:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def _checkpointed_forward(module: nn.Module):
    forward = module.forward

    def run(x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return forward(x)
        calls: list[int] = []

        def once_then_recompute(inner: torch.Tensor) -> torch.Tensor:
            if calls:
                with _batchnorm_stats_frozen(module):
                    return forward(inner)
            calls.append(1)
            return forward(inner)

        return checkpoint(once_then_recompute, x, use_reentrant=False)

    return run


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Recompute each non-empty encoder/decoder stage in backward instead of storing its activations.

    Sets an instance-level `forward` on the stage modules (state_dict keys unchanged); returns how many stages.
    """
    count = 0
    for stages in (model.encoder.stages, model.decoder.stages):
        for stage in stages:
            if len(stage) > 0:
                stage.forward = _checkpointed_forward(stage)
                count += 1
    return count


def last_decoder_layer(model: nn.Module) -> torch.Tensor:
    """The weight of the decoder's output conv: where taming balances GAN and reconstruction gradients."""
    weights = [p for p in model.decoder_head_parameters() if p.ndim == 4]
    return weights[-1]


# ----------------------------------------------------------------------------------------------------------------------
# Structured latent (DC-AE 1.5): keep a random prefix of the latent channels
MASK_STREAM = 0x534C  # separates the channel-mask RNG from the data RNG (both seeded by `seed`)


def candidate_channels(cfg: StructuredLatentConfig, latent_channels: int) -> tuple[int, ...]:
    """The kept-channel counts c' a step may draw, ascending: `cfg.channels`, or every multiple of `channel_step` up
    to C plus C itself. DCAEError for a count outside 1..C."""
    if cfg.channels:
        bad = [c for c in cfg.channels
               if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= latent_channels]
        if bad:
            raise DCAEError(f"phase.structured_latent.channels={','.join(map(str, cfg.channels))}: "
                            f"{bad[0]} is outside 1..{latent_channels} (the model's latent channels)")
        return tuple(sorted(set(cfg.channels)))
    return tuple(sorted(set(range(cfg.channel_step, latent_channels + 1, cfg.channel_step)) | {latent_channels}))


def check_structured_latent(cfg: StructuredLatentConfig, model_config: Any) -> tuple[int, ...]:
    """The candidates when structured-latent training can run on this model; else a one-line DCAEError."""
    if not model_config.structured_latent:
        raise DCAEError(f"phase.structured_latent.enabled=true: model {model_config.name!r} has no structured latent "
                        "(its latent shortcuts mix all channels); train a DC-AE 1.5 preset, e.g. "
                        "dc-ae-tiny-f32c128-1.5")
    return candidate_channels(cfg, model_config.latent_channels)


def sample_kept_channels(cfg: StructuredLatentConfig, candidates: tuple[int, ...], latent_channels: int, seed: int,
                         step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """c' for each of rank `rank`'s `batch_size` images at `step`, (batch_size,) int64: a pure function of
    (seed, step, rank), so exact resume needs no saved generator.

    With probability `full_prob` c' = C, else uniform over `candidates`. The draw is for the global batch:
    `per="batch"` once (every rank gets the same c'), `per="sample"` once per image, rank r of W taking images
    r, r+W, ... (the data's interleaving: W ranks of batch B see the c' one process of batch B*W sees).
    """
    rng = np.random.default_rng([seed, MASK_STREAM, step])
    global_batch = batch_size * world_size
    draws = 1 if cfg.per == "batch" else global_batch
    full = rng.random(draws) < cfg.full_prob
    kept = np.where(full, latent_channels, rng.choice(np.asarray(candidates, dtype=np.int64), size=draws))
    return torch.from_numpy(np.broadcast_to(kept, (global_batch,))[rank::world_size].astype(np.int64))


def channel_mask(kept: torch.Tensor, latent_channels: int) -> torch.Tensor:
    """(B,) kept counts -> (B, C, 1, 1) float mask, [1]*c' + [0]*(C - c') per image (the paper's mask_{c,c'})."""
    return (torch.arange(latent_channels, device=kept.device) < kept[:, None]).float()[:, :, None, None]


class ChannelMaskedAutoencoder(nn.Module):
    """encode -> multiply the latent by a channel mask -> decode: the training forward of a structured latent.

    Zeroing (not slicing) keeps one graph for any mix of c' in a batch; a zeroed channel gets zero gradient and,
    with no latent shortcut, decodes exactly as the c'-channel prefix (dcae.nn.LatentProjectIn).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        z = self.model.encode(x)  # (B, C, h, w)
        return self.model.decode(z * mask.to(z.dtype))  # (B, 3, H, W)


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints
def save_checkpoint(run_dir: Path, step: int, model: nn.Module, ema: nn.Module, state: dict[str, Any],
                    config: TrainConfig) -> Path:
    """Write checkpoints/step_N atomically (temp dir, rename, then the `latest` pointer) and refresh the top level."""
    if not (all_finite(model) and all_finite(ema)):
        raise DCAEError(f"step {step}: refusing to save a checkpoint with non-finite weights")

    def write_files(tmp: Path) -> None:
        model.save_pretrained(tmp)  # model.safetensors (config in metadata) + config.json
        ema.save_pretrained(tmp / "ema")
        os.replace(tmp / "ema" / "model.safetensors", tmp / "ema.safetensors")
        shutil.rmtree(tmp / "ema")
        torch.save(state, tmp / "state.pt")
        (tmp / "train_config.json").write_text(config_text(config))

    final = write_checkpoint_dir(run_dir, step, write_files, keep_last=config.keep_checkpoints)
    replace_with_link(final / "model.safetensors", run_dir / "model.safetensors")
    replace_with_link(final / "ema.safetensors", run_dir / "ema.safetensors")
    return final


# ----------------------------------------------------------------------------------------------------------------------
# Validation and logs
@torch.no_grad()
def validate(model: nn.Module, images: torch.Tensor, lpips: nn.Module, d: Dist, precision: str,
             batch_size: int = 4, channels: int | None = None) -> dict[str, float]:
    """PSNR (through uint8, as dcae.metrics) and LPIPS of reconstructions, split over ranks and summed.

    `channels=k` (structured latents): reconstruct from the first k latent channels.

    Leaves the model in eval mode (the caller restores its training mode: frozen layers must stay in eval).
    """
    from dcae.metrics import MeanAccumulator, psnr, quantize

    model.eval()
    psnrs, lpipss = MeanAccumulator(), MeanAccumulator()
    mine = images[d.rank::d.world_size]
    for i in range(0, len(mine), batch_size):
        x = mine[i:i + batch_size].to(d.device)
        with autocast(d.device, precision):
            y = model.decode(model.encode(x, channels=channels)).float()  # (B, 3, R, R)
        psnrs.update(psnr(quantize(x), quantize(y)))
        lpipss.update(lpips(y.clamp(-1, 1), x))
    psnrs.all_reduce()
    lpipss.all_reduce()
    return {"val_psnr": psnrs.mean, "val_lpips": lpipss.mean}


@torch.no_grad()
def save_sample_grid(path: Path, model: nn.Module, images: torch.Tensor, device: torch.device,
                     precision: str) -> torch.Tensor:
    """Up to 8 images in a row over their reconstructions, one PNG; returns the (3, H, W) uint8 grid (leaves the model
    in eval mode)."""
    from dcae.images import write_image
    from dcae.metrics import to_uint8

    model.eval()
    x = images[:8].to(device)
    with autocast(device, precision):
        y = model(x).float()
    rows = [torch.cat(list(to_uint8(t).cpu()), dim=2) for t in (x, y)]  # each (3, R, n*R)
    grid = torch.cat(rows, dim=1)  # (3, 2R, n*R)
    write_image(path, grid)
    return grid


# ----------------------------------------------------------------------------------------------------------------------
# The training loop
METRICS = ("loss", "l1", "mse", "lpips", "g_loss", "gan_weight", "d_loss", "grad_norm", "kept_channels", "bad",
           "skipped", "stop")


def build_model(config: TrainConfig, resume_from: Path | None) -> nn.Module:
    import dcae

    torch.manual_seed(config.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    if resume_from is not None:
        return dcae.DCAE.from_pretrained(resume_from)
    if config.init:
        return dcae.DCAE.from_pretrained(config.init)
    try:
        return dcae.create_model(config.preset)
    except KeyError as error:
        raise DCAEError(str(error).strip("'\"")) from None


class MetricWindow:
    """Sums of the reduced metrics between two log lines, and the seconds spent in training steps."""

    def __init__(self):
        self.total, self.good_steps, self.steps, self.seconds = torch.zeros(len(METRICS), dtype=torch.float64), 0, 0, 0.0

    def add(self, vector: torch.Tensor, bad: bool, seconds: float) -> None:
        self.steps, self.seconds = self.steps + 1, self.seconds + seconds
        if not bad:
            self.total += vector
            self.good_steps += 1

    def means(self) -> dict[str, float]:
        return {k: float(self.total[i] / max(self.good_steps, 1)) for i, k in enumerate(METRICS)
                if k not in ("bad", "skipped", "stop")}


class Trainer:
    """What one phase's training holds: model, EMA, optimizers, losses, data stream, step and counters."""

    def __init__(self, config: TrainConfig, d: Dist, resume_from: Path | None):
        self.config, self.d, self.phase = config, d, config.phase
        self.precision = resolve_precision(config.precision, d.device)
        self.run_dir = Path(config.run_dir)
        self.model = build_model(config, resume_from).to(d.device)
        if config.init and resume_from is None:  # record what was actually trained
            self.config = config = dataclasses.replace(config, preset=self.model.config.name)
        factor = self.model.spatial_factor
        for name, size in (("phase.resolution", self.phase.resolution), ("data.val_resolution", config.data.val_resolution)):
            if size is not None and size % factor:
                raise DCAEError(f"{name}={size}: must be a multiple of the model's spatial factor {factor}")
        self.params = trainable_parameters(self.model, self.phase.trainable)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()  # before checkpointing patches forward
        if self.phase.grad_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.optimizer = build_optimizer(self.params, self.phase.optim)
        # Structured latent: the candidate c' (empty when off); the DDP module then takes (x, mask).
        self.candidates: tuple[int, ...] = ()
        if self.phase.structured_latent.enabled:
            self.candidates = check_structured_latent(self.phase.structured_latent, self.model.config)
        forward = ChannelMaskedAutoencoder(self.model) if self.candidates else self.model
        self.ddp_model = wrap_ddp(forward, d, config.sync_batchnorm)
        self.reconstruction = ReconstructionLoss(self.phase.l1_weight, self.phase.lpips_weight,
                                                 mse_weight=self.phase.mse_weight).to(d.device)
        self.gan: GANLoss | None = None
        if self.phase.use_gan:
            self.gan = GANLoss(self.phase.gan).to(d.device).train()
            disc_lr = self.phase.gan.disc_lr
            self.disc_optimizer = torch.optim.AdamW(
                self.gan.discriminator.parameters(), lr=self.phase.optim.lr if disc_lr is None else disc_lr,
                betas=tuple(self.phase.optim.betas), weight_decay=0.0)
            self.ddp_disc = wrap_ddp(self.gan.discriminator, d)
            self.last_layer = last_decoder_layer(self.model)
        self.step, self.counters = 0, {"skipped_images": 0, "bad_steps": 0, "bad_in_row": 0}
        data_state = self.restore(load_state(resume_from), resume_from) if resume_from is not None else None
        self.stream = TrainStream(config.data, self.phase.resolution, config.batch_size, config.seed, d.rank,
                                  d.world_size, data_state)
        self.val_images = load_validation_images(config.data, config.data.val_resolution or self.phase.resolution)
        self.lpips = self.reconstruction.perceptual
        if len(self.val_images) and self.lpips is None:
            from dcae.perceptual import LPIPS

            self.lpips = LPIPS("alex").to(d.device)
        self.tensorboard = TensorBoardLogger(self.run_dir / "tensorboard" if config.tensorboard and d.is_main else None)
        self.log = JsonlLog(self.run_dir / "log.jsonl" if d.is_main else None, self.tensorboard)

    def restore(self, state: dict[str, Any], source: Path) -> dict[str, Any]:
        """Load optimizer/EMA/discriminator/RNG/counters from a checkpoint; returns this rank's data position."""
        from dcae.weights import load_state_dict_strict, read_safetensors

        load_state_dict_strict(self.ema, read_safetensors(source / "ema.safetensors")[0], str(source))
        self.step, self.counters = int(state["step"]), dict(state["counters"])
        load_optimizer_state(self.optimizer, state["optimizer"], f"{source}/state.pt")
        if self.gan is not None and state.get("discriminator") is not None:
            load_state_dict_strict(self.gan.discriminator, state["discriminator"], f"{source}/state.pt discriminator")
            load_optimizer_state(self.disc_optimizer, state["disc_optimizer"], f"{source}/state.pt disc_optimizer")
        torch.set_rng_state(state["rng"]["torch"])
        if self.d.device.type == "cuda" and state["rng"].get("cuda"):
            torch.cuda.set_rng_state(state["rng"]["cuda"][0])
        per_rank = state["data"]
        if per_rank[0]["kind"] == "shards" and len(per_rank) != self.d.world_size:
            raise DCAEError(f"{source}: saved with {len(per_rank)} processes; shard data resumes only with the same number")
        return per_rank[min(self.d.rank, len(per_rank) - 1)]

    def train_step(self, x: torch.Tensor, skipped: int, stop_requested: bool) -> tuple[torch.Tensor, bool]:
        """One optimizer step (phase 3: and one discriminator step); a non-finite step is undone and counted.

        Returns the metrics averaged over ranks (in METRICS order) and whether the step was dropped.
        """
        phase, d = self.phase, self.d
        lr = lr_at(self.step, phase.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        buffers_before = [b.clone() for b in self.model.buffers()]  # BatchNorm stats move in forward: undo if bad
        kept = None  # structured latent: (B,) c' per image
        if self.candidates:
            kept = sample_kept_channels(phase.structured_latent, self.candidates, self.model.latent_channels,
                                        self.config.seed, self.step, self.config.batch_size, d.rank, d.world_size)
        with autocast(d.device, self.precision):
            if kept is None:
                y = self.ddp_model(x)  # (B, 3, R, R)
            else:
                y = self.ddp_model(x, channel_mask(kept.to(d.device), self.model.latent_channels))  # (B, 3, R, R)
            loss, logs = self.reconstruction(x, y)
            if self.gan is not None:
                self.gan.discriminator.requires_grad_(False)  # the generator's loss must not train the critic
                g_term, g_logs = self.gan.generator_loss(y, loss, self.step, self.last_layer,
                                                         discriminator=self.gan.discriminator)
                self.gan.discriminator.requires_grad_(True)
                loss = loss + g_term
                logs.update(g_logs)
        loss.backward()  # every rank always runs backward (keeps DDP in step); a bad step is dropped below
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, phase.optim.grad_clip or float("inf"))
        values = {"loss": loss.detach(), "grad_norm": grad_norm, "skipped": float(skipped),
                  "stop": float(stop_requested), **logs}
        if kept is not None:
            values["kept_channels"] = kept.double().mean()  # averaged over ranks: the global batch's mean c'
        bad_local = not (torch.isfinite(loss) and torch.isfinite(grad_norm))
        if self.gan is not None:
            with autocast(d.device, self.precision):
                d_loss, d_logs = self.gan.discriminator_loss(x, y, discriminator=self.ddp_disc)
            self.disc_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            d_norm = torch.nn.utils.clip_grad_norm_(self.gan.discriminator.parameters(),
                                                    phase.optim.grad_clip or float("inf"))
            values["d_loss"] = d_logs["d_loss"]
            bad_local = bad_local or not (torch.isfinite(d_loss) and torch.isfinite(d_norm))
        values["bad"] = float(bad_local)
        vector = torch.tensor([float(values.get(k, 0.0)) for k in METRICS], dtype=torch.float64)
        vector = reduce_mean(vector, d)  # one all-reduce: metrics, the bad-step flag and the stop flag
        bad = bool(vector[METRICS.index("bad")] > 0) or not bool(torch.isfinite(vector[: METRICS.index("bad")]).all())
        if bad:
            with torch.no_grad():
                for buffer, before in zip(self.model.buffers(), buffers_before):
                    buffer.copy_(before)
            self.optimizer.zero_grad(set_to_none=True)
            if self.gan is not None:
                self.disc_optimizer.zero_grad(set_to_none=True)
            self.counters["bad_steps"] += 1
            self.counters["bad_in_row"] += 1
            self.log.write(event="nonfinite", step=self.step, bad_in_row=self.counters["bad_in_row"])
            if self.counters["bad_in_row"] >= self.config.max_bad_steps:
                raise DCAEError(f"{self.counters['bad_in_row']} non-finite losses or gradients in a row at step "
                                f"{self.step}; stopped (last checkpoint: {latest_checkpoint(self.run_dir)})")
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.gan is not None:
                self.disc_optimizer.step()
            update_ema(self.ema, self.model, self.config.ema_decay)
            self.counters["bad_in_row"] = 0
        self.counters["skipped_images"] += int(round(float(vector[METRICS.index("skipped")]) * d.world_size))
        self.step += 1
        return vector, bad

    def log_window(self, window: MetricWindow) -> dict[str, float]:
        """Write one log line of window means; returns them."""
        means = window.means()
        if not self.phase.use_gan:
            for k in ("g_loss", "gan_weight", "d_loss"):
                means.pop(k)
        if self.phase.lpips_weight <= 0:
            means.pop("lpips")
        if self.phase.mse_weight <= 0:
            means.pop("mse")
        if not self.candidates:
            means.pop("kept_channels")
        images_per_s = window.steps * self.config.batch_size * self.d.world_size / max(window.seconds, 1e-9)
        self.log.write(step=self.step, lr=lr_at(self.step - 1, self.phase.optim), images_per_s=images_per_s,
                       skipped_images=self.counters["skipped_images"], bad_steps=self.counters["bad_steps"], **means)
        return {"loss": means["loss"], "images_per_s": images_per_s}

    def save(self) -> None:
        """Checkpoint (rank 0 writes; all ranks take part in gathering data positions)."""
        positions = gather(self.stream.state_dict(), self.d)  # every rank's data position
        if self.d.is_main:
            state = {"step": self.step, "counters": self.counters, "data": positions,
                     "optimizer": self.optimizer.state_dict(),
                     "discriminator": self.gan.discriminator.state_dict() if self.gan is not None else None,
                     "disc_optimizer": self.disc_optimizer.state_dict() if self.gan is not None else None,
                     "rng": {"torch": torch.get_rng_state(),
                             "cuda": [torch.cuda.get_rng_state()] if self.d.device.type == "cuda" else []},
                     "world_size": self.d.world_size, "batch_size": self.config.batch_size}
            with run_dir_errors(self.run_dir):
                path = save_checkpoint(self.run_dir, self.step, self.model, self.ema, state, self.config)
            self.log.write(event="checkpoint", step=self.step, path=str(path))
        barrier(self.d)

    def validate(self) -> dict[str, float] | None:
        """Validation metrics (all ranks) and a sample grid (rank 0), if there is validation data."""
        if not len(self.val_images):
            return None
        metrics = validate(self.model, self.val_images, self.lpips, self.d, self.precision)
        if self.candidates and self.candidates[0] < self.model.latent_channels:  # also the smallest prefix
            k = self.candidates[0]
            fewest = validate(self.model, self.val_images, self.lpips, self.d, self.precision, channels=k)
            metrics.update({f"{name}_c{k}": value for name, value in fewest.items()})
        if self.d.is_main:
            grid = save_sample_grid(self.run_dir / "samples" / f"step_{self.step:08d}.png", self.model,
                                    self.val_images, self.d.device, self.precision)
            self.tensorboard.image(self.step, "val/samples", grid)
            self.log.write(event="val", step=self.step, **metrics)
        set_train_mode(self.model)
        return metrics


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Train one phase until `config.steps`; returns the run directory. `resume=True` continues its latest checkpoint.

    SIGINT/SIGTERM: checkpoint at the end of the current step, then raise KeyboardInterrupt.
    """
    from tqdm import tqdm

    check_config(config)
    d = init_distributed(config.device)
    run_dir = Path(config.run_dir)
    resume_from = open_run(run_dir, resume)
    trainer = Trainer(config, d, resume_from)
    config = trainer.config
    if d.is_main:
        save_run_config(run_dir, config)
        trainer.log.write(event="resume" if resume_from else "start", step=trainer.step, world_size=d.world_size,
                          device=str(d.device), **precision_record(config.precision, trainer.precision, d.device),
                          data=trainer.stream.kind,
                          trainable_params=sum(p.numel() for p in trainer.params),
                          total_params=sum(p.numel() for p in trainer.model.parameters()),
                          **({"kept_channel_candidates": list(trainer.candidates)} if trainer.candidates else {}),
                          resumed_from=str(resume_from) if resume_from else None)
    bar = tqdm(total=config.steps, initial=trainer.step, disable=not (d.is_main and config.progress),
               dynamic_ncols=True, desc=f"phase {config.phase.phase}")

    def validate_and_report() -> None:
        metrics = trainer.validate()
        if metrics is not None and d.is_main:
            fewest = "".join(f", {k.removeprefix('val_')} {v:.2f}" for k, v in metrics.items()
                             if k.startswith("val_psnr_c"))
            bar.write(f"step {trainer.step}: val PSNR {metrics['val_psnr']:.2f} dB, LPIPS {metrics['val_lpips']:.4f}"
                      f"{fewest}")

    set_train_mode(trainer.model)
    window, interrupted = MetricWindow(), ""
    if resume_from is None:
        validate_and_report()
    try:
        with StopFlag() as stop:
            while trainer.step < config.steps:
                started = time.perf_counter()
                x, skipped = next(trainer.stream)
                vector, bad = trainer.train_step(x.to(d.device, non_blocking=True), skipped, stop.requested)
                window.add(torch.nan_to_num(vector), bad, time.perf_counter() - started)
                bar.update(1)
                step = trainer.step
                if step % config.log_every == 0 or step == config.steps:
                    shown = trainer.log_window(window)
                    bar.set_postfix(loss=f"{shown['loss']:.4f}", img_s=f"{shown['images_per_s']:.1f}")
                    window = MetricWindow()
                if step % config.val_every == 0 and step < config.steps:
                    validate_and_report()
                if vector[METRICS.index("stop")] > 0:
                    interrupted = stop.signal_name or "a signal on another rank"
                    break
                if step % config.ckpt_every == 0 and step < config.steps:
                    trainer.save()
            trainer.save()
            if not interrupted:
                validate_and_report()
    finally:
        bar.close()
        trainer.stream.close()
        trainer.log.close()
    if interrupted:
        if d.is_main:
            report_stop(trainer.log, "train", trainer.step, interrupted, run_dir)
        raise KeyboardInterrupt
    if d.is_main:
        trainer.log.write(event="done", step=trainer.step, skipped_images=trainer.counters["skipped_images"],
                          bad_steps=trainer.counters["bad_steps"])
    return run_dir


def load_run_config(run_dir: str | Path, overrides: Iterable[str] = (),
                    settings: Mapping[str, Any] | None = None) -> TrainConfig:
    """The TrainConfig saved in a run directory, with settings and overrides (e.g. a new `steps`) applied."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise DCAEError(f"{run_dir}: not a training run (no config.json)")
    data = read_json_file(path)
    if isinstance(data, dict) and "recipe" in data:
        raise DCAEError(f"{run_dir}: is a recipe run; resume it with --recipe three-phase --resume {run_dir}")
    config = config_from_dict(TrainConfig, data, str(path))
    refuse_saved_commands(config, list(overrides), path, settings)
    return apply_overrides(dataclasses.replace(config, run_dir=str(run_dir)), list(overrides), settings)


def saved_recipe_configs(run_dir: str | Path) -> tuple[list[TrainConfig], Path]:
    """The phase configs a recipe run saved in its config.json, and that file's path."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise DCAEError(f"{run_dir}: not a recipe run (no config.json)")
    saved = read_json_file(path)
    if not isinstance(saved, dict) or "recipe" not in saved:
        raise DCAEError(f"{run_dir}: is a single-phase run; resume it without --recipe")
    return [config_from_dict(TrainConfig, c, str(path)) for c in saved["phases"]], path


def refuse_saved_commands(config: TrainConfig, overrides: list[str], source: Path,
                          settings: Mapping[str, Any] | None = None) -> None:
    """A `pipe:` data path runs a shell command: allowed when typed now (--data / data.path=), not from a saved file."""
    retyped = {item.split("=", 1)[0].strip() for item in overrides if "=" in item} | set(settings or {})
    for key, value in (("data.path", config.data.path), ("data.val_path", config.data.val_path)):
        if value and "pipe:" in value and key not in retyped:
            raise DCAEError(f"{source}: saved {key}={value!r} would run a shell command; pass it again on the command "
                            f"line (--data / {key}=...) if you trust it")


# ----------------------------------------------------------------------------------------------------------------------
# The three-phase recipe
def recipe_configs(base: TrainConfig, phase_steps: tuple[int, int, int], low_resolution: int | None,
                   overrides: list[str]) -> list[TrainConfig]:
    """Phase 1 -> 2 -> 3 configs under base.run_dir/phaseK, each initialised from the previous phase's run.

    `low_resolution` sets phases 1 and 3 (phase 2 gets twice it); `phaseK.key=value` overrides go to phase K only,
    other overrides to all three.
    """
    configs = []
    for k in (1, 2, 3):
        phase = phase_config(k)
        if low_resolution:
            phase.resolution = low_resolution * (2 if k == 2 else 1)
        config = dataclasses.replace(base, phase=phase, steps=phase_steps[k - 1],
                                     run_dir=str(Path(base.run_dir) / f"phase{k}"),
                                     init=base.init if k == 1 else str(Path(base.run_dir) / f"phase{k - 1}"))
        configs.append(apply_overrides(config, phase_overrides(overrides, k)))
    return configs


def phase_overrides(overrides: list[str], k: int) -> list[str]:
    """The overrides that apply to recipe phase k: the shared ones, then `phaseK.key=value` as `key=value`."""
    shared = [o for o in overrides if not o.split("=", 1)[0].startswith(("phase1.", "phase2.", "phase3."))]
    return shared + [o.split(".", 1)[1] for o in overrides if o.startswith(f"phase{k}.")]


def train_recipe(configs: list[TrainConfig], resume: bool = False) -> Path:
    """Run the phases in order; a finished phase is skipped on resume. The top level gets the final weights."""
    run_dir = Path(configs[0].run_dir).parent
    d = init_distributed(configs[0].device)
    if d.is_main:
        save_run_config(run_dir, {"recipe": "three-phase", "phases": [config_to_dict(c) for c in configs]})
    for config in configs:
        latest = latest_checkpoint(config.run_dir)
        done = latest is not None and int(load_state(latest)["step"]) >= config.steps
        if not done:
            train(config, resume=resume and latest is not None)
    if d.is_main:
        final = Path(configs[-1].run_dir)
        for name in ("model.safetensors", "ema.safetensors"):
            replace_with_link(final / name, run_dir / name)
    return run_dir
