"""Shared pieces of the small-scale reproduction studies: data, budgeted training, evaluation, results.

The studies run as modules from the repository root, e.g. `python -m experiments.residual_study --budget-min 40`.

- `union_folder`: BSDS500 train+test as one folder of symlinks (the trainer reads one folder); val stays held out.
- `train_budgeted`: one `dcae train` subprocess, stopped by SIGINT when its wall-clock budget of training steps is
  spent (the trainer checkpoints at the end of the current step); `continue_budgeted` resumes a copy of a finished
  run. Runs are keyed by a hash of their arguments and budget, so an identical run (the same phase-1 model in two
  studies) trains once (a lock makes concurrent studies wait for it); an interrupted study resumes the run for the
  budget it has left. Stop a study with Ctrl-C or SIGTERM: its trainer gets a SIGINT and checkpoints.
- `evaluate`: a run's weights on Kodak24 / Sun-Hays80, either `dcae eval` (ADM centre crop to R, with rFID) or
  "native" (each image whole, cropped only to a multiple of the spatial factor).
- `write_json_atomic` (dcae.files.write_json): results files are replaced in one rename, never left half-written.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from dcae.files import write_json as write_json_atomic
from dcae.provenance import file_sha256, provenance

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DCAE_DATA") or REPO.parent / "shared" / "data")  # DCAE_DATA: the same layout elsewhere
BSDS = DATA / "bsds500"
EVAL_SETS = {"kodak24": DATA / "kodak24", "sunhays80": DATA / "sunhays80"}  # evaluation only: never trained on
TRAIN_FOLDER = Path("runs/data/bsds500-train+test")  # relative to the repository root, like runs/
SMOKE_BUDGET_MIN = 1.0  # a run with a smaller per-run budget is labelled a smoke run in the report

# Phase-1 recipe for the tiny presets on a CPU (experiments/train_default.py): the paper's lr 6.4e-5 is far too slow
# for runs of tens of minutes, so lr is 1e-3; later phases keep the paper's ratio to it (1.6e-5 / 6.4e-5 = 1/4 for
# phase 2, 5.4e-5 / 6.4e-5 = 0.84 for phase 3).
PHASE1_LR = 1e-3
COMMON_OVERRIDES = ["phase.lpips_weight=0.1", "ema_decay=0.999", "val_every=500", "ckpt_every=250",
                    "progress=false", "log_every=25"]
PHASE_OVERRIDES = {
    1: [f"phase.optim.lr={PHASE1_LR:g}", "phase.optim.warmup_steps=200", "phase.optim.weight_decay=0.01"],
    2: [f"phase.optim.lr={PHASE1_LR / 4:g}", "phase.optim.warmup_steps=100"],
    3: [f"phase.optim.lr={PHASE1_LR * 5.4 / 6.4:g}", "phase.optim.warmup_steps=100"],
}


# ----------------------------------------------------------------------------------------------------------------------
# Data
def union_folder(root: Path, source: Path = BSDS, parts: Iterable[str] = ("train", "test")) -> Path:
    """A folder of symlinks joining several splits of `source` (root/part/name -> source/part/name); returns root."""
    root.mkdir(parents=True, exist_ok=True)
    for part in parts:
        if not (source / part).is_dir():
            raise FileNotFoundError(f"{source / part}: missing data split")
        (root / part).mkdir(exist_ok=True)
        for image in sorted((source / part).iterdir()):
            if image.suffix.lower() not in (".jpg", ".jpeg", ".png") or image.name.startswith("."):
                continue
            link = root / part / image.name
            if not link.is_symlink():
                with contextlib.suppress(FileExistsError):  # made by a concurrent study meanwhile
                    link.symlink_to(image.resolve())
    return root


def training_data() -> tuple[Path, Path]:
    """(train folder = BSDS500 train+test, validation folder = BSDS500 val)."""
    return union_folder(REPO / TRAIN_FOLDER), BSDS / "val"


# ----------------------------------------------------------------------------------------------------------------------
# Budgeted training
def run_key(train_args: list[str], budget_s: float) -> str:
    """Eight hex digits naming a run by everything that decides its result (its arguments and budget)."""
    text = json.dumps({"args": train_args, "budget_s": round(budget_s, 3)})
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def phase_args(phase: int, resolution: int, seed: int, batch_size: int, *, preset: str | None = None,
               init: str | Path | None = None, extra: Iterable[str] = ()) -> list[str]:
    """`dcae train` arguments of one phase with this study suite's recipe (run dir and budget are added later)."""
    train, val = training_data()
    args = ["--phase", str(phase), "--data", str(train), "--val-data", str(val), "--steps", "1000000",
            "--batch-size", str(batch_size), "--resolution", str(resolution), "--seed", str(seed),
            "--num-workers", "1"]
    if preset is not None:
        args += ["--preset", preset]
    if init is not None:
        args += ["--init", str(init)]
    return args + COMMON_OVERRIDES + PHASE_OVERRIDES[phase] + list(extra)


