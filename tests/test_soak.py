"""One SIGKILL/resume cycle per trainer, fast: scripts/soak.py runs many, at random moments, and under torchrun.

A run killed between writing checkpoint 2 and publishing it (the checkpoint sleep hook holds it there) resumes from
checkpoint 1 and ends bit-identical to an uninterrupted run: weights, EMA and every optimizer tensor.
"""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from dcae.cli import main
from dcae.runs import CHECKPOINT_SLEEP_ENV, latest_checkpoint
from scripts import soak
from test_fuzz import _WORKDIR, cache_seed, micro_checkpoint
from test_fuzz_runs import micro_diffusion_overrides, train_images

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 3


def trainer_args(trainer: str, run_dir: Path) -> list[str]:
    if trainer == "train":
        return ["train", "--phase", "1", "--init", str(micro_checkpoint("dcae")), "--data", str(train_images()),
                "--steps", str(STEPS), "--batch-size", "2", "--resolution", "32", "--seed", "0", "--run-dir",
                str(run_dir), "data.num_workers=0", "progress=false", "phase.lpips_weight=0", "ckpt_every=1",
                "log_every=1", "ema_decay=0.9", "precision=fp32"]
    cache_seed()
    cache = Path(_WORKDIR.name) / "cache-seed" / "cache"
    return ["train-diffusion", "--latents", str(cache), "--preset", "DiT-T/1", "--steps", str(STEPS), "--batch-size",
            "4", "--run-dir", str(run_dir), *micro_diffusion_overrides(), "ckpt_every=1", "log_every=1",
            "progress=false", "precision=fp32"]


@pytest.mark.parametrize("trainer", ["train", "train-diffusion"])
def test_sigkill_mid_checkpoint_then_resume_is_bit_identical(tmp_path, trainer):
    reference, run_dir = tmp_path / "reference", tmp_path / "killed"
    assert main(trainer_args(trainer, reference)) == 0
    process = subprocess.Popen(soak.dcae(trainer_args(trainer, run_dir)), cwd=soak.REPO,
                               env=soak.environment({CHECKPOINT_SLEEP_ENV: "60"}), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        written = run_dir / "checkpoints" / ".tmp_step_00000002" / "state.pt"
        deadline = time.monotonic() + 300
        while not written.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert written.exists(), process.stderr.read().decode()[-2000:]
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()
    assert soak.kill_point(run_dir, None, STEPS) == "mid-checkpoint-write"
    assert latest_checkpoint(run_dir).name == "step_00000001"
    assert main([trainer, "--resume", str(run_dir), "--steps", str(STEPS), "progress=false"]) == 0
    result = soak.compare(reference, run_dir)
    assert result["identical"] and result["final_step"] == STEPS, result
    assert not list((run_dir / "checkpoints").glob(".tmp_step_*"))  # the torn write was cleaned up


def test_auto_resume_starts_a_run_then_continues_it(tmp_path):
    """TORCHRUN_RESTART: torchrun restarts a job with its first command line; `--auto-resume` starts the run when it
    has no checkpoint and continues it when it has one (a restarted `dcae train` used to refuse its own run)."""
    for trainer in ("train", "train-diffusion"):
        run_dir = tmp_path / trainer
        args = trainer_args(trainer, run_dir)
        first = [a if a != str(STEPS) else "2" for a in args]  # the same command, two steps
        assert main(first + ["--auto-resume"]) == 0
        assert main(args + ["--auto-resume"]) == 0  # now a resume to step 3
        events = [line.get("event") for line in soak.log_records(run_dir)]
        assert events.count("start") == 1 and events.count("resume") == 1
        assert latest_checkpoint(run_dir).name == "step_00000003"
        assert main(args + ["--auto-resume", "--resume", str(run_dir)]) == 2


def test_restart_store_prefixes_keys_by_attempt(monkeypatch):
    """TORCHRUN_RESTART: under torchrun, the process group's keys live under dcae/attempt_N (TORCHELASTIC_RESTART_COUNT),
    so a restarted rank never reads an address a rank of the failed attempt published."""
    import torch.distributed as dist

    from dcae.runs import restart_store

    server = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "3")
    store = restart_store(rank=0, world_size=1)
    store.set("rank0_address", "x")
    assert server.get("dcae/attempt_3/rank0_address") == b"x"
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")
    assert restart_store(rank=0, world_size=1) is None  # outside torchrun: init_process_group's env:// as it is
