"""Augmented diffusion training's prefix loss: the formula by hand, what masking hides, draws, config checks."""
from __future__ import annotations

import argparse
import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from dcae.commands import train_diffusion as train_command
from dcae.commands.sample import check_decodes
from dcae.diffusion.augment import Augment, augmented_loss, prefix_sizes, step_loss
from dcae.diffusion.objectives import EpsilonPrediction, FlowMatching, get_objective
from dcae.diffusion.presets import get_diffusion_config
from dcae.diffusion.train import TrainDiffusionConfig, apply_overrides, check_config
from dcae.errors import DCAEError

pytestmark = pytest.mark.usefixtures("one_thread")


class MixNet(nn.Module):
    """A net that mixes channels (so a prediction on channel 0 sees channel 5) and uses t and y; records batch sizes."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, channels, generator=torch.Generator().manual_seed(1)))
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.batches.append(len(x))
        return torch.einsum("oc,bchw->bohw", self.weight, x) + (t / 1000 + y).view(-1, 1, 1, 1)


def by_hand(objective: str, net: MixNet, x0, t, noise, k, mask_input: bool, y) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_full, L_prefix) written out sample by sample, independent of dcae's helpers."""
    if objective == "flow":
        tt = t.view(-1, 1, 1, 1)
        x_t, time, target = (1 - tt) * x0 + tt * noise, 1000 * t, noise - x0
    else:
        abar = EpsilonPrediction().alphas_cumprod.float()[t].view(-1, 1, 1, 1)
        x_t, time, target = abar.sqrt() * x0 + (1 - abar).sqrt() * noise, t.float(), noise
    full = ((net(x_t, time, y) - target) ** 2).mean()
    x0_prefix, x_in = x0.clone(), x_t.clone()
    for b, kb in enumerate(k.tolist()):
        x0_prefix[b, kb:] = 0  # the clean latent's channels >= k ...
        if mask_input:
            x_in[b, kb:] = 0  # ... and the noisy input's
    if objective == "flow":  # targets of the prefix view (equal to the full ones on channels < k)
        target = noise - x0_prefix
    pred = net(x_in, time, y)
    per_sample = [((pred[b, :kb] - target[b, :kb]) ** 2).sum() / (kb * 4 * 4) for b, kb in enumerate(k.tolist())]
    return full, torch.stack(per_sample).mean()


@pytest.mark.parametrize("mask_input", [True, False])
@pytest.mark.parametrize("objective", ["flow", "eps"])
def test_prefix_loss_is_the_formula(objective, mask_input):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 6, 4, 4, generator=gen)
    k, y = torch.tensor([1, 3, 5, 2]), torch.tensor([0.0, 1.0, 2.0, 1.0])
    obj = get_objective(objective)
    t, noise = obj.draw(x0, gen)
    net = MixNet(6)
    full, prefix = augmented_loss(obj, net, x0, t, noise, k, mask_input, y=y)
    assert net.batches == ([8] if mask_input else [4])  # masked: the prefix view rides along; loss-only: one pass
    want_full, want_prefix = by_hand(objective, net, x0, t, noise, k, mask_input, y)
    assert torch.allclose(full, want_full, rtol=1e-5) and torch.allclose(prefix, want_prefix, rtol=1e-5)

    # What the masked prefix pass must not see: the clean latent's channels >= k. Without masking it does see them.
    changed = x0.clone()
    for b, kb in enumerate(k.tolist()):
        changed[b, kb:] = torch.randn(6 - kb, 4, 4, generator=gen) * 10
    full_2, prefix_2 = augmented_loss(obj, net, changed, t, noise, k, mask_input, y=y)
    assert not torch.allclose(full_2, full)
    assert torch.allclose(prefix_2, prefix, rtol=1e-6, atol=0) == mask_input


def test_step_loss_draws_and_adds():
    net = MixNet(3)
    x0, y = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(2)), torch.zeros(4)
    for objective in (FlowMatching(), EpsilonPrediction()):
        plain, logs = step_loss(objective, net, x0, torch.Generator().manual_seed(5), None, y=y)
        assert logs == {} and torch.equal(plain, objective.loss(net, x0, torch.Generator().manual_seed(5), y=y))
        gen = torch.Generator().manual_seed(5)
        loss, logs = step_loss(objective, net, x0, gen, Augment(0.25, (1, 2), True), y=y)
        assert torch.allclose(loss, logs["loss_full"] + 0.25 * logs["loss_prefix"])
        # Same times and noise as the plain loss (drawn first), so L_full is today's loss at the same draws.
        assert torch.allclose(logs["loss_full"], plain, rtol=1e-6)