def _read_new_lines(path: Path, offset: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, "rb") as handle:
        handle.seek(offset)
        lines = handle.read().decode(errors="replace").splitlines()
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written right now
    return records


def _loop_started(records: list[dict[str, Any]]) -> bool:
    """True once the trainer is inside its step loop (where SIGINT means: checkpoint, then stop)."""
    for r in records:
        if r.get("event") in ("resume", "val", "checkpoint") or ("event" not in r and "step" in r):
            return True
    return False


def _summarise_log(records: list[dict[str, Any]]) -> dict[str, Any]:
    steps = [r for r in records if "event" not in r and "step" in r]
    vals = [r for r in records if r.get("event") == "val"]
    checkpoints = [r["step"] for r in records if r.get("event") == "checkpoint"]
    out: dict[str, Any] = {"final_step": checkpoints[-1] if checkpoints else None}
    if steps:
        out["images_per_s"] = sum(r["images_per_s"] for r in steps) / len(steps)
        out["final_train_loss"] = steps[-1].get("loss")
    if vals:
        out["final_val_psnr"], out["final_val_lpips"] = vals[-1].get("val_psnr"), vals[-1].get("val_lpips")
    start = next((r for r in records if r.get("event") in ("start", "resume")), None)
    if start is not None:
        out["trainable_params"], out["total_params"] = start.get("trainable_params"), start.get("total_params")
        if out["final_step"] is not None:
            out["steps_trained"] = out["final_step"] - start["step"]  # a continued run starts at its base's step
    return out


def train_budgeted(train_args: list[str], runs_root: Path, label: str, budget_s: float,
                   poll_s: float = 2.0) -> dict[str, Any]:
    """Train `dcae train *train_args` in runs_root/<label>-<key> for `budget_s` wall-clock seconds, then SIGINT.

    Returns {run_dir, commands, budget_s, loop_s, used_s, final_step, images_per_s, ...}. The budget counts the
    trainer's step loop (`loop_s`, periodic validation and checkpoints included), not its start-up (model build,
    LPIPS load, first validation: `used_s` is the whole process time), so a loaded machine at start-up costs no
    steps, and a tiny budget still gives at least one step and a checkpoint. A run whose budget was already spent is
    reused as is; a run interrupted earlier (this script stopped) resumes for what is left.
    """
    run_dir = Path(runs_root).resolve() / f"{label}-{run_key(train_args, budget_s)}"
    with run_lock(run_dir):
        return _run_budgeted(run_dir, label, budget_s, train_args, poll_s)


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on a run (two studies started together train a shared run once: the second waits)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f".{run_dir.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def continue_budgeted(base: dict[str, Any], runs_root: Path, label: str, budget_s: float,
                      poll_s: float = 2.0) -> dict[str, Any]:
    """Continue a finished run exactly (optimizer, EMA, step count, data order) in a copy of it, for `budget_s` more."""
    source = Path(base["run_dir"])
    run_dir = Path(runs_root).resolve() / f"{label}-{run_key(['continue', str(source)], budget_s)}"
    with run_lock(run_dir):
        return _continue_locked(source, run_dir, label, budget_s, poll_s)


def _continue_locked(source: Path, run_dir: Path, label: str, budget_s: float, poll_s: float) -> dict[str, Any]:
    if not run_dir.exists():
        tmp = run_dir.with_name(run_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("eval", "budget.json", "stdout.log", "samples"))
        log = tmp / "log.jsonl"
        write_json_atomic(tmp / "budget.json", {
            "run_dir": str(run_dir), "label": label, "budget_s": budget_s, "used_s": 0.0, "loop_s": 0.0,
            "commands": [shlex.join(["cp", "-r", str(source), str(run_dir)])], "continued_from": str(source),
            "log_offset": log.stat().st_size if log.is_file() else 0, "done": False})
        os.rename(tmp, run_dir)
    return _run_budgeted(run_dir, label, budget_s, None, poll_s)


