"""Latent diffusion training on a latent cache: DiT / UViT, flow or eps objective, EMA, DDP, exact resume.

Optionally on the first K channels of the cache only (`latent_channels`, for structured latents) and with the prefix
loss of augmented diffusion training (`augment_weight`, dcae/diffusion/augment.py).

`train_diffusion(config)` runs from a single CPU process up to `torchrun --nproc_per_node=N` (DDP over gloo on CPU,
nccl on CUDA). Everything random is a pure function of (seed, step, rank): the batch at step s is a slice of per-epoch
permutations seeded (seed, epoch), and times, noise and label dropout come from one torch.Generator per rank whose
state is saved, so a resumed run continues bit-exactly (with the same world size).

Run directory (the layout of dcae/runs.py, shared with the autoencoder trainer):
    config.json               the resolved TrainDiffusionConfig
    log.jsonl                 one JSON object per log line / event
    checkpoints/latest        name of the newest complete checkpoint (replaced atomically)
    checkpoints/step_N/       model.safetensors, ema.safetensors (metadata: everything `dcae sample` needs),
                              state.pt (optimizer, RNG, step; tensors and plain data only), train_config.json
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file
from tqdm import tqdm

from dcae.config import apply_overrides as config_overrides
from dcae.config import config_from_dict, config_to_dict, is_finite_number
from dcae.diffusion.augment import Augment, prefix_sizes, step_loss
from dcae.diffusion.latents import LatentCache, estimate_scaling_factor, load_latent_cache, read_index
from dcae.diffusion.objectives import OBJECTIVES, get_objective
from dcae.diffusion.presets import (
    ModelConfig, check_fits_memory, check_model_config, create_diffusion_model, get_diffusion_config,
    model_config_from_dict,
)
from dcae.errors import DCAEError, first_line, printable
from dcae.runs import (
    PRECISIONS, JsonlLog, OptimConfig, StopFlag, barrier, build_optimizer, config_text, ema_decay_at, gather,
    init_distributed, latest_checkpoint, load_optimizer_state, load_state, lr_at, open_run, precision_record,
    read_json_file, reduce_mean, report_stop, resolve_precision, save_run_config, update_ema, wrap_ddp,
    write_checkpoint_dir,
)
from dcae.runtime import autocast
from dcae.tensorboard import TensorBoardLogger
from dcae.weights import check_shapes, load_state_dict_strict, read_safetensors

METADATA_KEY = "dcae_diffusion"  # safetensors metadata entry holding the checkpoint's JSON description


@dataclass
class TrainDiffusionConfig:
    latents: str = ""  # cache folder written by `dcae cache-latents`
    preset: str = "DiT-T/1"  # a DIFFUSION_PRESETS name; `model` is built from it and the cache's latent shape
    model: ModelConfig | None = None  # the resolved architecture; override fields as model.depth=4
    objective: str = "flow"  # "flow" (SiT velocity, linear path) or "eps" (DDPM, SD scaled-linear schedule)
    run_dir: str = "runs/diffusion"
    seed: int = 0  # model init, data order, times, noise, label dropout
    steps: int = 1000  # train until this step (a resumed run continues to it)
    batch_size: int = 32  # global batch, split evenly over ranks (DiT's convention)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=0.0, warmup_steps=0,
                                                                   grad_clip=0.0))  # DiT: AdamW 1e-4, no decay
    ema_decay: float = 0.9999  # DiT; warmed up as min(decay, (1 + step) / (10 + step)) so short runs move
    class_dropout: float = 0.1  # labels replaced by the null class with this probability (classifier-free guidance)
    use_flip: bool = True  # train on the cache's mirrored latents too, when it has them
    scaling_factor: float | None = None  # latents are multiplied by it; None: the cache's, else 1/std estimated
    precision: str = "auto"  # "fp32" | "bf16" (autocast) | "auto": bf16 where native (CUDA, AVX512-BF16/AMX CPUs)
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    log_every: int = 10
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    progress: bool = True  # tqdm bar on rank 0
    tensorboard: bool = False  # mirror log.jsonl to RUN_DIR/tensorboard, rank 0
    latent_channels: int | None = None  # train on the cache's first K channels (a structured latent); None: all
    augment_weight: float = 0.0  # lambda of the prefix loss (augmented diffusion training); 0: off, today's training
    augment_channels: tuple[int, ...] = ()  # candidate prefix sizes k, one drawn per sample; (): 16, 32, ... below C
    augment_mask_input: bool = True  # prefix view zeroes the input's channels >= k (a 2nd pass); False: loss-only


# ----------------------------------------------------------------------------------------------------------------------
# Config: dotted overrides and (de)serialisation
def apply_overrides(config: TrainDiffusionConfig, overrides: Iterable[str] = (),
                    settings: Mapping[str, Any] | None = None) -> TrainDiffusionConfig:
    """A copy with typed `settings` ({dotted key: value}, e.g. from flags) and then `key=value` overrides applied,
    e.g. ["optim.lr=3e-4", "model.depth=4", "objective=eps"]; a model's `arch` is fixed by its preset."""
    return config_overrides(config, overrides, settings, fixed=("arch",))


