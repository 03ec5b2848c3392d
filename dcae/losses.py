"""Autoencoder training losses: L1 + LPIPS reconstruction, PatchGAN discriminator, hinge / non-saturating GAN losses.

Pure functions after taming-transformers' `vqperceptual.py` (Esser et al. 2021); two modules own state and return
`(loss, logs)`: `ReconstructionLoss` (holds the frozen LPIPS network) and `GANLoss` (holds the discriminator).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over all elements."""
    return (x - y).abs().mean()


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements (the loss that PSNR measures)."""
    return (x - y).square().mean()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss (Lim & Ye 2017): push real logits above +1 and fake logits below -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss: raise the discriminator's logits on reconstructions."""
    return -logits_fake.mean()


def non_saturating_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator loss of the original GAN (Goodfellow et al. 2014), in logits."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def non_saturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: -log sigmoid(D(fake))."""
    return F.softplus(-logits_fake).mean()


def adopt_weight(weight: float, step: int, threshold: int = 0, value: float = 0.0) -> float:
    """`weight` from step `threshold` on, `value` before it (warm-up switch)."""
    return value if step < threshold else weight


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4) -> torch.Tensor:
    """taming's calculate_adaptive_weight: ||grad rec|| / ||grad gan|| at the last decoder layer, detached.

    Balances the GAN gradient against the reconstruction gradient where both enter the decoder's output layer.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


GAN_LOSSES = {"hinge": (hinge_d_loss, hinge_g_loss), "non-saturating": (non_saturating_d_loss, non_saturating_g_loss)}


class PatchGANDiscriminator(nn.Module):
    """pix2pix / taming NLayerDiscriminator: a 70x70-receptive-field PatchGAN returning (B, 1, h, w) logits.

    norm="group" (default) uses GroupNorm(32) instead of pix2pix's BatchNorm: the logits of a sample do not depend on
    the rest of its batch, so real and fake batches scored separately, batches of 1-2 images on a CPU, and DDP ranks
    (no cross-rank statistics) all behave the same, and there are no running statistics to track.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "group"):
        super().__init__()
        if norm not in ("group", "batch"):
            raise ValueError(f"discriminator norm must be 'group' or 'batch', got {norm!r}")

        def norm_layer(channels: int) -> nn.Module:
            return nn.GroupNorm(32, channels) if norm == "group" else nn.BatchNorm2d(channels)

        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):  # stride 2 for all but the last of these
            prev, mult = mult, min(2 ** n, 8)
            stride = 1 if n == n_layers else 2
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                       norm_layer(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (B, 3, H, W) -> (B, 1, H/8 - 2, W/8 - 2) for n_layers=3


def _init_weights(module: nn.Module) -> None:
    """pix2pix init: N(0, 0.02) convs, N(1, 0.02) norm scales."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class ReconstructionLoss(nn.Module):
    """l1_weight * L1 + mse_weight * MSE + lpips_weight * LPIPS; forward(x, y) -> (loss, logs).

    LPIPS is built only when its weight > 0; MSE is logged only when its weight > 0.
    """

    def __init__(self, l1_weight: float = 1.0, lpips_weight: float = 1.0, perceptual: nn.Module | None = None,
                 mse_weight: float = 0.0):
        super().__init__()
        self.l1_weight, self.lpips_weight, self.mse_weight = l1_weight, lpips_weight, mse_weight
        if perceptual is None and lpips_weight > 0:
            from dcae.perceptual import LPIPS

            perceptual = LPIPS(net="alex")
        self.perceptual = perceptual

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """x: inputs, y: reconstructions, both (B, 3, H, W) in [-1, 1]."""
        rec_l1 = l1(y.float(), x.float())
        loss, logs = self.l1_weight * rec_l1, {"l1": rec_l1.detach()}
        if self.mse_weight > 0:
            rec_mse = mse(y.float(), x.float())
            loss = loss + self.mse_weight * rec_mse
            logs["mse"] = rec_mse.detach()
        if self.lpips_weight > 0:
            rec_lpips = self.perceptual(y.float(), x.float()).mean()
            loss = loss + self.lpips_weight * rec_lpips
            logs["lpips"] = rec_lpips.detach()
        logs["rec_loss"] = loss.detach()
        return loss, logs


@dataclass
class GANConfig:
    weight: float = 0.5  # GAN term = weight * (adaptive weight or 1) * generator loss
    adaptive: bool = True  # scale by ||grad rec|| / ||grad gan|| at the decoder's last layer (taming)
    loss: str = "hinge"  # "hinge" or "non-saturating"
    disc_warmup_steps: int = 0  # the discriminator trains alone this many steps before the generator sees it
    disc_lr: float | None = None  # None: the phase's learning rate
    ndf: int = 64
    n_layers: int = 3
    norm: str = "group"  # see PatchGANDiscriminator


class GANLoss(nn.Module):
    """Owns the PatchGAN discriminator; `generator_loss` and `discriminator_loss` each return (loss, logs)."""

    def __init__(self, cfg: GANConfig):
        super().__init__()
        if cfg.loss not in GAN_LOSSES:
            raise ValueError(f"unknown GAN loss {cfg.loss!r}; choose from {', '.join(GAN_LOSSES)}")
        self.cfg = cfg
        self.discriminator = PatchGANDiscriminator(ndf=cfg.ndf, n_layers=cfg.n_layers, norm=cfg.norm)
        self.d_loss_fn, self.g_loss_fn = GAN_LOSSES[cfg.loss]

    def generator_loss(self, reconstruction: torch.Tensor, rec_loss: torch.Tensor, step: int,
                       last_layer: torch.Tensor | None = None, discriminator: nn.Module | None = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted GAN term for the autoencoder (zero during the discriminator warm-up)."""
        factor = adopt_weight(1.0, step, self.cfg.disc_warmup_steps)
        if factor == 0.0:
            zero = reconstruction.new_zeros(())
            return zero, {"g_loss": zero, "gan_weight": zero}
        disc = discriminator or self.discriminator  # a DDP wrapper of self.discriminator, when distributed
        g_loss = self.g_loss_fn(disc(reconstruction.float()))
        if self.cfg.adaptive and last_layer is not None and torch.is_grad_enabled():
            weight = adaptive_gan_weight(rec_loss, g_loss, last_layer) * self.cfg.weight
        else:
            weight = torch.tensor(self.cfg.weight, device=g_loss.device)
        return weight * factor * g_loss, {"g_loss": g_loss.detach(), "gan_weight": weight}

    def discriminator_loss(self, real: torch.Tensor, reconstruction: torch.Tensor,
                           discriminator: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The discriminator's loss on real images and detached reconstructions."""
        disc = discriminator or self.discriminator
        # One pass over [real; fake]: a single forward per backward keeps DDP simple (GroupNorm: same as two passes).
        logits = disc(torch.cat([real.detach(), reconstruction.detach()]).float())  # (2B, 1, h, w)
        logits_real, logits_fake = logits.chunk(2)
        d_loss = self.d_loss_fn(logits_real, logits_fake)
        return d_loss, {"d_loss": d_loss.detach(), "logits_real": logits_real.detach().mean(),
                        "logits_fake": logits_fake.detach().mean()}