def _run_budgeted(run_dir: Path, label: str, budget_s: float, train_args: list[str] | None,
                  poll_s: float) -> dict[str, Any]:
    """Start (train_args) or resume (no train_args, or an interrupted run) `dcae train` in run_dir until the budget."""
    marker = run_dir / "budget.json"
    state = json.loads(marker.read_text()) if marker.is_file() else None
    if state is not None and state.get("done"):
        print(f"[reuse] {run_dir}: budget spent, step {state.get('final_step')}", flush=True)
        return state
    if state is None and (run_dir / "checkpoints").exists():
        raise RuntimeError(f"{run_dir}: holds a run this script did not start (no budget.json); remove it")
    if state is None:
        state = {"run_dir": str(run_dir), "label": label, "budget_s": budget_s, "used_s": 0.0, "loop_s": 0.0,
                 "commands": [], "log_offset": 0, "done": False}
    run_dir.mkdir(parents=True, exist_ok=True)
    resume = train_args is None or (bool(state["commands"]) and (run_dir / "checkpoints").exists())
    cli = ["--resume", str(run_dir), "--steps", "1000000"] if resume else [*train_args, "--run-dir", str(run_dir)]
    command = [sys.executable, "-m", "dcae.cli", "train", *cli]
    state["commands"].append(shlex.join(["dcae", "train", *cli]))
    log = run_dir / "log.jsonl"
    offset = log.stat().st_size if log.is_file() else 0
    remaining = max(0.0, budget_s - state["loop_s"])
    print(f"[train] {label}: {remaining / 60:.1f} min -> {run_dir}", flush=True)
    started = time.time()
    loop_started_at: float | None = None
    stopped_by = "exit"  # "budget" once this script has sent the one SIGINT
    with open(run_dir / "stdout.log", "ab") as out:
        # Own session: a Ctrl-C in the terminal reaches only this script, which forwards exactly one SIGINT (a second
        # one makes the trainer stop without its checkpoint). If this script dies, the kernel sends the SIGINT.
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                preexec_fn=_interrupt_when_parent_dies)
        try:
            while proc.poll() is None:
                time.sleep(poll_s)
                now = time.time()
                if loop_started_at is None and _loop_started(_read_new_lines(log, offset)):
                    loop_started_at = now
                _write_progress(marker, state, now - started, now - (loop_started_at or now))
                if loop_started_at is not None and now - loop_started_at >= remaining:
                    proc.send_signal(signal.SIGINT)  # the trainer finishes its step, checkpoints, exits 130
                    stopped_by = "budget"
                    proc.wait()
        except BaseException:
            if proc.poll() is None:
                if stopped_by != "budget":  # never a second SIGINT: the trainer would stop without its checkpoint
                    proc.send_signal(signal.SIGINT)
                proc.wait()
            _write_progress(marker, state, time.time() - started, time.time() - (loop_started_at or time.time()))
            raise
    ended = time.time()
    state["used_s"] += ended - started
    state["loop_s"] += ended - (loop_started_at or ended)
    records = _read_new_lines(log, state.get("log_offset", 0))
    if proc.returncode not in (0, 130) or not any(r.get("event") == "checkpoint" for r in records):
        tail = (run_dir / "stdout.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{label}: dcae train exited {proc.returncode} without a checkpoint; "
                           f"its output ends:\n{tail}")
    state.update(_summarise_log(records), done=True, stopped_by=stopped_by, returncode=proc.returncode)
    write_json_atomic(marker, state)
    speed = f", {state['images_per_s']:.1f} img/s" if state.get("images_per_s") else ""
    print(f"[train] {label}: step {state['final_step']} after {state['loop_s']:.0f} s of steps "
          f"({state['used_s']:.0f} s in all{speed})", flush=True)
    return state