def config_dict(config: TrainDiffusionConfig) -> dict[str, Any]:
    return config_to_dict(config)


def config_from_json(data: dict[str, Any], where: str) -> TrainDiffusionConfig:
    data = dict(data)
    model = data.pop("model", None)
    if model is not None and not isinstance(model, dict):
        raise DCAEError(f"{where}: `model` must be an object (a model config) or null, not {type(model).__name__}")
    try:
        config = config_from_dict(TrainDiffusionConfig, data, where)
        return dataclasses.replace(config, model=model_config_from_dict(model) if model is not None else None)
    except (TypeError, ValueError) as error:
        raise DCAEError(f"{where}: {first_line(error)}") from None


def latent_shape(config: TrainDiffusionConfig, index: dict[str, Any]) -> list[int]:
    """[C, H, W] of the latents the model trains on: the cache's, or its first `latent_channels` channels."""
    channels, height, width = index["latent_shape"]
    k = config.latent_channels
    if k is None:
        return [channels, height, width]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= channels:
        raise DCAEError(f"latent_channels={k!r}: expected an integer from 1 to {channels} (the cache's channels)")
    autoencoder = index.get("autoencoder") if isinstance(index.get("autoencoder"), dict) else {}
    if k < channels and autoencoder.get("structured_latent") is False:  # None (older caches): unknown, allowed
        raise DCAEError(f"latent_channels={k}: the cache's autoencoder {autoencoder.get('name')!r} has no "
                        f"structured latent, so a {k}-channel prefix does not decode")
    return [k, height, width]


def resolve_augment(config: TrainDiffusionConfig, channels: int) -> Augment | None:
    """The checked prefix objective (None when augment_weight is 0); candidates are checked even then."""
    weight = config.augment_weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (math.isfinite(weight) and weight >= 0):
        raise DCAEError(f"augment_weight={weight!r}: expected a number >= 0 (0 turns augmented training off)")
    if config.augment_mask_input not in (True, False):
        raise DCAEError(f"augment_mask_input={config.augment_mask_input!r}: expected true or false")
    where = f"latent_channels={channels}" if config.latent_channels is not None else ""
    if weight == 0:
        if config.augment_channels:
            prefix_sizes(config.augment_channels, channels, where)
        return None
    return Augment(float(weight), prefix_sizes(config.augment_channels, channels, where), config.augment_mask_input)


def resolve_model_config(config: TrainDiffusionConfig, index: dict[str, Any]) -> ModelConfig:
    """The preset sized for the cache: latent channels (or `latent_channels`) and side, its classes (one class =
    unconditional)."""
    channels, height, width = latent_shape(config, index)
    if height != width:
        raise DCAEError(f"{config.latents}: latents are {height}x{width}; the diffusion models take square latents")
    num_classes = index["num_classes"] if index["num_classes"] > 1 else 0
    return get_diffusion_config(config.preset, in_channels=channels, input_size=height, num_classes=num_classes)


def check_config(config: TrainDiffusionConfig, index: dict[str, Any], world_size: int) -> None:
    """Reject values that would fail later with a less clear message."""
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or not 0 <= config.seed < 2 ** 53:
        raise DCAEError(f"seed={config.seed!r}: must be an integer from 0 to 2^53-1")  # seed*1000+rank seeds torch
    check_model_config(config.model)
    if config.objective not in OBJECTIVES:
        raise DCAEError(f"objective={config.objective!r}: choose from {', '.join(OBJECTIVES)}")
    if config.precision not in PRECISIONS:
        raise DCAEError(f"precision={config.precision!r}: choose auto, fp32 or bf16")
    for name in ("batch_size", "log_every", "ckpt_every"):
        if getattr(config, name) < 1:
            raise DCAEError(f"{name}={getattr(config, name)}: must be positive")
    if config.batch_size % world_size:
        raise DCAEError(f"batch_size={config.batch_size} does not split evenly over {world_size} processes")
    m, shape = config.model, latent_shape(config, index)
    if [m.in_channels, m.input_size, m.input_size] != shape:
        sliced = f" (first {shape[0]} channels, latent_channels)" if config.latent_channels is not None else ""
        raise DCAEError(f"model takes {m.in_channels}x{m.input_size}x{m.input_size} latents, "
                        f"training uses {shape}{sliced} of the cache's {index['latent_shape']}")
    if m.input_size % m.patch_size:
        raise DCAEError(f"model.patch_size={m.patch_size} does not divide the latent side {m.input_size}")
    if 0 < m.num_classes < index["num_classes"]:
        raise DCAEError(f"model.num_classes={m.num_classes} but the cache has {index['num_classes']} classes")
    resolve_augment(config, shape[0])


