"""Latent diffusion training: the loss goes down, resume is exact, configs and overrides, batches, sampling CLI."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dcae.diffusion.latents import cache_latents, list_labeled_images, load_latent_cache, plan_cache
from dcae.diffusion.objectives import FlowMatching
from dcae.diffusion.pipeline import sample_images, sample_labels, sample_noise
from dcae.diffusion.train import (
    TrainDiffusionConfig,
    apply_overrides,
    batch_indices,
    config_dict,
    config_from_json,
    load_diffusion_checkpoint,
    load_run_config,
    train_diffusion,
)
from dcae.errors import DCAEError
from test_diffusion_cache import StandInAE

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """24 images in 3 classes, each class one colour plus noise: 3x4x4 latents that a tiny model can learn."""
    root = tmp_path_factory.mktemp("diffusion")
    rng = np.random.default_rng(0)
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230)}
    for name, colour in colours.items():
        (root / "data" / name).mkdir(parents=True)
        for i in range(8):
            pixels = np.clip(np.array(colour) + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "data" / name / f"{i}.png")
    files, labels, names = list_labeled_images([root / "data"])
    ae = StandInAE()
    index = plan_cache(files, labels, names, ae, resolution=16, flip=True, dtype="float32", shard_size=10,
                       autoencoder_source="stand-in")
    cache_latents(ae, index, root / "cache")
    return root / "cache"


def tiny_config(cache_dir: Path, run_dir: Path, **changes) -> TrainDiffusionConfig:
    config = TrainDiffusionConfig(latents=str(cache_dir), preset="DiT-T/1", run_dir=str(run_dir), steps=40,
                                  batch_size=16, log_every=1, ckpt_every=1000, progress=False)
    config = apply_overrides(config, ["optim.lr=1e-3"])
    return dataclasses.replace(config, **changes)


def log_lines(run_dir: Path, key: str) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [line for line in lines if key in line]


def losses(run_dir: Path) -> list[float]:
    return [line["loss"] for line in log_lines(run_dir, "loss")]


@pytest.mark.parametrize("objective", ["flow", "eps"])
def test_loss_goes_down(cache_dir, tmp_path, objective):
    run_dir = train_diffusion(tiny_config(cache_dir, tmp_path / "run", objective=objective))
    values = losses(run_dir)
    assert len(values) == 40
    first, last = np.mean(values[:8]), np.mean(values[-8:])
    assert last < 0.75 * first, (first, last)


def test_bf16_autocast_trains(cache_dir, tmp_path):
    run_dir = train_diffusion(tiny_config(cache_dir, tmp_path / "run", steps=3, precision="bf16", preset="UViT-T/1"))
    assert all(np.isfinite(losses(run_dir)))
    assert load_file(run_dir / "checkpoints" / "step_00000003" / "model.safetensors")["pos_embed"].dtype == torch.float32


AUGMENT = {"augment_weight": 0.5, "augment_channels": (1, 2)}


@pytest.mark.parametrize("changes", [{}, AUGMENT, {**AUGMENT, "augment_mask_input": False, "latent_channels": 2,
                                                   "augment_channels": (1,)}],
                         ids=["plain", "augment", "augment-loss-only-2-channels"])
def test_resume_is_exact(cache_dir, tmp_path, changes):
    straight = train_diffusion(tiny_config(cache_dir, tmp_path / "a", steps=6, **changes))
    train_diffusion(tiny_config(cache_dir, tmp_path / "b", steps=3, **changes))
    resumed = train_diffusion(tiny_config(cache_dir, tmp_path / "b", steps=6, **changes), resume=True)
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(straight / "checkpoints" / "step_00000006" / name)
        b = load_file(resumed / "checkpoints" / "step_00000006" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state_a = torch.load(straight / "checkpoints" / "step_00000006" / "state.pt", weights_only=True)
    state_b = torch.load(resumed / "checkpoints" / "step_00000006" / "state.pt", weights_only=True)
    assert torch.equal(state_a["rng"], state_b["rng"])
    assert losses(straight) == losses(resumed)
    prefix_losses = [[line["loss_prefix"] for line in log_lines(run, "loss_prefix")] for run in (straight, resumed)]
    assert prefix_losses[0] == prefix_losses[1] and len(prefix_losses[0]) == (6 if changes else 0)
    with pytest.raises(DCAEError, match="already holds a training run"):
        train_diffusion(tiny_config(cache_dir, tmp_path / "a", steps=6))


def test_augment_weight_zero_is_todays_training(cache_dir, tmp_path):
    today = train_diffusion(tiny_config(cache_dir, tmp_path / "a", steps=3))
    off = train_diffusion(tiny_config(cache_dir, tmp_path / "b", steps=3, augment_weight=0.0, augment_channels=(1, 2),
                                      augment_mask_input=False))
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(today / "checkpoints" / "step_00000003" / name)
        b = load_file(off / "checkpoints" / "step_00000003" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(today) == losses(off) and log_lines(off, "loss_prefix") == []


@pytest.mark.parametrize("preset, objective, mask_input", [("DiT-T/1", "flow", True), ("UViT-T/1", "eps", False)])
def test_augmented_training_logs_both_losses(cache_dir, tmp_path, preset, objective, mask_input):
    run_dir = train_diffusion(tiny_config(cache_dir, tmp_path / "run", steps=3, preset=preset, objective=objective,
                                          augment_mask_input=mask_input, precision="fp32", **AUGMENT))
    lines = log_lines(run_dir, "loss")
    assert len(lines) == 3 and all(np.isfinite([line["loss_full"], line["loss_prefix"]]).all() for line in lines)
    assert all(line["loss"] == pytest.approx(line["loss_full"] + 0.5 * line["loss_prefix"], rel=1e-6) for line in lines)
    start = log_lines(run_dir, "event")[0]
    assert start["augment"] == {"weight": 0.5, "sizes": [1, 2], "mask_input": mask_input}
    assert load_run_config(run_dir).augment_channels == (1, 2)


def test_latent_channels_train_on_a_prefix(cache_dir, tmp_path):
    run_dir = train_diffusion(tiny_config(cache_dir, tmp_path / "run", steps=2, latent_channels=2))
    ckpt = load_diffusion_checkpoint(run_dir)
    assert ckpt.model.config.in_channels == 2
    assert ckpt.info["latent_shape"] == [2, 4, 4] and ckpt.info["cache_latent_shape"] == [3, 4, 4]
    full, prefix = load_latent_cache(cache_dir), load_latent_cache(cache_dir, channels=2)
    assert torch.equal(prefix.latents, full.latents[:, :2]) and prefix.latents.is_contiguous()
    assert ckpt.info["scaling_factor"] == pytest.approx(1 / full.latents[:, :2].double().std().item())
    with pytest.raises(DCAEError, match="latent_channels=4: expected an integer from 1 to 3"):
        train_diffusion(tiny_config(cache_dir, tmp_path / "bad", latent_channels=4))


def test_checkpoint_carries_everything_to_sample(cache_dir, tmp_path):
    run_dir = train_diffusion(tiny_config(cache_dir, tmp_path / "run", steps=4, preset="UViT-T/2"))
    ckpt = load_diffusion_checkpoint(run_dir)
    assert ckpt.path.name == "ema.safetensors" and ckpt.info["step"] == 4
    assert ckpt.model.config.arch == "uvit" and ckpt.model.config.num_classes == 3
    assert ckpt.info["class_names"] == ["blue", "green", "red"]
    cache = load_latent_cache(cache_dir)
    assert ckpt.info["scaling_factor"] == pytest.approx(1 / cache.latents.double().std().item())
    config = load_run_config(run_dir)
    assert config.model == ckpt.model.config and config.scaling_factor == ckpt.info["scaling_factor"]
    assert config_from_json(json.loads(json.dumps(config_dict(config))), "x") == config


def test_seeded_sampling_is_reproducible_and_batch_independent(cache_dir, tmp_path):
    run_dir = train_diffusion(tiny_config(cache_dir, tmp_path / "run", steps=2))
    ckpt = load_diffusion_checkpoint(run_dir)
    labels = sample_labels(5, 3, seed=7)

    def draw(seed: int, batch_size: int) -> torch.Tensor:
        return sample_images(ckpt.model, StandInAE(), FlowMatching(), sample_noise(5, [3, 4, 4], seed), labels,
                             ckpt.info["scaling_factor"], cfg_scale=2.0, steps=3, batch_size=batch_size)

    a, b, c = draw(7, 2), draw(7, 5), draw(8, 5)
    assert a.shape == (5, 3, 16, 16)
    assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(a, c)


def test_overrides():
    config = TrainDiffusionConfig(model=None)
    config = apply_overrides(config, ["optim.lr=3e-4", "objective=eps", "scaling_factor=0.5", "optim.betas=0.9,0.95"])
    assert config.optim.lr == 3e-4 and config.objective == "eps" and config.optim.betas == (0.9, 0.95)
    assert config.scaling_factor == 0.5 and TrainDiffusionConfig().optim.lr == 1e-4  # the default is untouched
    for bad, message in [("optim.lrr=1", "unknown key"), ("steps=ten", "expected int"), ("nokey", "key=value"),
                         ("model.depth=3", "no config section")]:
        with pytest.raises(DCAEError, match=message):
            apply_overrides(config, [bad])


def test_batches_cover_each_epoch_once_and_ranks_split_the_global_batch():
    seen = torch.cat([batch_indices(step, 10, 5, 0, 1, seed=3) for step in range(4)])
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert not torch.equal(seen[:10], seen[10:])  # a new permutation each epoch
    for step in (0, 1, 5):
        single = batch_indices(step, 7, 6, 0, 1, seed=1)
        ranks = [batch_indices(step, 7, 6, r, 3, seed=1) for r in range(3)]
        assert sorted(torch.cat(ranks).tolist()) == sorted(single.tolist())


def test_cli_cache_train_resume_and_sample(tmp_path, capsys):
    from dcae.cli import main

    rng = np.random.default_rng(1)
    for name in ("cat", "dog"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray((rng.random((36, 40, 3)) * 255).astype(np.uint8)).save(tmp_path / "data" / name / f"{i}.png")
    cache, run_dir, out = tmp_path / "cache", tmp_path / "run", tmp_path / "samples"
    assert main(["cache-latents", "--model", "dc-ae-tiny-f32c32", "--data", str(tmp_path / "data"), "-o", str(cache),
                 "--resolution", "64", "--device", "cpu"]) == 0  # 32 x 2 x 2 latents
    args = ["train-diffusion", "--latents", str(cache), "--preset", "DiT-T/2", "--steps", "2", "--batch-size", "4",
            "--run-dir", str(run_dir), "model.depth=1", "progress=false"]
    assert main(args) == 0
    assert main(["train-diffusion", "--resume", str(run_dir), "--steps", "3", "progress=false"]) == 0
    config = load_run_config(run_dir)
    assert (config.steps, config.model.depth, config.model.patch_size) == (3, 1, 2)
    assert main(["train-diffusion", "--latents", str(cache), "--run-dir", str(tmp_path / "x"),
                 "model.patch_size=3"]) == 2
    assert "does not divide" in capsys.readouterr().err
    assert main(["train-diffusion", "--latents", str(cache), "--run-dir", str(tmp_path / "x"),
                 "--latent-channels", "16"]) == 2
    assert "'dc-ae-tiny-f32c32' has no structured latent" in capsys.readouterr().err
    rc = main(["sample", "--diffusion", str(run_dir), "--model", "dc-ae-tiny-f32c32", "-n", "3", "--steps", "2",
               "--cfg", "1.5", "--class", "dog", "--batch-size", "2", "-o", str(out), "--device", "cpu"])
    assert rc == 0 and "not the autoencoder" not in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "000002.png", "grid.png", "sample.json"]
    assert Image.open(out / "000000.png").size == (64, 64) and Image.open(out / "grid.png").size == (128, 128)
    summary = json.loads((out / "sample.json").read_text())
    assert summary["sampler"] == "heun" and summary["class"] == "dog" and summary["step"] == 3
    # Another autoencoder with the same latent shape is accepted with a warning; a different shape is refused.
    assert main(["sample", "--diffusion", str(run_dir), "--model", "dc-ae-tiny-f32c32-plain", "-n", "1", "--steps",
                 "1", "-o", str(tmp_path / "other"), "--device", "cpu"]) == 0
    assert "not the autoencoder the latents were cached with" in capsys.readouterr().err
    for bad in (["--model", "dc-ae-tiny-f64c128"], ["--class", "purple"], ["--sampler", "ddim"]):
        argv = ["sample", "--diffusion", str(run_dir), "--model", "dc-ae-tiny-f32c32", "-n", "1", "-o", str(out)]
        assert main(argv + bad) == 2, bad


def test_cli_structured_latent_prefix_augment_and_sample(tmp_path, capsys):
    """A DC-AE 1.5 cache (128 channels): UViT on its first 32 with the prefix loss, sampled and decoded at 32."""
    from dcae.cli import main

    rng = np.random.default_rng(2)
    for name in ("cat", "dog"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(2):
            pixels = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{i}.png")
    cache, run_dir, out = tmp_path / "cache", tmp_path / "run", tmp_path / "samples"
    assert main(["cache-latents", "--model", "dc-ae-tiny-f32c128-1.5", "--data", str(tmp_path / "data"), "-o",
                 str(cache), "--resolution", "64", "--device", "cpu"]) == 0  # 128 x 2 x 2 latents
    assert main(["train-diffusion", "--latents", str(cache), "--preset", "UViT-T/1", "--steps", "2", "--batch-size",
                 "4", "--run-dir", str(run_dir), "model.depth=1", "progress=false", "--objective", "eps",
                 "--latent-channels", "32", "--augment-weight", "0.5"]) == 0
    start = log_lines(run_dir, "event")[0]
    assert start["latent_shape"] == [32, 2, 2] and start["augment"]["sizes"] == [16]  # multiples of 16 below 32
    assert main(["sample", "--diffusion", str(run_dir), "--model", "dc-ae-tiny-f32c128-1.5", "-n", "2", "--steps",
                 "2", "-o", str(out), "--device", "cpu"]) == 0
    assert json.loads((out / "sample.json").read_text())["latent_channels"] == 32
    assert Image.open(out / "000001.png").size == (64, 64)
    capsys.readouterr()
    assert main(["sample", "--diffusion", str(run_dir), "--model", "dc-ae-tiny-f64c128", "-n", "1", "-o",
                 str(tmp_path / "x"), "--device", "cpu"]) == 2
    assert "no structured latent to decode them" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("augment", [[], ["--augment-weight", "0.5", "--augment-channels", "1", "2"]],
                         ids=["plain", "augment"])
def test_ddp_two_processes_resume_exactly(cache_dir, tmp_path, augment):
    """torchrun, 2 CPU processes over gloo: 3 steps straight equal 2 steps + resume to 3, bit for bit."""
    def torchrun(*args: str) -> None:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "dcae.cli",
                        "train-diffusion", *args, "progress=false"], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})

    common = ["--latents", str(cache_dir), "--preset", "DiT-T/1", "--batch-size", "8", *augment]
    torchrun(*common, "--steps", "3", "--run-dir", str(tmp_path / "straight"))
    torchrun(*common, "--steps", "2", "--run-dir", str(tmp_path / "resumed"))
    torchrun("--resume", str(tmp_path / "resumed"), "--steps", "3")
    a = load_file(tmp_path / "straight" / "checkpoints" / "step_00000003" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoints" / "step_00000003" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(tmp_path / "resumed" / "checkpoints" / "step_00000003" / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and not torch.equal(state["rng"][0], state["rng"][1])


def test_tensorboard_mirrors_log_jsonl(cache_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_diffusion(tiny_config(cache_dir, tmp_path / "plain", steps=2))
    assert not (tmp_path / "plain" / "tensorboard").exists()
    run_dir = tmp_path / "tb"
    train_diffusion(tiny_config(cache_dir, run_dir, steps=3, tensorboard=True))
    assert load_run_config(run_dir).tensorboard
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    expected = {line["step"]: line["loss"] for line in lines if "loss" in line}
    assert sorted(logged) == sorted(expected) == [1, 2, 3]
    assert all(logged[s] == pytest.approx(expected[s], rel=1e-6) for s in expected)
    assert "train/lr" in events.Tags()["scalars"] and "train/event" not in events.Tags()["scalars"]
