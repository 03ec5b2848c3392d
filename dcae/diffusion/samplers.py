"""Samplers with one signature, k-diffusion style: `sampler(model, x, sigmas, extra_args, callback, disable) -> x0`.

`model` is a denoiser `D(x, sigma, **extra_args) -> x0 estimate` (see `objectives.py`): every sampler integrates
dx/dsigma = (x - D(x, sigma)) / sigma from sigmas[0] to sigmas[-1] = 0. For the flow objective sigma is the flow time
t and x the path point itself; for the eps objective sigma and x are DDPM's variance-exploding view.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from dcae.diffusion.objectives import Denoiser, EpsilonPrediction, FlowMatching, Net, classifier_free_guidance

Callback = Callable[[dict[str, Any]], None]


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The ODE's derivative dx/dsigma = (x - D) / sigma."""
    return (x - denoised) / sigma


@torch.no_grad()
def sample_euler(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                 callback: Callback | None = None, disable: bool = True) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, arXiv 2206.00364, Alg. 1 without churn)."""
    extra_args = extra_args or {}
    sigmas = sigmas.to(x.device, x.dtype)
    s_in = x.new_ones(x.shape[0])
    for i in tqdm(range(len(sigmas) - 1), disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_heun(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                callback: Callback | None = None, disable: bool = True) -> torch.Tensor:
    """Heun's 2nd-order method, an Euler step at the last (sigma -> 0) step (Karras et al. 2022, Alg. 1)."""
    extra_args = extra_args or {}
    sigmas = sigmas.to(x.device, x.dtype)
    s_in = x.new_ones(x.shape[0])
    for i in tqdm(range(len(sigmas) - 1), disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_euler = x + d * dt
            d_next = to_d(x_euler, sigmas[i + 1], model(x_euler, sigmas[i + 1] * s_in, **extra_args))
            x = x + (d + d_next) / 2 * dt
    return x


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a step to sigma_to into a deterministic part to sigma_down and fresh noise sigma_up (k-diffusion).

    In the variance-exploding view, eta = 1 is DDPM's posterior noise and eta scales it as DDIM's eta does.
    """
    if eta == 0 or sigma_to == 0:
        return sigma_to, sigma_to * 0
    sigma_up = eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5
    sigma_up = torch.minimum(sigma_to, sigma_up)
    return (sigma_to ** 2 - sigma_up ** 2) ** 0.5, sigma_up


@torch.no_grad()
def sample_ddim(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                callback: Callback | None = None, disable: bool = True, eta: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, arXiv 2010.02502): x' = x0_hat + sigma' eps_hat (+ eta-scaled fresh noise).

    With eta = 0 this is the same update as Euler's method in the variance-exploding view (Karras et al. 2022).
    """
    extra_args = extra_args or {}
    sigmas = sigmas.to(x.device, x.dtype)
    s_in = x.new_ones(x.shape[0])
    for i in tqdm(range(len(sigmas) - 1), disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        eps_hat = (x - denoised) / sigmas[i]
        x = denoised + sigma_down * eps_hat
        if sigma_up > 0:
            x = x + sigma_up * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                    callback: Callback | None = None, disable: bool = True) -> torch.Tensor:
    """DPM-Solver++(2M), multistep 2nd order in log-SNR (Lu et al. 2022, arXiv 2211.01095, Alg. 2)."""
    extra_args = extra_args or {}
    sigmas = sigmas.to(x.device, x.dtype)
    s_in = x.new_ones(x.shape[0])
    old_denoised = None
    for i in tqdm(range(len(sigmas) - 1), disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] == 0:
            x = denoised  # the limit of the update as sigma' -> 0
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()  # step in lambda = -log sigma
            estimate = denoised
            if old_denoised is not None:  # second order from the previous step's data prediction
                r = (sigmas[i - 1].log() - sigmas[i].log()) / h
                estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * estimate
        old_denoised = denoised
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
}


def generate(net: Net, objective: FlowMatching | EpsilonPrediction, noise: torch.Tensor,
             labels: torch.Tensor | None = None, cfg_scale: float = 1.0, null_class: int | None = None,
             sampler: str | None = None, steps: int | None = None, progress: bool = False) -> torch.Tensor:
    """Standard-normal noise (B, C, H, W) -> sampled latents (B, C, H, W) in the net's (scaled) latent space.

    Classifier-free guidance runs when cfg_scale != 1 (needs labels and the null class); labels equal to the null
    class give unconditional samples.
    """
    sampler = sampler or objective.default_sampler
    if sampler not in objective.samplers:
        raise ValueError(f"sampler {sampler!r} does not fit the {objective.name} objective; "
                         f"choose from {', '.join(objective.samplers)}")
    if cfg_scale != 1.0:
        if labels is None or null_class is None:
            raise ValueError("classifier-free guidance needs a class-conditional model and labels")
        net = classifier_free_guidance(net, cfg_scale, null_class)
    sigmas = objective.sigmas(steps or objective.default_steps)
    x = objective.prior(noise, float(sigmas[0]))
    extra_args = {"y": labels} if labels is not None else {}
    return SAMPLERS[sampler](objective.denoiser(net), x, sigmas, extra_args=extra_args, disable=not progress)