def test_prefix_sizes_default_and_checks():
    assert prefix_sizes((), 128) == (16, 32, 48, 64, 80, 96, 112) and prefix_sizes((), 32) == (16,)
    assert prefix_sizes((4, 2), 8) == (4, 2)
    for candidates, channels, message in [((), 16, "no multiple of 16"), ((), 1, "2 or more channels"),
                                          ((0,), 8, "not a prefix size"), ((8,), 8, "1 to 7"),
                                          ((2, 2), 8, "listed twice"), ((1.5,), 8, "not a prefix size")]:
        with pytest.raises(DCAEError, match=message):
            prefix_sizes(candidates, channels)


INDEX = {"latent_shape": [8, 4, 4], "num_classes": 0, "autoencoder": {"name": "ae", "structured_latent": True}}


@pytest.mark.parametrize("changes, message", [
    ({"augment_weight": -0.1}, "augment_weight=-0.1: expected a number >= 0"),
    ({"augment_weight": float("nan")}, "augment_weight=nan"),
    ({"augment_weight": 1.0, "augment_channels": (8,)}, "not a prefix size of the 8-channel latent"),
    ({"augment_channels": (0,)}, "not a prefix size"),  # checked even while the weight is 0
    ({"augment_weight": 1.0, "augment_mask_input": "yes"}, "augment_mask_input='yes'"),
    ({"latent_channels": 9}, "latent_channels=9: expected an integer from 1 to 8"),
    ({"latent_channels": 0}, "latent_channels=0"),
    ({"latent_channels": 4, "augment_weight": 1.0, "augment_channels": (4,)}, "not a prefix size of latent_channels=4"),
    ({"latent_channels": 1, "augment_weight": 1.0}, "needs a latent of 2 or more channels"),
    ({"latent_channels": 4, "augment_weight": 1.0}, "no multiple of 16"),
])
def test_config_checks(changes, message):
    shape = changes.get("latent_channels") or 8
    model = get_diffusion_config("DiT-T/1", in_channels=shape if 1 <= shape <= 8 else 8, input_size=4, num_classes=0)
    config = dataclasses.replace(TrainDiffusionConfig(model=model), **changes)
    with pytest.raises(DCAEError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_config(config, INDEX, world_size=1)


def test_prefix_of_an_unstructured_cache_is_refused():
    index = {**INDEX, "autoencoder": {"name": "plain-ae", "structured_latent": False}}
    model = get_diffusion_config("DiT-T/1", in_channels=4, input_size=4, num_classes=0)
    with pytest.raises(DCAEError, match="'plain-ae' has no structured latent"):
        check_config(TrainDiffusionConfig(model=model, latent_channels=4), index, world_size=1)
    check_config(TrainDiffusionConfig(model=dataclasses.replace(model, in_channels=8), latent_channels=8), index, 1)


def test_flags_and_overrides_reach_the_config(tmp_path):
    parser = argparse.ArgumentParser()
    train_command.add_arguments(parser)
    args = parser.parse_args(["--resume", str(tmp_path), "--augment-weight", "0.5", "--augment-channels", "16", "32",
                              "--no-augment-mask-input", "--latent-channels", "64"])
    settings = {key: getattr(args, flag) for flag, key in train_command.FLAGS.items()
                if getattr(args, flag) is not None}
    assert settings == {"augment_weight": 0.5, "augment_channels": [16, 32], "augment_mask_input": False,
                        "latent_channels": 64}
    config = apply_overrides(TrainDiffusionConfig(), ["augment_channels=16,32,64", "latent_channels=64",
                                                      "augment_mask_input=false", "augment_weight=1"])
    assert (config.augment_channels, config.latent_channels, config.augment_mask_input, config.augment_weight) == \
           ((16, 32, 64), 64, False, 1.0)
    assert apply_overrides(config, ["augment_channels=()", "latent_channels=none"]).augment_channels == ()


def test_sample_refuses_an_autoencoder_that_cannot_decode_the_prefix():
    info = {"latent_shape": [32, 2, 2], "cache_latent_shape": [128, 2, 2], "autoencoder": {"name": "ae-1.5"}}

    def ae(channels: int, structured: bool) -> SimpleNamespace:
        return SimpleNamespace(latent_channels=channels, config=SimpleNamespace(structured_latent=structured))

    check_decodes(ae(128, True), "ae-1.5", info)
    with pytest.raises(DCAEError, match="no structured latent"):
        check_decodes(ae(128, False), "ae-1.1", info)
    with pytest.raises(DCAEError, match="has 32 latent channels.*the first 32 channels of 128-channel"):
        check_decodes(ae(32, True), "small", info)
    plain = {"latent_shape": [32, 2, 2], "autoencoder": {"name": "f32c32"}}  # a checkpoint from before the field
    check_decodes(ae(32, False), "f32c32", plain)
    with pytest.raises(DCAEError, match="has 128 latent channels"):
        check_decodes(ae(128, True), "ae-1.5", plain)