def _interrupt_when_parent_dies() -> None:
    """In the child before exec (Linux): SIGINT it when its parent exits, so no trainer outlives its budget."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGINT)  # 1 = PR_SET_PDEATHSIG


def _write_progress(marker: Path, state: dict[str, Any], elapsed: float, loop: float) -> None:
    write_json_atomic(marker, {**state, "used_s": state["used_s"] + elapsed, "loop_s": state["loop_s"] + loop})


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation
def parse_eval_spec(spec: str) -> tuple[str, int | None]:
    """'kodak24@256' -> ('kodak24', 256); 'sunhays80@native' -> ('sunhays80', None)."""
    name, _, size = spec.partition("@")
    if name not in EVAL_SETS or not size:
        raise ValueError(f"eval spec {spec!r}: expected SET@RES or SET@native, SET in {', '.join(EVAL_SETS)}")
    return name, None if size == "native" else int(size)


def weights_file(run_dir: Path, weights: str) -> Path:
    """The weights of a run to evaluate: model.safetensors (raw) or ema.safetensors."""
    return Path(run_dir) / ("ema.safetensors" if weights == "ema" else "model.safetensors")


def evaluate(run_dir: Path, spec: str, weights: str = "model", limit: int | None = None) -> dict[str, Any]:
    """Metrics of a run's weights on one eval spec; cached as run_dir/eval/<spec>-<weights>[-nN].json."""
    name, resolution = parse_eval_spec(spec)
    cache = Path(run_dir) / "eval" / f"{spec.replace('@', '_')}-{weights}{f'-n{limit}' if limit else ''}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    started = time.time()
    model = weights_file(run_dir, weights)
    if resolution is None:
        result = evaluate_native(model, EVAL_SETS[name], limit)
        result["command"] = f"experiments.common.evaluate_native('{model}', '{EVAL_SETS[name]}', limit={limit})"
    else:
        tmp = cache.with_name(cache.name + ".dcae-eval.json")
        cli = ["--model", str(model), "--data", str(EVAL_SETS[name]), "--resolution", str(resolution),
               "--json", str(tmp), "--batch-size", "4"] + (["--limit", str(limit)] if limit else [])
        subprocess.run([sys.executable, "-m", "dcae.cli", "eval", *cli], check=True, cwd=REPO)
        result = json.loads(tmp.read_text())
        tmp.unlink()
        result["command"] = shlex.join(["dcae", "eval", *cli])
    result.update(spec=spec, set=name, resolution=resolution or "native", weights=weights,
                  wall_s=time.time() - started)
    write_json_atomic(cache, result)
    rfid = "n/a" if result.get("rfid") is None else f"{result['rfid']:.2f}"
    print(f"[eval] {Path(run_dir).name} {spec}: PSNR {result['psnr']:.2f}  SSIM {result['ssim']:.4f}  "
          f"LPIPS {result['lpips']:.4f}  rFID {rfid} (n={result['n']})", flush=True)
    return result


def native_crop(image: torch.Tensor, factor: int) -> torch.Tensor:
    """(3, H, W) -> the centred (3, H', W') with H', W' the largest multiples of `factor` (no resizing)."""
    h, w = image.shape[-2:]
    nh, nw = h // factor * factor, w // factor * factor
    top, left = (h - nh) // 2, (w - nw) // 2
    return image[:, top:top + nh, left:left + nw]


def evaluate_native(model_path: str | Path, folder: Path, limit: int | None = None) -> dict[str, Any]:
    """PSNR/SSIM/LPIPS (+ rFID, Inception resizes to 299 inside) of whole images, one at a time, no tiling."""
    from dcae.autoencoder import DCAE
    from dcae.images import find_images, read_image, to_model_range
    from dcae.metrics import FeatureStats, MeanAccumulator, fid_from_stats, psnr, quantize, ssim, to_uint8
    from dcae.perceptual import LPIPS, InceptionFeatures

    model = DCAE.from_pretrained(model_path).eval()
    lpips, inception = LPIPS("alex"), InceptionFeatures()
    acc = {k: MeanAccumulator() for k in ("psnr", "ssim", "lpips")}
    ref_stats, rec_stats = FeatureStats(), FeatureStats()
    sizes = set()
    for path, _ in find_images([folder])[:limit]:
        image = native_crop(read_image(path), model.spatial_factor)  # (3, H', W') uint8
        if min(image.shape[-2:]) < model.spatial_factor:
            continue
        sizes.add(tuple(image.shape[-2:]))
        with torch.inference_mode():
            y = model(to_model_range(image)[None]).float()  # (1, 3, H', W')
            ref01, rec01 = image[None].float() / 255, quantize(y)
            acc["psnr"].update(psnr(ref01, rec01))
            acc["ssim"].update(ssim(ref01, rec01))
            acc["lpips"].update(lpips(ref01 * 2 - 1, rec01 * 2 - 1))
            ref_stats.update(inception(image[None]))
            rec_stats.update(inception(to_uint8(y)))
    n = int(acc["psnr"].count.item())
    return {**{k: a.mean for k, a in acc.items()}, "rfid": fid_from_stats(ref_stats, rec_stats) if n >= 2 else None,
            "n": n, "model": str(model_path), "sizes": sorted(f"{w}x{h}" for h, w in sizes)}


