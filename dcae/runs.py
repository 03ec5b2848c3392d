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
import re
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

from dcae.config import config_to_dict, is_finite_number
from dcae.errors import DCAEError, first_line, printable, write_failure
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
        backend = "nccl" if use_cuda else "gloo"
        store = restart_store(rank, world_size)
        if store is None:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
    return Dist(rank, world_size, local_rank, torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"))


def restart_store(rank: int, world_size: int) -> dist.Store | None:
    """Under torchrun, the rendezvous store with this restart's own key prefix (None outside torchrun: env:// as is).

    torchrun keeps one store across `--max-restarts` restarts and torch's env:// set-up does not prefix the process
    group's keys by attempt, so a restarted rank can read the address a rank of the failed attempt published and
    fail with "Gloo connectFullMesh failed ... Connection refused" (half the restarts after a SIGKILLed rank here);
    the next restart then usually works. A prefix per attempt (TORCHELASTIC_RESTART_COUNT) makes the first one work."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    from torch.distributed.constants import default_pg_timeout

    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)  # the agent serves it; else rank 0
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=not agent_store and rank == 0, timeout=default_pg_timeout,
                          multi_tenant=not agent_store)
    return dist.PrefixStore(f"dcae/attempt_{attempt}", store)


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


def check_optim(optim: OptimConfig, prefix: str = "optim") -> None:
    """Values AdamW refuses (a ValueError deep in a run) or trains garbage with (NaN): one line naming the key."""
    number = is_finite_number
    betas = optim.betas if isinstance(optim.betas, (tuple, list)) else ()
    for name, ok, expected in (
            ("lr", number(optim.lr) and optim.lr >= 0, "a finite number >= 0"),
            ("weight_decay", number(optim.weight_decay) and optim.weight_decay >= 0, "a finite number >= 0"),
            ("eps", number(optim.eps) and optim.eps > 0, "a finite number > 0"),
            ("grad_clip", number(optim.grad_clip) and optim.grad_clip >= 0, "a finite number >= 0 (0 = off)"),
            ("betas", len(betas) == 2 and all(number(b) and 0 <= b < 1 for b in betas), "two numbers in [0, 1)")):
        if not ok:
            raise DCAEError(f"{prefix}.{name}={getattr(optim, name)}: expected {expected}")


def build_optimizer(params: list[nn.Parameter], optim: OptimConfig, lr: float | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on weights (ndim >= 2) only; `check_optim` first."""
    check_optim(optim)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr or optim.lr, betas=tuple(optim.betas),
                             eps=optim.eps)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Any, where: str) -> None:
    """optimizer.load_state_dict, but a saved state for other parameters (group sizes, shapes, missing entries: the
    checkpoint of another model or a hand-edited one) is a one-line DCAEError naming `where`, not a traceback."""
    try:
        optimizer.load_state_dict(state)
        for group in optimizer.param_groups:  # load_state_dict checks group sizes; per-parameter state shapes too:
            for p in group["params"]:
                for name, value in optimizer.state.get(p, {}).items():
                    if isinstance(value, torch.Tensor) and value.ndim and value.shape != p.shape:
                        raise ValueError(f"state {name!r} has shape {tuple(value.shape)}, its parameter "
                                         f"{tuple(p.shape)}")
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as error:
        raise DCAEError(f"{where}: optimizer state does not fit this model ({first_line(error)})") from None


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


