"""Augmented diffusion training on a structured latent (after DC-AE 1.5, arXiv 2508.00413): a prefix loss.

A structured-latent autoencoder puts object structure in its first channels and detail in later ones, and any prefix
of k channels decodes. The prefix loss trains the diffusion model on those object channels alone, beside the usual
loss on all C channels:

    loss = L_full + weight * L_prefix
    L_full   = mean over (b, c, h, w) of (pred - target)^2                       (the objective's loss, unchanged)
    L_prefix = mean over b of [ sum over c < k_b, h, w of (pred'_b - target_b)^2 / (k_b H W) ]

k_b is drawn per sample from the candidate sizes; pred' is the net's output on the prefix view of the same sample, at
the same time and noise: its clean channels >= k_b set to 0 and its noisy input's channels >= k_b set to 0
(`mask_input`), so the net learns to denoise the first k channels with nothing behind them, which is what sampling a
k-channel prefix asks of it. Without `mask_input` pred' = pred: a loss-only reweighting of the front channels that
costs no extra forward pass. The paper's exact formulation was not available to us; docs/augmented_diffusion.md says
what is ours and why.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dcae.diffusion.objectives import EpsilonPrediction, FlowMatching, Net
from dcae.errors import DCAEError

PREFIX_STEP = 16  # default candidates: every multiple of 16 below C (c128 -> 16, 32, ..., 112)


@dataclass(frozen=True)
class Augment:
    """The resolved prefix objective of a training run."""

    weight: float  # lambda, > 0
    sizes: tuple[int, ...]  # candidate prefix sizes k, each in 1..C-1
    mask_input: bool  # True: a second, masked pass; False: reweight the full pass's front channels


def prefix_sizes(candidates: tuple[int, ...], channels: int, where: str = "") -> tuple[int, ...]:
    """The candidate prefix sizes of a `channels`-channel latent: `candidates` checked, or every multiple of 16 below
    it when empty. `where` names the latent in errors (e.g. "latent_channels=32")."""
    where = where or f"the {channels}-channel latent"
    if channels < 2:
        raise DCAEError(f"augment_weight > 0 needs a latent of 2 or more channels; {where} has {channels}")
    sizes = tuple(candidates) or tuple(range(PREFIX_STEP, channels, PREFIX_STEP))
    if not sizes:
        raise DCAEError(f"augment_channels: {where} has no multiple of {PREFIX_STEP} below {channels}; "
                        f"list the prefix sizes (e.g. --augment-channels {channels // 2})")
    for k in sizes:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < channels:
            raise DCAEError(f"augment_channels: {k!r} is not a prefix size of {where} (integers 1 to {channels - 1})")
    if len(set(sizes)) != len(sizes):
        raise DCAEError(f"augment_channels={sizes}: a size is listed twice")
    return sizes


def draw_prefix_sizes(sizes: tuple[int, ...], batch: int, generator: torch.Generator | None,
                      device: torch.device) -> torch.Tensor:
    """One k per sample, uniform over `sizes`: (batch,) int64."""
    choice = torch.randint(len(sizes), (batch,), device=device, generator=generator)
    return torch.tensor(sizes, dtype=torch.int64, device=device)[choice]


def prefix_mask(k: torch.Tensor, channels: int) -> torch.Tensor:
    """(B,) prefix sizes -> (B, C, 1, 1) bool, True on each sample's channels c < k."""
    return (torch.arange(channels, device=k.device) < k[:, None])[:, :, None, None]


def prefix_mse(pred: torch.Tensor, target: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Squared error over each sample's first k channels, averaged over its k*H*W elements, then over the batch."""
    squared = (pred.float() - target.float()).square()  # (B, C, H, W)
    squared = torch.where(prefix_mask(k, pred.shape[1]), squared, 0.0)
    return (squared.sum(dim=(1, 2, 3)) / (k * pred.shape[2] * pred.shape[3])).mean()


def augmented_loss(objective: FlowMatching | EpsilonPrediction, net: Net, x0: torch.Tensor, t: torch.Tensor,
                   noise: torch.Tensor, k: torch.Tensor, mask_input: bool = True, **extra: Any
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_full, L_prefix) of one batch at times t and noise, prefix sizes k (B,): see the module docstring.

    With mask_input the full batch and its prefix view go through the net as one batch of 2B (one forward call, so
    one DDP reduction; the cost is that of a second forward and backward). Without it the net runs once.
    """
    x_t, time, target = objective.pair(x0, t, noise)  # (B, C, H, W), (B,), (B, C, H, W)
    if not mask_input:
        pred = net(x_t, time, **extra)
        return F.mse_loss(pred.float(), target.float()), prefix_mse(pred, target, k)
    # Channel c of x_t depends on channel c of x0 and of the noise alone: zeroing the clean channels >= k and then the
    # noisy input's channels >= k gives x_t * mask, and the targets of the scored channels c < k do not change.
    masked = x_t * prefix_mask(k, x_t.shape[1]).to(x_t.dtype)
    both = {name: torch.cat([value, value]) for name, value in extra.items()}
    pred, pred_prefix = net(torch.cat([x_t, masked]), torch.cat([time, time]), **both).chunk(2)  # (B, C, H, W) each
    return F.mse_loss(pred.float(), target.float()), prefix_mse(pred_prefix, target, k)


def step_loss(objective: FlowMatching | EpsilonPrediction, net: Net, x0: torch.Tensor,
              generator: torch.Generator | None, augment: Augment | None, **extra: Any
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss to minimise and its parts to log: the objective's own loss when `augment` is None (the same draws,
    so runs without augmentation are unchanged), else L_full + weight L_prefix with times, noise, then k drawn."""
    if augment is None:
        return objective.loss(net, x0, generator=generator, **extra), {}
    t, noise = objective.draw(x0, generator)
    k = draw_prefix_sizes(augment.sizes, x0.shape[0], generator, x0.device)
    full, prefix = augmented_loss(objective, net, x0, t, noise, k, augment.mask_input, **extra)
    return full + augment.weight * prefix, {"loss_full": full, "loss_prefix": prefix}