# ----------------------------------------------------------------------------------------------------------------------
# Results
def compression_ratio(preset: str) -> dict[str, Any]:
    """Numbers per image: pixels 3*H*W over latent c*(H/f)*(W/f) = 3 f^2 / c; plus the parameter count."""
    import dcae

    model = dcae.create_model(preset)
    f, c = model.spatial_factor, model.latent_channels
    return {"latent": f"f{f}c{c}", "spatial_factor": f, "latent_channels": c, "compression_ratio": 3 * f * f / c,
            "params": sum(p.numel() for p in model.parameters())}


def study_parser(description: str, out: str, resolution: int = 128) -> argparse.ArgumentParser:
    """The arguments every study shares."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--budget-min", type=float, default=40.0, help="wall-clock minutes per training run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one full set of runs per seed")
    parser.add_argument("--resolution", type=int, default=resolution, help="phase-1 training crop size R")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(out), help="results JSON")
    parser.add_argument("--runs-root", type=Path, default=Path("runs/experiments"),
                        help="training runs (shared across studies: identical runs train once)")
    parser.add_argument("--weights", choices=("model", "ema"), default="model", help="which weights to evaluate")
    parser.add_argument("--eval-limit", type=int, default=None, help="first N images of each eval set (smoke runs)")
    return parser


def new_results(study: str, args: argparse.Namespace, claim: str,
                models: dict[str, Any] | None = None) -> dict[str, Any]:
    """The header every results JSON starts with (`provenance`: dcae/provenance.py; `models`: files it starts from)."""
    return {"provenance": provenance(models), "study": study, "claim": claim, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": shlex.join([Path(sys.executable).name, "-m", f"experiments.{study}", *sys.argv[1:]]),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "smoke": args.budget_min < SMOKE_BUDGET_MIN or args.eval_limit is not None,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
            "arms": []}


def print_summary(results: dict[str, Any], specs: list[str]) -> None:
    """One line per arm: steps and the main metrics of each eval spec."""
    print(f"\n{results['study']} ({'SMOKE' if results['smoke'] else 'full'}), wall {results.get('wall_s', 0):.0f} s")
    for arm in results["arms"]:
        cells = []
        for spec in specs:
            m = arm["eval"].get(spec)
            if m:
                cells.append(f"{spec}: {m['psnr']:.2f} dB / LPIPS {m['lpips']:.3f}")
        steps = "+".join(str(t.get("steps_trained", t.get("final_step"))) for t in arm["train"])
        print(f"  {arm['name']:<34} seed {arm['seed']}  steps {steps:<10} " + "  ".join(cells))


def train_phase1(args: argparse.Namespace, preset: str, seed: int, extra: Iterable[str] = ()) -> dict[str, Any]:
    """The suite's phase-1 run of a preset at args.resolution for args.budget_min (shared by every study)."""
    train_args = phase_args(1, args.resolution, seed, args.batch_size, preset=preset, extra=extra)
    label = f"{preset}-p1-r{args.resolution}-s{seed}"
    return train_budgeted(train_args, args.runs_root, label, args.budget_min * 60)


def record_arm(results: dict[str, Any], arm: dict[str, Any], started: float, out: Path) -> None:
    """Add one finished arm and rewrite the results file, so an interrupted study keeps what it has measured."""
    results["arms"].append(arm)
    results["wall_s"] = time.time() - started
    write_json_atomic(out, results)


def finish(results: dict[str, Any], specs: list[str], out: Path) -> int:
    print_summary(results, specs)
    print(f"wrote {out}")
    return 0


def make_arm(name: str, seed: int, trains: list[dict[str, Any]], specs: list[str], args: argparse.Namespace,
             **extra: Any) -> dict[str, Any]:
    """One configuration's record: its training chain (base run first) and its metrics on each eval spec."""
    run_dir = Path(trains[-1]["run_dir"])
    weights = weights_file(run_dir, args.weights)
    return {"name": name, "seed": seed, "run_dir": str(run_dir), "train": trains,
            "weights_sha256": file_sha256(weights) if weights.is_file() else None,
            "train_wall_s": sum(t["used_s"] for t in trains), "train_loop_s": sum(t["loop_s"] for t in trains),
            "eval": {spec: evaluate(run_dir, spec, args.weights, args.eval_limit) for spec in specs}, **extra}