# ----------------------------------------------------------------------------------------------------------------------
# Small named helpers
def batch_indices(step: int, num_items: int, batch_size: int, rank: int, world_size: int, seed: int) -> torch.Tensor:
    """This rank's items of global batch `step`: stream positions [step*B, (step+1)*B) of the concatenated per-epoch
    permutations (epoch e seeded (seed, e)); rank r takes every world_size-th position from r."""
    positions = np.arange(step * batch_size + rank, (step + 1) * batch_size, world_size)
    epochs, offsets = positions // num_items, positions % num_items
    out = np.empty(len(positions), dtype=np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(num_items)
        out[epochs == epoch] = perm[offsets[epochs == epoch]]
    return torch.from_numpy(out)


def drop_labels(labels: torch.Tensor, p: float, null_class: int, generator: torch.Generator) -> torch.Tensor:
    """Replace each label by the null class with probability p (classifier-free guidance training)."""
    drop = torch.rand(labels.shape, device=labels.device, generator=generator) < p
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def resolve_scaling_factor(config: TrainDiffusionConfig, cache: LatentCache) -> tuple[float, str]:
    """(factor, where it came from): the config's, the autoencoder's published one, or 1/std of the cache."""
    if config.scaling_factor is not None:
        return float(config.scaling_factor), "config"
    if cache.index.get("scaling_factor") is not None:
        return float(cache.index["scaling_factor"]), "autoencoder"
    return estimate_scaling_factor(cache.latents), "estimated 1/std of the cache"


def checkpoint_metadata(config: TrainDiffusionConfig, index: dict[str, Any], step: int) -> dict[str, str]:
    """What a checkpoint needs to sample on its own: model config, objective, scaling, classes, autoencoder.
    latent_shape is what the model makes ([K, H, W] with latent_channels=K), cache_latent_shape what the cache holds."""
    info = {"step": step, "model": dataclasses.asdict(config.model), "objective": config.objective,
            "scaling_factor": config.scaling_factor, "latent_shape": latent_shape(config, index),
            "cache_latent_shape": index["latent_shape"],
            "class_names": index["class_names"], "autoencoder": index["autoencoder"],
            "autoencoder_config_hash": index["autoencoder_config_hash"], "resolution": index["resolution"],
            "train_config": config_dict(config)}
    return {METADATA_KEY: json.dumps(info)}


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, ema: nn.Module, state: dict[str, Any],
                    config: TrainDiffusionConfig, index: dict[str, Any]) -> Path:
    """Write checkpoints/step_N atomically (dcae.runs.write_checkpoint_dir), then prune old ones."""
    def write_files(tmp: Path) -> None:
        metadata = checkpoint_metadata(config, index, step)
        save_file(_weights(model), tmp / "model.safetensors", metadata=metadata)
        save_file(_weights(ema), tmp / "ema.safetensors", metadata=metadata)
        torch.save(state, tmp / "state.pt")
        (tmp / "train_config.json").write_text(config_text(config))

    return write_checkpoint_dir(run_dir, step, write_files, keep_last=config.keep_checkpoints)


def load_weights(module: nn.Module, path: Path) -> None:
    """A checkpoint's weights into `module`; an unreadable file or weights of another model is a DCAEError."""
    load_state_dict_strict(module, read_safetensors(path)[0], str(path))


