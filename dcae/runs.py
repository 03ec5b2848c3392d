"""What both trainers (`dcae.train`, `dcae.diffusion.train`) stand on: the run directory and its checkpoints,
distributed helpers, the precision choice, logs, the stop flag, the learning-rate schedule and the EMA.

Run directory layout (each trainer adds its own files beside these):
    config.json              the resolved training config (`save_run_config`)
    log.jsonl                one JSON object per log / event line (`JsonlLog`); "start" records the precision asked
                             for and used, and the hardware
    checkpoints/latest       name of the newest complete checkpoint (replaced atomically)
    checkpoints/step_N/      one checkpoint, written into a temporary folder, fsynced and renamed into place
                             (`write_checkpoint_dir`); it is complete once it holds state.pt
Configs are dataclasses: dict round-trip and `key=value` overrides are `dcae.config`'s.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dcae.config import config_to_dict
from dcae.errors import DCAEError, first_line, write_failure
from dcae.runtime import hardware_record, resolve_device, resolve_dtype
from dcae.tensorboard import TensorBoardLogger

CHECKPOINT_SLEEP_ENV = "DCAE_TEST_CHECKPOINT_SLEEP"  # test hook: seconds to sleep between writing and renaming
PRECISIONS = ("auto", "fp32", "bf16")  # training's precision=; fp16 would need a gradient scaler


# ----------------------------------------------------------------------------------------------------------------------
# Distributed
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = "auto") -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: DDP over nccl (CUDA) or gloo (CPU); else a single process."""
    chosen = resolve_device(device)
    use_cuda = chosen.type == "cuda"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist(device=chosen)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world_size, local_rank, torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"))


def wrap_ddp(module: nn.Module, d: Dist, sync_batchnorm: bool = False) -> nn.Module:
    """DDP over the trainable parameters when distributed (SyncBatchNorm on CUDA if asked); the module itself otherwise."""
    if d.world_size == 1:
        return module
    if sync_batchnorm and d.device.type == "cuda":
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return DDP(module, device_ids=[d.local_rank] if d.device.type == "cuda" else None)


def gather(value: Any, d: Dist) -> list[Any]:
    """Every rank's `value` (a picklable object), in rank order, on every rank."""
    if d.world_size == 1:
        return [value]
    values: list[Any] = [None] * d.world_size
    dist.all_gather_object(values, value)
    return values


def barrier(d: Dist) -> None:
    """Wait for every rank (a no-op in one process)."""
    if d.world_size > 1:
        dist.barrier()


def reduce_mean(values: torch.Tensor, d: Dist) -> torch.Tensor:
    """Average a float64 vector over ranks (identity in one process)."""
    if d.world_size == 1:
        return values
    values = values.to(d.device)
    dist.all_reduce(values)
    return (values / d.world_size).cpu()


# ----------------------------------------------------------------------------------------------------------------------
# Precision, schedule, EMA
def resolve_precision(precision: str, device: torch.device) -> str:
    """precision= -> fp32 | bf16: 'auto' is bf16 only where the device runs it natively (dcae.runtime.resolve_dtype)."""
    if precision not in PRECISIONS:
        raise DCAEError(f"precision={precision!r}: choose {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}")
    return resolve_dtype(precision, device)


def precision_record(requested: str, resolved: str, device: torch.device) -> dict[str, Any]:
    """What a run's "start" log event records about its precision and machine."""
    return {"precision": resolved, "precision_requested": requested, "hardware": hardware_record(device)}


@dataclass
class OptimConfig:
    lr: float = 6.4e-5  # AdamW; the paper's phase-1 value
    weight_decay: float = 0.1  # applied to weights (ndim >= 2) only, not to biases and norm scales
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 500  # linear warm-up from lr/warmup to lr, then constant (or cosine, below)
    decay_steps: int = 0  # > 0: cosine decay from lr to min_lr_ratio * lr over this many steps after the warm-up
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # max global grad norm (0 = off)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model for floating tensors (params and BN stats); others copied."""
    for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
        if e.is_floating_point():
            e.lerp_(m.to(e.dtype), 1.0 - decay)
        else:
            e.copy_(m)


def ema_decay_at(step: int, decay: float) -> float:
    """EMA warm-up: a young average follows the weights closely, then settles at `decay`."""
    return min(decay, (1 + step) / (10 + step))


def lr_at(step: int, optim: OptimConfig) -> float:
    """Linear warm-up over `warmup_steps`, then constant, or a cosine decay over `decay_steps` that then stays low."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.decay_steps <= 0:
        return optim.lr
    progress = min(1.0, (step - optim.warmup_steps) / optim.decay_steps)
    low = optim.min_lr_ratio * optim.lr
    return low + (optim.lr - low) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(params: list[nn.Parameter], optim: OptimConfig, lr: float | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on weights (ndim >= 2) only."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr or optim.lr, betas=tuple(optim.betas),
                             eps=optim.eps)


def all_finite(module: nn.Module) -> bool:
    return all(torch.isfinite(t).all() for t in module.state_dict().values() if t.is_floating_point())


# ----------------------------------------------------------------------------------------------------------------------
# The run directory and its checkpoints
def open_run(run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None for a new run); refuses to resume nothing or to overwrite a run."""
    latest = latest_checkpoint(run_dir)
    if resume and latest is None:
        raise DCAEError(f"{run_dir}: no checkpoint to resume from")
    if not resume and latest is not None:
        raise DCAEError(f"{run_dir}: already holds a training run; pass --resume to continue it or choose another "
                        f"--run-dir")
    return latest


