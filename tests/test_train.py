"""Training: configs and overrides, phase parameter sets, checkpointing, exact resume, crash safety, NaN handling, CLI."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dcae
import dcae.losses
from dcae.cli import main
from dcae.errors import DCAEError
from dcae.config import config_from_dict, config_to_dict
from dcae.runs import CHECKPOINT_SLEEP_ENV, OptimConfig, latest_checkpoint, load_state, lr_at, update_ema
from dcae.train import (
    ChannelMaskedAutoencoder,
    StructuredLatentConfig,
    TrainConfig,
    apply_overrides,
    candidate_channels,
    channel_mask,
    check_config,
    enable_gradient_checkpointing,
    load_run_config,
    phase_config,
    recipe_configs,
    sample_kept_channels,
    save_checkpoint,
    set_train_mode,
    train,
    trainable_parameters,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
BSDS_VAL = DATA / "bsds500" / "val"
PRESET = "dc-ae-tiny-f32c32"
STRUCTURED = "dc-ae-tiny-f32c128-1.5"


def tiny_config(run_dir, steps=3, workers=0, phase=1, extra=()) -> TrainConfig:
    """The tiny CPU setup of the issue: tiny preset, 64 px crops, batch 2, fixed seed."""
    base = TrainConfig(phase=phase_config(phase))
    return apply_overrides(base, [f"preset={PRESET}", f"run_dir={run_dir}", f"data.path={BSDS_VAL}", f"steps={steps}",
                                  "batch_size=2", "phase.resolution=64", f"data.num_workers={workers}", "seed=0",
                                  "progress=false", "log_every=1", "ckpt_every=100", "optim.warmup_steps=2",
                                  "ema_decay=0.9", *extra])


def max_diff(file_a: Path, file_b: Path) -> float:
    a, b = load_file(str(file_a)), load_file(str(file_b))
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())


def log_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------------------------
def test_overrides_types_aliases_and_errors():
    config = apply_overrides(TrainConfig(), ["optim.lr=1e-4", "phase.resolution=128", "resolution=96",
                                             "optim.betas=0.5,0.9", "phase.use_gan=true", "data.val_path=none",
                                             "gan.disc_warmup_steps=7", "steps=2e3", "init=some/dir"])
    assert config.phase.optim.lr == 1e-4 and config.phase.resolution == 96
    assert config.phase.optim.betas == (0.5, 0.9) and config.phase.use_gan is True
    assert config.data.val_path is None and config.phase.gan.disc_warmup_steps == 7
    assert config.steps == 2000 and config.init == "some/dir"
    assert TrainConfig().phase.optim.lr == 6.4e-5  # the default is not mutated
    for bad, message in [("optim.lr", "key=value"), ("optim.nope=1", "unknown key"), ("nope.lr=1", "no config section"),
                         ("steps=many", "expected int"), ("phase.optim=1", "is a section"),
                         ("phase.use_gan=maybe", "expected bool")]:
        with pytest.raises(DCAEError, match=message):
            apply_overrides(TrainConfig(), [bad])


def test_config_round_trips_through_json():
    config = apply_overrides(TrainConfig(phase=phase_config(3)), ["optim.lr=2e-5", "data.path=x"])
    again = config_from_dict(TrainConfig, json.loads(json.dumps(config_to_dict(config))))
    assert again == config
    with pytest.raises(DCAEError, match="unknown keys"):
        config_from_dict(TrainConfig, {**config_to_dict(config), "typo": 1})


def test_phase_defaults_follow_the_paper():
    p1, p2, p3 = phase_config(1), phase_config(2), phase_config(3)
    assert (p1.optim.lr, p1.optim.weight_decay, p1.trainable) == (6.4e-5, 0.1, "all")
    assert (p2.optim.lr, p2.optim.weight_decay, p2.trainable) == (1.6e-5, 1e-3, "latent_adaptation")
    assert p2.resolution > p1.resolution and p2.grad_checkpointing
    assert (p3.optim.lr, p3.optim.betas, p3.trainable, p3.use_gan) == (5.4e-5, (0.5, 0.9), "decoder_head", True)
    assert p3.gan.loss == "hinge" and p3.gan.disc_warmup_steps > 0
    with pytest.raises(DCAEError):
        phase_config(4)


def test_phase_parameter_sets_and_frozen_batchnorm():
    torch.manual_seed(0)
    model = dcae.create_model(PRESET)
    total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in trainable_parameters(model, "all")) == total
    adapt = trainable_parameters(model, "latent_adaptation")
    assert 0 < sum(p.numel() for p in adapt) < total
    assert all(p.requires_grad == any(p is q for q in adapt) for p in model.parameters())
    assert model.encoder.project_out.conv.weight.requires_grad and model.decoder.project_in.conv.weight.requires_grad
    assert not model.encoder.project_in.conv.weight.requires_grad
    set_train_mode(model)
    norms = [m for m in model.decoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(not m.training for m in norms)  # frozen BatchNorm keeps its running statistics
    head = trainable_parameters(model, "decoder_head")
    assert {id(p) for p in head} == {id(p) for p in model.decoder_head_parameters()}
    assert sum(p.numel() for p in head) < 0.01 * total


def test_gradient_checkpointing_gives_the_same_gradients_and_batchnorm_stats():
    torch.manual_seed(0)
    plain = dcae.create_model(PRESET)
    ckpt = dcae.create_model(PRESET)
    ckpt.load_state_dict(plain.state_dict())
    assert enable_gradient_checkpointing(ckpt) > 0
    assert set(ckpt.state_dict()) == set(plain.state_dict())  # keys unchanged: save_pretrained still works
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    for model in (plain, ckpt):
        model.train()
        (model(x) - x).abs().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers()):
        torch.testing.assert_close(a, b, msg=name)  # running stats updated once, not twice


def test_lr_warmup_and_ema():
    optim = phase_config(1).optim
    assert lr_at(0, optim) == pytest.approx(optim.lr / optim.warmup_steps)
    assert lr_at(optim.warmup_steps - 1, optim) == pytest.approx(optim.lr)
    assert lr_at(10 * optim.warmup_steps, optim) == optim.lr
    cosine = OptimConfig(lr=1e-3, warmup_steps=10, decay_steps=100, min_lr_ratio=0.1)
    assert lr_at(0, cosine) == pytest.approx(1e-4)
    assert lr_at(10, cosine) == pytest.approx(1e-3)  # the peak, right after the warm-up
    assert lr_at(60, cosine) == pytest.approx(0.55e-3)  # half way: the mean of peak and floor
    assert lr_at(110, cosine) == pytest.approx(1e-4) and lr_at(10_000, cosine) == pytest.approx(1e-4)
    values = [lr_at(s, cosine) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # never rises during the decay
    no_warmup = OptimConfig(lr=1e-3, warmup_steps=0, decay_steps=4)
    assert [lr_at(s, no_warmup) for s in range(5)] == pytest.approx([1e-3, 8.535534e-4, 5e-4, 1.464466e-4, 0.0])
    ema, model = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.num_batches_tracked.fill_(5)
    update_ema(ema, model, decay=0.75)
    torch.testing.assert_close(ema.weight, torch.full((2,), 1.5))  # 0.75 * 1 + 0.25 * 3
    assert ema.num_batches_tracked.item() == 5


# ----------------------------------------------------------------------------------------------------------------------
# The structured-latent case (DC-AE 1.5 masks, per image, with validation at the smallest prefix) rides on the
# no-worker run rather than adding a third.
STRUCTURED_RUN = (f"preset={STRUCTURED}", "phase.structured_latent.enabled=true", "structured_latent.per=sample",
                  "structured_latent.channels=16,64,128", "structured_latent.full_prob=0.25",
                  f"data.val_path={BSDS_VAL}", "data.val_images=2", "data.val_resolution=32")


@pytest.mark.parametrize("workers, extra", [(0, STRUCTURED_RUN), (2, ())], ids=["0-structured", "2"])
def test_resume_is_exact(tmp_path, workers, extra):
    """2N steps in one run == N steps, resume, N more (weights and EMA), with and without worker processes."""
    n = 3
    straight = train(tiny_config(tmp_path / "straight", steps=2 * n, workers=workers, extra=extra))
    train(tiny_config(tmp_path / "split", steps=n, workers=workers, extra=extra))
    assert load_state(latest_checkpoint(tmp_path / "split"))["step"] == n
    resumed = train(load_run_config(tmp_path / "split", [f"steps={2 * n}"]), resume=True)
    assert max_diff(straight / "model.safetensors", resumed / "model.safetensors") <= 1e-6
    assert max_diff(straight / "ema.safetensors", resumed / "ema.safetensors") <= 1e-6
    state = load_state(latest_checkpoint(resumed))
    assert state["step"] == 2 * n and state["data"] == [{"kind": "folder", "position": 2 * n * 2}]
    events = [line.get("event") for line in log_lines(resumed)]
    assert events.count("resume") == 1 and events[-1] == "done"
    # The run dir loads like any checkpoint: the latest (non-EMA) weights, or the EMA on request.
    model = dcae.DCAE.from_pretrained(resumed)
    saved = load_file(str(latest_checkpoint(resumed) / "model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    ema = dcae.DCAE.from_pretrained(resumed, weights="ema")
    assert any(not torch.equal(v, ema.state_dict()[k]) for k, v in model.state_dict().items())
    saved = json.loads((resumed / "config.json").read_text())
    assert saved["steps"] == 2 * n
    if extra:  # the settings travel with the run and its checkpoints; every step logs its mean c'
        assert saved["phase"]["structured_latent"] == {"enabled": True, "channels": [16, 64, 128],
                                                       "channel_step": 16, "per": "sample", "full_prob": 0.25}
        in_checkpoint = json.loads((latest_checkpoint(resumed) / "train_config.json").read_text())
        assert in_checkpoint["phase"]["structured_latent"] == saved["phase"]["structured_latent"]
        straight_lines = log_lines(straight)
        kept = [line["kept_channels"] for line in straight_lines if "loss" in line]
        assert len(kept) == 2 * n and all(16 <= k <= 128 for k in kept)
        assert [line["kept_channels"] for line in log_lines(resumed) if "loss" in line] == kept
        vals = [line for line in straight_lines if line.get("event") == "val"]
        assert vals and all({"val_psnr", "val_psnr_c16", "val_lpips_c16"} <= set(v) for v in vals)
    with pytest.raises(DCAEError, match="already holds"):
        train(tiny_config(tmp_path / "split", steps=1))


def _run_cli_subprocess(args: list[str], env_extra: dict[str, str]) -> subprocess.Popen:
    env = {**os.environ, **env_extra}
    return subprocess.Popen([sys.executable, "-m", "dcae.cli", "train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"training exited early ({process.returncode}):\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the training subprocess")
        time.sleep(0.05)


def _cli_args(run_dir: Path, steps: int, ckpt_every: int) -> list[str]:
    return ["--preset", PRESET, "--data", str(BSDS_VAL), "--phase", "1", "--steps", str(steps), "--batch-size", "2",
            "--resolution", "64", "--seed", "0", "--run-dir", str(run_dir), "data.num_workers=0", "progress=false",
            f"ckpt_every={ckpt_every}", "log_every=1", "phase.lpips_weight=0"]


def test_sigkill_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path):
    run_dir = tmp_path / "run"
    process = _run_cli_subprocess(_cli_args(run_dir, steps=3, ckpt_every=1), {CHECKPOINT_SLEEP_ENV: "2"})
    temp_of_step_2 = run_dir / "checkpoints" / ".tmp_step_00000002"
    _wait_for(lambda: (temp_of_step_2 / "state.pt").exists(), process)  # step 2 written, not yet renamed
    process.send_signal(signal.SIGKILL)
    process.wait()
    latest = latest_checkpoint(run_dir)
    assert latest.name == "step_00000001"
    assert load_state(latest)["step"] == 1
    model = dcae.DCAE.from_pretrained(run_dir)  # the top-level weights are step 1's, complete
    saved = load_file(str(latest / "model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    # And the run continues from there.
    rc = main(["train", "--resume", str(run_dir), "--steps", "2", "progress=false"])
    assert rc == 0 and latest_checkpoint(run_dir).name == "step_00000002"
    assert not temp_of_step_2.exists()  # the stale temp dir was cleaned up


def test_sigterm_checkpoints_then_resume_continues(tmp_path):
    run_dir = tmp_path / "run"
    process = _run_cli_subprocess(_cli_args(run_dir, steps=10_000, ckpt_every=10_000), {})
    _wait_for(lambda: (run_dir / "log.jsonl").exists() and '"step": 2,' in (run_dir / "log.jsonl").read_text(),
              process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 130, output
    assert "stopped by SIGTERM" in output
    step = load_state(latest_checkpoint(run_dir))["step"]
    assert step >= 2
    assert log_lines(run_dir)[-1] == {"event": "stop", "step": step, "reason": "SIGTERM"}
    assert main(["train", "--resume", str(run_dir), "--steps", str(step + 1), "progress=false"]) == 0
    assert load_state(latest_checkpoint(run_dir))["step"] == step + 1


def _nan_on_calls(monkeypatch, bad_calls: set[int]) -> None:
    real_l1, calls = dcae.losses.l1, [0]

    def l1(x, y):
        calls[0] += 1
        out = real_l1(x, y)
        return out * float("nan") if calls[0] in bad_calls else out

    monkeypatch.setattr(dcae.losses, "l1", l1)


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    _nan_on_calls(monkeypatch, {2, 3})
    run_dir = train(tiny_config(tmp_path / "run", steps=5, extra=["phase.lpips_weight=0"]))
    state = load_state(latest_checkpoint(run_dir))
    assert state["counters"]["bad_steps"] == 2 and state["counters"]["bad_in_row"] == 0
    assert [line["step"] for line in log_lines(run_dir) if line.get("event") == "nonfinite"] == [1, 2]
    model = dcae.DCAE.from_pretrained(run_dir)
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())


def test_too_many_nonfinite_steps_stop_without_saving_poison(tmp_path, monkeypatch):
    _nan_on_calls(monkeypatch, set(range(3, 100)))
    config = tiny_config(tmp_path / "run", steps=20, extra=["phase.lpips_weight=0", "ckpt_every=2", "max_bad_steps=3"])
    with pytest.raises(DCAEError, match="3 non-finite losses or gradients in a row"):
        train(config)
    # Steps 2-4 were skipped: the checkpoint at step 4 holds step 2's weights, finite.
    checkpoints = tmp_path / "run" / "checkpoints"
    assert latest_checkpoint(tmp_path / "run").name == "step_00000004"
    assert max_diff(checkpoints / "step_00000002" / "model.safetensors",
                    checkpoints / "step_00000004" / "model.safetensors") == 0.0
    assert max_diff(checkpoints / "step_00000002" / "ema.safetensors",
                    checkpoints / "step_00000004" / "ema.safetensors") == 0.0
    model = dcae.DCAE.from_pretrained(tmp_path / "run")
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())
    poisoned = dcae.create_model(PRESET)
    with torch.no_grad():
        next(poisoned.parameters()).fill_(float("nan"))
    with pytest.raises(DCAEError, match="non-finite"):
        save_checkpoint(tmp_path / "run", 99, poisoned, poisoned, {}, config)
    assert latest_checkpoint(tmp_path / "run").name == "step_00000004"


# ----------------------------------------------------------------------------------------------------------------------
# Structured latent (DC-AE 1.5)
def test_structured_latent_overrides_and_candidates():
    config = apply_overrides(TrainConfig(), ["phase.structured_latent.enabled=true",
                                             "phase.structured_latent.channels=16,32,64,128",
                                             "structured_latent.per=sample", "structured_latent.full_prob=0.1"])
    structured = config.phase.structured_latent
    assert structured == StructuredLatentConfig(True, (16, 32, 64, 128), 16, "sample", 0.1)
    for text, expected in (("[8, 24]", (8, 24)), ("(4,)", (4,)), ("64", (64,)), ("()", ()), ("", ())):
        assert apply_overrides(TrainConfig(), [f"structured_latent.channels={text}"]).phase.structured_latent.channels \
            == expected
    phases = recipe_configs(TrainConfig(), (1, 1, 1), None, ["phase.structured_latent.enabled=true",
                                                            "phase3.structured_latent.full_prob=0.5"])
    assert [c.phase.structured_latent.enabled for c in phases] == [True, True, True]  # every phase of the recipe
    assert [c.phase.structured_latent.full_prob for c in phases] == [0.0, 0.0, 0.5]
    assert TrainConfig().phase.structured_latent.enabled is False  # off unless asked for
    assert candidate_channels(StructuredLatentConfig(), 128) == (16, 32, 48, 64, 80, 96, 112, 128)
    assert candidate_channels(StructuredLatentConfig(channel_step=48), 128) == (48, 96, 128)  # C always a candidate
    assert candidate_channels(StructuredLatentConfig(channels=(64, 16, 64)), 128) == (16, 64)
    for bad in ((0, 16), (16, 129)):
        with pytest.raises(DCAEError, match="outside 1..128"):
            candidate_channels(StructuredLatentConfig(channels=bad), 128)
    for override, message in (("structured_latent.per=image", "choose batch or sample"),
                              ("structured_latent.full_prob=1.5", "from 0 to 1"),
                              ("structured_latent.channel_step=0", "at least 1")):
        with pytest.raises(DCAEError, match=message):
            check_config(apply_overrides(TrainConfig(), [override]))
    with pytest.raises(DCAEError, match="expected int"):
        apply_overrides(TrainConfig(), ["structured_latent.channels=16,many"])


def test_kept_channels_per_batch_and_per_sample():
    candidates = (16, 32, 64, 128)
    per_batch, per_sample = StructuredLatentConfig(enabled=True), StructuredLatentConfig(enabled=True, per="sample")
    steps = [sample_kept_channels(per_batch, candidates, 128, 0, step, 4) for step in range(200)]
    assert all(len(set(k.tolist())) == 1 for k in steps)  # one c' for the whole batch
    assert {int(k[0]) for k in steps} == set(candidates)  # every candidate is drawn, nothing else
    assert all(torch.equal(steps[7], sample_kept_channels(per_batch, candidates, 128, 0, 7, 4)) for _ in range(2))
    assert any(not torch.equal(a, b) for a, b in zip(steps, [sample_kept_channels(per_batch, candidates, 128, 1, s, 4)
                                                            for s in range(200)]))  # the seed matters
    # Ranks: per batch every rank has the global c'; per sample the ranks interleave the global batch's draws.
    for cfg in (per_batch, per_sample):
        single = sample_kept_channels(cfg, candidates, 128, 0, 3, batch_size=8)
        ranks = [sample_kept_channels(cfg, candidates, 128, 0, 3, batch_size=4, rank=r, world_size=2) for r in (0, 1)]
        assert torch.equal(torch.stack(ranks, dim=1).flatten(), single)
    assert len(set(sample_kept_channels(per_sample, candidates, 128, 0, 3, 64).tolist())) > 1  # varies in a batch
    always_full = StructuredLatentConfig(enabled=True, per="sample", full_prob=1.0)
    assert sample_kept_channels(always_full, (16,), 128, 0, 0, 8).tolist() == [128] * 8
    mask = channel_mask(torch.tensor([2, 5]), 5)
    assert mask.shape == (2, 5, 1, 1) and mask.flatten(1).tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_channel_mask_decodes_the_prefix_and_zeroes_the_tail_gradient():
    torch.manual_seed(0)
    model = dcae.create_model(STRUCTURED).eval()  # eval: BatchNorm must not mix the two images' statistics
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    kept = torch.tensor([16, 48])
    y = ChannelMaskedAutoencoder(model)(x, channel_mask(kept, 128))
    with torch.no_grad():
        for i, k in enumerate(kept.tolist()):  # zeroing channels k.. == decoding the k-channel prefix
            prefix = model.decode(model.encode(x[i:i + 1], channels=k))
            torch.testing.assert_close(y[i:i + 1], prefix, atol=1e-5, rtol=1e-4)
    (y - x).abs().mean().backward()
    out_weight, in_weight = model.encoder.project_out.conv.weight, model.decoder.project_in.conv.weight
    assert out_weight.grad[48:].abs().max() == 0 and out_weight.grad[:48].abs().max() > 0
    assert in_weight.grad[:, 48:].abs().max() == 0 and in_weight.grad[:, :48].abs().max() > 0


def test_structured_latent_needs_a_structured_preset(tmp_path, capsys):
    args = ["train", "--data", str(BSDS_VAL), "--phase", "1", "--steps", "1", "--batch-size", "1", "--resolution",
            "32", "--num-workers", "0"]
    overrides = ["progress=false", "phase.structured_latent.enabled=true"]
    assert main([*args, "--preset", PRESET, "--run-dir", str(tmp_path / "a"), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"model '{PRESET}' has no structured latent" in err
    assert "dc-ae-tiny-f32c128-1.5" in err
    assert main([*args, "--preset", STRUCTURED, "--run-dir", str(tmp_path / "b"), *overrides,
                 "structured_latent.channels=16,256"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "256 is outside 1..128" in err


# ----------------------------------------------------------------------------------------------------------------------
def test_cli_phase3_gan_bf16_validation_and_samples(tmp_path, capsys):
    run_dir = tmp_path / "run"
    rc = main(["train", "--preset", PRESET, "--data", str(BSDS_VAL), "--val-data", str(BSDS_VAL), "--phase", "3",
               "--steps", "3", "--batch-size", "2", "--resolution", "64", "--run-dir", str(run_dir),
               "--num-workers", "0", "gan.disc_warmup_steps=1", "precision=bf16", "data.val_images=2",
               "progress=false", "log_every=1", "val_every=2"])
    assert rc == 0
    lines = log_lines(run_dir)
    start = lines[0]
    assert start["event"] == "start" and start["precision"] == "bf16"
    assert start["precision_requested"] == "bf16" and {"cpu_isa", "bf16_native"} <= set(start["hardware"])
    assert start["trainable_params"] < 0.01 * start["total_params"]  # only the decoder head trains
    steps = [line for line in lines if "loss" in line]
    assert steps[0]["gan_weight"] == 0.0 and steps[-1]["gan_weight"] > 0  # discriminator warm-up, then adaptive
    assert all("d_loss" in line and "images_per_s" in line for line in steps)
    vals = [line for line in lines if line.get("event") == "val"]
    assert [v["step"] for v in vals] == [0, 2, 3] and all(v["val_psnr"] > 5 for v in vals)
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        "step_00000000.png", "step_00000002.png", "step_00000003.png"]
    state = load_state(latest_checkpoint(run_dir))
    assert state["discriminator"] is not None and state["disc_optimizer"]["state"]
    # Only the head changed; frozen BatchNorm statistics too stayed put (also across validation passes).
    torch.manual_seed(0)
    init = dcae.create_model(PRESET)
    trained = dcae.DCAE.from_pretrained(run_dir)
    head = {id(p) for p in trained.decoder_head_parameters()}
    for (name, p), q in zip(trained.named_parameters(), init.parameters()):
        assert torch.equal(p, q) != (id(p) in head), name
    for (name, b), c in zip(trained.named_buffers(), init.buffers()):
        assert torch.equal(b, c), name
    assert "done, step 3" in capsys.readouterr().out
    assert not (run_dir / "tensorboard").exists()  # no --tensorboard, no folder


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--preset", PRESET, "--phase", "1", "--run-dir", str(tmp_path / "r")]) == 2
    assert "--data is required" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "missing")]) == 2
    assert "not a training run" in capsys.readouterr().err
    assert main(["train", "--preset", "nope", "--data", str(BSDS_VAL), "--phase", "1",
                 "--run-dir", str(tmp_path / "r"), "progress=false"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["train", "--data", str(BSDS_VAL), "--phase", "2", "optim.lr"]) == 2
    assert main(["train", "--data", str(BSDS_VAL), "--phase", "2", "--print-config", "optim.lr=3e-5"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["phase"]["optim"]["lr"] == 3e-5 and printed["phase"]["trainable"] == "latent_adaptation"


def test_recipe_runs_three_phases_each_from_the_last(tmp_path):
    run_dir = tmp_path / "recipe"
    args = ["train", "--recipe", "three-phase", "--preset", PRESET, "--data", str(BSDS_VAL), "--run-dir", str(run_dir),
            "--phase-steps", "2,1,1", "--batch-size", "1", "--resolution", "32", "--num-workers", "0",
            "progress=false", "phase.lpips_weight=0", "phase3.gan.disc_warmup_steps=0", "phase2.optim.lr=1e-4"]
    assert main(args) == 0
    configs = [json.loads((run_dir / f"phase{k}" / "config.json").read_text()) for k in (1, 2, 3)]
    assert [c["phase"]["resolution"] for c in configs] == [32, 64, 32]
    assert [c["phase"]["trainable"] for c in configs] == ["all", "latent_adaptation", "decoder_head"]
    assert configs[1]["init"] == str(run_dir / "phase1") and configs[2]["init"] == str(run_dir / "phase2")
    assert configs[1]["phase"]["optim"]["lr"] == 1e-4 and configs[0]["phase"]["optim"]["lr"] == 6.4e-5
    assert [load_state(latest_checkpoint(run_dir / f"phase{k}"))["step"] for k in (1, 2, 3)] == [2, 1, 1]
    final = load_file(str(run_dir / "model.safetensors"))
    phase3 = load_file(str(run_dir / "phase3" / "model.safetensors"))
    phase1 = load_file(str(run_dir / "phase1" / "model.safetensors"))
    assert all(torch.equal(final[k], phase3[k]) for k in final)
    # phase 2 only moved the latent-adjacent layers, phase 3 only the head: the early encoder is phase 1's
    assert torch.equal(final["encoder.project_in.conv.weight"], phase1["encoder.project_in.conv.weight"])
    assert not torch.equal(final["encoder.project_out.conv.weight"], phase1["encoder.project_out.conv.weight"])
    dcae.DCAE.from_pretrained(run_dir)
    # Resuming a finished recipe with more phase-3 steps trains only phase 3.
    assert main(["train", "--recipe", "three-phase", "--resume", str(run_dir), "--phase-steps", "2,1,2",
                 "progress=false"]) == 0
    assert [load_state(latest_checkpoint(run_dir / f"phase{k}"))["step"] for k in (1, 2, 3)] == [2, 1, 2]


def test_training_on_tar_shards(tmp_path):
    import tarfile

    shards = tmp_path / "shards"
    shards.mkdir()
    files = sorted(BSDS_VAL.glob("*.jpg"))[:6]
    for s in range(2):
        with tarfile.open(shards / f"train-{s:03d}.tar", "w") as tar:
            for i, path in enumerate(files[3 * s:3 * s + 3]):
                tar.add(path, arcname=f"{s}_{i:03d}.jpg")
    run_dir = train(tiny_config(tmp_path / "run", steps=2, extra=[f"data.path={shards}", "phase.lpips_weight=0"]))
    state = load_state(latest_checkpoint(run_dir))
    assert state["data"][0]["kind"] == "shards" and state["step"] == 2
    assert log_lines(run_dir)[0]["data"] == "shards"


def tensorboard_scalars(log_dir: Path) -> tuple[dict[str, dict[int, float]], list[str]]:
    """{tag: {step: value}} and the image tags of the event files under `log_dir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    return scalars, events.Tags()["images"]


def test_cli_tensorboard_mirrors_log_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "tb"  # (test_cli_phase3_gan_bf16_validation_and_samples checks: no flag, no folder)
    assert main(["train", "--preset", PRESET, "--data", str(BSDS_VAL), "--val-data", str(BSDS_VAL), "--phase", "1",
                 "--steps", "2", "--batch-size", "2", "--resolution", "64", "--num-workers", "0", "data.val_images=2",
                 "data.val_resolution=32", "lpips_weight=0", "progress=false", "log_every=1", "--run-dir", str(run_dir),
                 "--tensorboard"]) == 0
    assert load_run_config(run_dir).tensorboard
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    scalars, images = tensorboard_scalars(run_dir / "tensorboard")
    lines = log_lines(run_dir)
    steps = [line for line in lines if "loss" in line]
    assert [line["step"] for line in steps] == [1, 2]
    for line in steps:
        assert scalars["train/loss"][line["step"]] == pytest.approx(line["loss"], rel=1e-6)
        assert scalars["train/lr"][line["step"]] == pytest.approx(line["lr"], rel=1e-6)
    vals = {line["step"]: line for line in lines if line.get("event") == "val"}
    assert sorted(scalars["val/val_psnr"]) == sorted(vals) == [0, 2]
    assert scalars["val/val_psnr"][2] == pytest.approx(vals[2]["val_psnr"], rel=1e-6)
    assert "train/event" not in scalars and "val/samples" in images


def test_optimizer_state_of_other_shapes_is_one_error():
    from dcae.runs import build_optimizer, load_optimizer_state

    def adamw(*shapes):
        params = [torch.nn.Parameter(torch.ones(s)) for s in shapes]
        optimizer = build_optimizer(params, OptimConfig(lr=0.1, warmup_steps=0))
        sum(p.sum() for p in params).backward()
        optimizer.step()
        return optimizer

    saved = adamw((3, 4), (4,)).state_dict()
    load_optimizer_state(adamw((3, 4), (4,)), saved, "run/state.pt")  # the same model loads
    with pytest.raises(DCAEError, match=r"run/state.pt: optimizer state does not fit this model \(state 'exp_avg' "
                                        r"has shape \(3, 4\), its parameter \(4, 3\)\)"):
        load_optimizer_state(adamw((4, 3), (4,)), saved, "run/state.pt")
    with pytest.raises(DCAEError, match="run/state.pt: optimizer state does not fit this model"):
        load_optimizer_state(adamw((3, 4), (4,), (2,)), saved, "run/state.pt")  # another group size


@pytest.mark.parametrize("override,message", [
    ("phase.gan.disc_lr=-1", "phase.gan.disc_lr=-1"), ("phase.gan.ndf=48", "multiple of 32"),
    ("phase.gan.n_layers=0", "phase.gan.n_layers=0"), ("phase.gan.loss=wgan", "phase.gan.loss='wgan'"),
    ("phase.gan.weight=nan", "phase.gan.weight=nan"), ("phase.gan.disc_warmup_steps=-2", "disc_warmup_steps=-2")])
def test_gan_fields_are_range_checked(override, message):
    check_config(TrainConfig())
    with pytest.raises(DCAEError, match=message):
        check_config(apply_overrides(TrainConfig(), [override]))