# ----------------------------------------------------------------------------------------------------------------------
# The training loop
def train_diffusion(config: TrainDiffusionConfig, resume: bool = False) -> Path:
    """Train until `config.steps`; returns the run directory. `resume=True` continues its latest checkpoint."""
    d = init_distributed(config.device)
    precision = resolve_precision(config.precision, d.device)
    run_dir = Path(config.run_dir)
    resume_from = open_run(run_dir, resume)
    state = load_state(resume_from) if resume_from is not None else None

    index = read_index(config.latents)
    if config.model is None:
        config = dataclasses.replace(config, model=resolve_model_config(config, index))
    check_config(config, index, d.world_size)  # before reading the shards: a bad field fails at once
    check_fits_memory(config.model, d.device, 5, "train-diffusion")
    channels = config.model.in_channels
    augment = resolve_augment(config, channels)
    cache = load_latent_cache(config.latents, use_flip=config.use_flip, index=index,
                              channels=channels if config.latent_channels is not None else None)
    scale, scale_source = resolve_scaling_factor(config, cache)
    config = dataclasses.replace(config, scaling_factor=scale)
    objective = get_objective(config.objective)

    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = create_diffusion_model(config.model).to(d.device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = build_optimizer(list(model.parameters()), config.optim)
    generator = torch.Generator(d.device).manual_seed(config.seed * 1000 + d.rank)
    step = 0
    if state is not None:
        load_weights(model, resume_from / "model.safetensors")
        load_weights(ema, resume_from / "ema.safetensors")
        load_optimizer_state(optimizer, state["optimizer"], f"{resume_from}/state.pt")
        step = int(state["step"])
        if len(state["rng"]) != d.world_size:
            raise DCAEError(f"{resume_from}: saved by {len(state['rng'])} processes; resume with the same number")
        generator.set_state(state["rng"][d.rank].clone())  # a row of the stack is a view; set_state wants its own
    ddp_model = wrap_ddp(model, d)
    null_class = model.null_class

    tensorboard = TensorBoardLogger(run_dir / "tensorboard" if config.tensorboard and d.is_main else None)
    log = JsonlLog(run_dir / "log.jsonl" if d.is_main else None, tensorboard)
    if d.is_main:
        save_run_config(run_dir, config)
        log.write(event="resume" if resume_from else "start", step=step, world_size=d.world_size,
                  device=str(d.device), **precision_record(config.precision, precision, d.device),
                  params=sum(p.numel() for p in model.parameters()),
                  latents=len(cache.latents), latent_shape=list(cache.latents.shape[1:]), scaling_factor=scale,
                  scaling_factor_source=scale_source, resumed_from=str(resume_from) if resume_from else None,
                  augment=dataclasses.asdict(augment) if augment else None)

    def checkpoint_now() -> None:
        rng = torch.stack(gather(generator.get_state(), d))  # (world_size, n) uint8: every rank's generator
        if d.is_main:
            full_state = {"step": step, "optimizer": optimizer.state_dict(), "rng": rng, "world_size": d.world_size}
            path = save_checkpoint(run_dir, step, model, ema, full_state, config, cache.index)
            log.write(event="checkpoint", step=step, path=str(path))
        barrier(d)

    bar = tqdm(total=config.steps, initial=step, disable=not (d.is_main and config.progress), dynamic_ncols=True,
               desc="train-diffusion")
    model.train()
    parts = ("loss", "loss_full", "loss_prefix") if augment else ("loss",)  # what log.jsonl averages per window
    window = torch.zeros(len(parts) + 1, dtype=torch.float64)  # sums of `parts`, then steps
    window_time, interrupted = 0.0, ""
    try:
        with StopFlag() as stop:
            while step < config.steps:
                start = time.perf_counter()
                idx = batch_indices(step, len(cache.latents), config.batch_size, d.rank, d.world_size, config.seed)
                x0 = cache.latents[idx].to(d.device) * scale  # (b, C, H, W)
                extra = {}
                if null_class is not None:
                    labels = cache.labels[idx].to(d.device)
                    extra["y"] = drop_labels(labels, config.class_dropout, null_class, generator)
                lr = lr_at(step, config.optim)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with autocast(d.device, precision):
                    loss, logs = step_loss(objective, ddp_model, x0, generator, augment, **extra)
                loss.backward()
                if config.optim.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                update_ema(ema, model, ema_decay_at(step, config.ema_decay))
                step += 1
                values = [loss.item()] + [logs[name].item() for name in parts[1:]]
                window += torch.tensor([*values, 1.0], dtype=torch.float64)
                window_time += time.perf_counter() - start
                bar.update(1)
                stop_now = reduce_mean(torch.tensor([float(stop.requested)], dtype=torch.float64), d)[0] > 0
                if step % config.log_every == 0 or step == config.steps:
                    means = dict(zip(parts, reduce_mean(window[:-1] / window[-1], d).tolist()))
                    mean_loss = means["loss"]
                    images_per_s = window[-1].item() * config.batch_size / max(window_time, 1e-9)
                    log.write(step=step, **means, lr=lr, images_per_s=images_per_s)
                    bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{images_per_s:.1f}")
                    window.zero_()
                    window_time = 0.0
                if stop_now:
                    interrupted = stop.signal_name or "a signal on another rank"
                    break
                if step % config.ckpt_every == 0 and step < config.steps:
                    checkpoint_now()
            checkpoint_now()
    finally:
        bar.close()
        log.close()
    if interrupted:
        if d.is_main:
            report_stop(log, "train-diffusion", step, interrupted, run_dir)
        raise KeyboardInterrupt
    if d.is_main:
        log.write(event="done", step=step)
    return run_dir


def load_run_config(run_dir: str | Path) -> TrainDiffusionConfig:
    """The config a run was trained with (from its newest checkpoint, else its config.json)."""
    run_dir = Path(run_dir)
    ckpt = latest_checkpoint(run_dir)
    path = ckpt / "train_config.json" if ckpt is not None else run_dir / "config.json"
    if not path.is_file():
        raise DCAEError(f"{run_dir}: not a diffusion training run (no checkpoint, no config.json)")
    return dataclasses.replace(config_from_json(read_json_file(path), str(path)), run_dir=str(run_dir))


# ----------------------------------------------------------------------------------------------------------------------
# Loading a trained model for sampling
@dataclass
class DiffusionCheckpoint:
    model: nn.Module
    info: dict[str, Any]  # the checkpoint metadata (see `checkpoint_metadata`)
    path: Path


def find_weights(path: str | Path, ema: bool = True) -> Path:
    """A run dir, a checkpoint dir or a .safetensors file -> the weights file to sample with."""
    path = Path(path)
    name = "ema.safetensors" if ema else "model.safetensors"
    if path.is_file():
        return path
    if (path / name).is_file():
        return path / name
    ckpt = latest_checkpoint(path) if path.is_dir() else None
    if ckpt is None:
        raise DCAEError(f"{path}: no diffusion checkpoint here (a run dir, checkpoints/step_N, or a .safetensors)")
    return ckpt / name


def check_info(info: dict[str, Any], m: ModelConfig, where: str) -> None:
    """The metadata fields `dcae sample` reads, typed and consistent with the model (a DCAEError naming the field)."""
    shape = info.get("latent_shape")
    cached = info.get("cache_latent_shape", shape)
    scale = info.get("scaling_factor")
    checks = (("objective", isinstance(info.get("objective"), str) and info["objective"] in OBJECTIVES),
              ("step", isinstance(info.get("step"), int) and not isinstance(info.get("step"), bool)),
              ("latent_shape", shape == [m.in_channels, m.input_size, m.input_size]),
              ("cache_latent_shape", isinstance(cached, list) and len(cached) == 3
               and all(isinstance(v, int) and not isinstance(v, bool) for v in cached) and cached[0] >= m.in_channels
               and cached[1:] == [m.input_size, m.input_size]),
              ("scaling_factor", is_finite_number(scale) and scale > 0),
              ("class_names", isinstance(info.get("class_names"), list)
               and all(isinstance(c, str) for c in info["class_names"])),
              ("autoencoder", isinstance(info.get("autoencoder"), dict)),
              ("autoencoder_config_hash", isinstance(info.get("autoencoder_config_hash"), str)))
    for name, ok in checks:
        if not ok:
            raise DCAEError(f"{where}: bad {METADATA_KEY} metadata field {name}={printable(repr(info.get(name)))[:80]}")


def load_diffusion_checkpoint(path: str | Path, ema: bool = True, device: torch.device | str = "cpu"
                              ) -> DiffusionCheckpoint:
    """Rebuild the model a checkpoint was trained as and load its (EMA) weights; eval mode."""
    weights = find_weights(path, ema)
    state, metadata = read_safetensors(weights)
    if METADATA_KEY not in metadata:
        raise DCAEError(f"{weights}: not a dcae diffusion checkpoint (no {METADATA_KEY} metadata)")
    try:
        info = json.loads(metadata[METADATA_KEY])
        if not isinstance(info, dict):
            raise TypeError(f"a JSON {type(info).__name__}, not an object")
        model_config = model_config_from_dict(info["model"])
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as error:
        raise DCAEError(f"{weights}: bad {METADATA_KEY} metadata ({first_line(error)})") from None
    check_model_config(model_config, f"{weights}: model")
    check_info(info, model_config, str(weights))
    with torch.device("meta"):  # compare shapes before allocating anything the metadata asks for
        shapes = {k: tuple(v.shape) for k, v in create_diffusion_model(model_config).state_dict().items()}
    check_shapes(state, shapes, str(weights))
    check_fits_memory(model_config, torch.device(device), 1, str(weights))
    model = create_diffusion_model(model_config)
    load_state_dict_strict(model, state, str(weights))
    return DiffusionCheckpoint(model=model.to(device).eval(), info=info, path=weights)