def read_json_file(path: Path) -> dict[str, Any]:
    """A run's JSON file (config.json, train_config.json): an object; unreadable, invalid JSON or another kind of
    value is a one-line DCAEError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DCAEError(f"{path}: not valid JSON ({error.msg})") from None
    except UnicodeDecodeError:
        raise DCAEError(f"{path}: not a UTF-8 text file") from None
    except OSError as error:
        raise DCAEError(f"{path}: cannot read ({error.strerror or error})") from None
    except RecursionError:
        raise DCAEError(f"{path}: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise DCAEError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def report_stop(log: JsonlLog, command: str, step: int, reason: str, run_dir: Path) -> None:
    """After a checkpoint on SIGINT/SIGTERM: the "stop" event and how to continue."""
    log.write(event="stop", step=step, reason=reason)
    print(f"dcae {command}: stopped by {reason} at step {step}; checkpoint saved. "
          f"Continue with: dcae {command} --resume {run_dir}", flush=True)


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "state.pt")  # what every checkpoint of both trainers holds
_STEP_NAME = re.compile(r"step_(\d{8,20})")


def checkpoint_step(path: Path) -> int | None:
    """N of a `step_N` directory name (8 to 20 digits), else None."""
    match = _STEP_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    """A step_N directory holding every file of CHECKPOINT_FILES (the rename that publishes one is atomic, so only a
    damaged or foreign directory lacks one)."""
    try:
        return checkpoint_step(path) is not None and all((path / name).is_file() for name in CHECKPOINT_FILES)
    except OSError:
        return False


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint: the `latest` pointer, else the highest complete step_N directory."""
    root = checkpoint_dir(Path(run_dir))
    try:
        pointer = root / "latest"
        if pointer.is_file():
            with open(pointer, "rb") as handle:
                name = handle.read(64).decode("utf-8", errors="replace").strip()
            if _STEP_NAME.fullmatch(name) and is_complete(root / name):
                return root / name
        complete = [p for p in root.glob("step_*") if is_complete(p)] if root.is_dir() else []
    except OSError:
        return None
    return max(complete, key=checkpoint_step) if complete else None


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
    then the `latest` pointer moves to it. A complete step_N (`is_complete`) is kept as it is. With `keep_last`,
    older checkpoints beyond the newest `keep_last` are removed."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f".tmp_{name}"
    try:
        if not is_complete(final):
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
    steps = sorted((p for p in root.glob("step_*") if p.is_dir() and checkpoint_step(p) is not None),
                   key=checkpoint_step)
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
    """state.pt holds only tensors and plain containers: loaded with weights_only=True, then `check_state`."""
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a hostile or torn pickle raises many types
        raise DCAEError(f"{path / 'state.pt'}: refused or unreadable training state ({first_line(error)[:200]})") \
            from None
    check_state(state, path / "state.pt")
    return state


# The sizes of an RNG state: the CPU generator's (Mersenne Twister) and a CUDA generator's (seed and offset).
_RNG_STATE_SIZES = (5056, 16)
_AE_COUNTERS = ("skipped_images", "bad_steps", "bad_in_row")  # dcae.train.Trainer's
_ADAMW_STATE = {"step", "exp_avg", "exp_avg_sq"}  # per parameter (and max_exp_avg_sq with amsgrad)
_OPTIMIZER_FLAGS = ("amsgrad", "maximize", "capturable", "differentiable", "decoupled_weight_decay")