def config_text(config: Any) -> str:
    """A config dataclass (or plain data) as the indented JSON of config.json and train_config.json."""
    return json.dumps(config if isinstance(config, (dict, list)) else config_to_dict(config), indent=2) + "\n"


def save_run_config(run_dir: Path, config: Any) -> None:
    """config.json of a run; fails here, before any step, when the run directory is not writable."""
    with run_dir_errors(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(config_text(config))


def read_json_file(path: Path) -> Any:
    """A run's JSON file (config.json, train_config.json); unreadable or invalid JSON is a one-line DCAEError."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DCAEError(f"{path}: not valid JSON ({error.msg})") from None
    except OSError as error:
        raise DCAEError(f"{path}: cannot read ({error.strerror or error})") from None


def report_stop(log: JsonlLog, command: str, step: int, reason: str, run_dir: Path) -> None:
    """After a checkpoint on SIGINT/SIGTERM: the "stop" event and how to continue."""
    log.write(event="stop", step=step, reason=reason)
    print(f"dcae {command}: stopped by {reason} at step {step}; checkpoint saved. "
          f"Continue with: dcae {command} --resume {run_dir}", flush=True)


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint: the `latest` pointer, else the highest complete step_N directory."""
    root = checkpoint_dir(Path(run_dir))
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "state.pt").is_file():
            return candidate
    complete = sorted(p for p in root.glob("step_*") if (p / "state.pt").is_file()) if root.is_dir() else []
    return complete[-1] if complete else None


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def replace_with_link(source: Path, target: Path) -> None:
    """Atomically make `target` hold `source`'s bytes (hard link if possible, else a copy), via a temp name."""
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise DCAEError(f"{target}: cannot write: {write_failure(error, target.parent)}") from None


def write_checkpoint_dir(run_dir: Path, step: int, write_files: Callable[[Path], None],
                         keep_last: int | None = None) -> Path:
    """Make checkpoints/step_N atomically: `write_files` fills a temp dir, which is fsynced and renamed into place,
    then the `latest` pointer moves to it. A complete step_N (it has state.pt) is kept as it is. With `keep_last`,
    older checkpoints beyond the newest `keep_last` are removed."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f".tmp_{name}"
    try:
        if not (final / "state.pt").is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            write_files(tmp)
            _fsync_tree(tmp)
            if os.environ.get(CHECKPOINT_SLEEP_ENV):  # test hook: a SIGKILL landing here must not break the run
                time.sleep(float(os.environ[CHECKPOINT_SLEEP_ENV]))
            shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover of the same step (no state.pt)
            os.rename(tmp, final)
        pointer_tmp = root / ".latest.tmp"
        pointer_tmp.write_text(name + "\n")
        os.replace(pointer_tmp, root / "latest")
    except Exception as error:  # full disk, read-only or vanished folder; torch.save reports ENOSPC as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        (root / ".latest.tmp").unlink(missing_ok=True)
        raise DCAEError(f"{run_dir}: cannot write checkpoint {name}: {write_failure(error, root)}; "
                        f"the previous checkpoint is kept") from None
    if keep_last is not None:
        prune_checkpoints(root, keep_last, keep=final)
    return final


def prune_checkpoints(root: Path, keep_last: int, keep: Path) -> None:
    """Remove all but the newest `keep_last` complete checkpoints (never `keep`), and stale temp dirs."""
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep_last] if keep_last > 0 else []:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp_step_*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def run_dir_errors(run_dir: Path) -> Iterator[None]:
    """OSError while writing the run (read-only, disk full) -> one-line DCAEError; the last complete checkpoint stays."""
    try:
        yield
    except OSError as error:
        latest = latest_checkpoint(run_dir)
        kept = f"; the last complete checkpoint is {latest}" if latest else ""
        raise DCAEError(f"{error.filename or run_dir}: cannot write ({error.strerror or error}){kept}") from None


def load_state(path: Path) -> dict[str, Any]:
    """state.pt holds only tensors and plain containers: loaded with weights_only=True."""
    try:
        return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a hostile or torn pickle raises many types
        raise DCAEError(f"{path / 'state.pt'}: refused or unreadable training state ({first_line(error)[:200]})") \
            from None


# ----------------------------------------------------------------------------------------------------------------------
# Logs and stopping
class JsonlLog:
    """Append-only JSON-lines log (rank 0 only), the run's source of truth.

    With a `tensorboard` logger, every record that has a `step` is mirrored there too: step lines as `train/KEY`,
    validation as `val/KEY`, other events as `EVENT/KEY`; non-numeric fields are skipped.
    """

    def __init__(self, path: Path | None, tensorboard: TensorBoardLogger | None = None):
        self.path = path
        self.tensorboard = tensorboard

    def write(self, **record: Any) -> None:
        if self.path is None:
            return
        record = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in record.items()}
        with run_dir_errors(self.path.parent), open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tensorboard is not None and isinstance(record.get("step"), int):
            event = record.get("event")
            values = {k: v for k, v in record.items() if k not in ("step", "event")}
            self.tensorboard.scalars(record["step"], values, prefix=f"{event or 'train'}/")

    def close(self) -> None:
        """Close the TensorBoard mirror (log.jsonl is opened per write and needs no closing)."""
        if self.tensorboard is not None:
            self.tensorboard.close()


class StopFlag:
    """SIGINT/SIGTERM set a flag that the loop checks after each step (then it checkpoints and stops)."""

    def __init__(self):
        self.requested, self.signal_name, self._previous = False, "", {}

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested, self.signal_name = True, signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