def check_state(state: Any, source: Path) -> None:
    """The structure both trainers write, checked by type before any of it is used: a damaged, hand-edited or foreign
    state.pt is one error line naming what is wrong, not a traceback from deep inside resume. Whether the optimizer
    state fits the model (group sizes, tensor shapes) only the trainer can tell."""
    def fail(what: str) -> None:
        raise DCAEError(f"{source}: not a dcae training state ({printable(what)[:200]})")

    if not isinstance(state, dict):
        fail(f"a {type(state).__name__}, not a dict")
    _check_int(state.get("step"), "step", 0, 2 ** 62, fail)
    for key in ("world_size", "batch_size"):
        if key in state:
            _check_int(state[key], key, 1, 2 ** 31, fail)
    _check_optimizer(state.get("optimizer"), "optimizer", fail)
    rng = state.get("rng")
    if isinstance(rng, torch.Tensor):  # diffusion: one generator state per rank, stacked
        if rng.dtype != torch.uint8 or rng.ndim != 2 or len(rng) < 1 or rng.shape[1] not in _RNG_STATE_SIZES:
            fail(f"rng is a {rng.dtype} tensor of shape {tuple(rng.shape)}, not a stack of generator states")
        return
    if not isinstance(rng, dict) or not _is_rng_state(rng.get("torch")) or not isinstance(rng.get("cuda", []), list) \
            or not all(_is_rng_state(r) for r in rng.get("cuda", [])):
        fail("rng is not a saved random number generator state")
    counters = state.get("counters")  # the autoencoder trainer's
    if not isinstance(counters, dict) or set(counters) != set(_AE_COUNTERS):
        fail(f"counters is not a dict of {', '.join(_AE_COUNTERS)}")
    for key, value in counters.items():
        _check_int(value, f"counters.{key}", 0, 2 ** 62, fail)
    data = state.get("data")
    if not isinstance(data, list) or not data or not all(isinstance(d, dict) for d in data):
        fail("data is not a list of data positions")
    for position in data:
        if position.get("kind") == "folder":
            _check_int(position.get("position"), "data.position", 0, 2 ** 62, fail)
        elif position.get("kind") == "shards":
            streams = position.get("streams")
            if not isinstance(streams, list) or not streams or not all(
                    isinstance(s, list) and len(s) == 3 for s in streams):
                fail("data.streams is not a list of [shard, epoch, position] triples")
            for value in [*(v for s in streams for v in s), position.get("next")]:
                _check_int(value, "data.streams", 0, 2 ** 62, fail)
        else:
            fail(f"data.kind={position.get('kind')!r}")
    discriminator = state.get("discriminator")
    if discriminator is not None:
        if not isinstance(discriminator, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in discriminator.items()):
            fail("discriminator is not a state dict of tensors")
        _check_optimizer(state.get("disc_optimizer"), "disc_optimizer", fail)


def _check_int(value: Any, name: str, low: int, high: int, fail: Callable[[str], None]) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < high:
        fail(f"{name}={value!r}, expected an integer from {low}")


def _is_rng_state(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.ndim == 1 and \
        value.numel() in _RNG_STATE_SIZES


def _check_optimizer(value: Any, name: str, fail: Callable[[str], None]) -> None:
    """An AdamW state_dict: param groups of integer ids and plain hyperparameters, per-parameter tensors."""
    if not isinstance(value, dict) or set(value) != {"state", "param_groups"}:
        fail(f"{name} is not an optimizer state")
    groups, per_param = value["param_groups"], value["state"]
    if not isinstance(groups, list) or not groups or not all(isinstance(g, dict) for g in groups):
        fail(f"{name}.param_groups is not a list of groups")
    ids: set[int] = set()
    for group in groups:
        params = group.get("params")
        if not isinstance(params, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in params):
            fail(f"{name}: a group's params are not parameter ids")
        ids.update(params)
        for key, setting in group.items():
            if key == "params":
                continue
            number = isinstance(setting, (int, float)) and not isinstance(setting, bool)
            if key in _OPTIMIZER_FLAGS and not isinstance(setting, bool) or \
                    key in ("foreach", "fused") and setting is not None and not isinstance(setting, bool) or \
                    key in ("lr", "eps", "weight_decay", "initial_lr") and not (number and math.isfinite(setting)) or \
                    key == "betas" and not (isinstance(setting, (tuple, list)) and len(setting) == 2 and all(
                        isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b)
                        for b in setting)) or \
                    not isinstance(setting, (bool, int, float, str, tuple, list, type(None))):
                fail(f"{name}: param group setting {key}={setting!r}")
    if not isinstance(per_param, dict):
        fail(f"{name}.state is not a dict")
    for key, entry in per_param.items():
        if key not in ids or not isinstance(entry, dict) or not _ADAMW_STATE <= set(entry) <= \
                _ADAMW_STATE | {"max_exp_avg_sq"} or not all(
                isinstance(v, torch.Tensor) and (v.is_floating_point() or k == "step") for k, v in entry.items()):
            fail(f"{name}.state[{key!r}] is not a parameter's AdamW state")
        if entry["step"].numel() != 1 or entry["step"].is_complex():
            fail(f"{name}.state[{key!r}].step is not one number")


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
