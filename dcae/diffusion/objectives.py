"""Training objectives and their denoisers: flow matching (velocity) and DDPM epsilon prediction.

Conventions (shared with `samplers.py`, in the style of k-diffusion):
- A *net* is `net(x, t, **extra) -> prediction` with x (B, C, H, W) and t (B,) a time in [0, 1000].
- A *denoiser* is `D(x, sigma, **extra) -> estimate of the clean x0`, with x and sigma in the objective's own
  coordinates, chosen so that in both the sampling ODE reads dx/dsigma = (x - D(x, sigma)) / sigma.
  * flow: sigma = t in [0, 1] and x = x_t = (1 - t) x0 + t eps itself (SiT's linear path: t = 0 data, t = 1 noise);
    the net predicts the velocity v = dx_t/dt = eps - x0, so D = x - t v.
  * eps: the variance-exploding view of DDPM: sigma = sqrt((1 - abar) / abar) and x = x_vp / sqrt(abar) = x0 + sigma eps;
    the net sees x_vp = x / sqrt(1 + sigma^2) and the (interpolated) DDPM timestep, predicts eps, so D = x - sigma eps.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

Net = Callable[..., torch.Tensor]
Denoiser = Callable[..., torch.Tensor]

TIME_SCALE = 1000.0  # flow time t in [0, 1] reaches the net as 1000 t, the same range as DDPM timesteps


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) in like's dtype, to broadcast over (B, C, H, W)."""
    return v.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


Pair = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (net input x_t, net time, regression target)


def flow_matching_pair(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> Pair:
    """The linear path's training pair: x_t = (1-t) x0 + t noise at net time 1000 t, target velocity noise - x0."""
    tt = _per_sample(t, x0)
    return (1 - tt) * x0 + tt * noise, t * TIME_SCALE, noise - x0


def flow_matching_loss(net: Net, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, **extra: Any) -> torch.Tensor:
    """SiT / rectified-flow loss (Ma et al. 2024): mean ||net(x_t, 1000 t) - (noise - x0)||^2, x_t = (1-t) x0 + t noise."""
    x_t, time, target = flow_matching_pair(x0, t, noise)
    return F.mse_loss(net(x_t, time, **extra).float(), target.float())


def epsilon_pair(x0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> Pair:
    """DDPM's training pair: x_t = sqrt(abar) x0 + sqrt(1-abar) noise at the timestep itself, target the noise."""
    abar = _per_sample(alphas_cumprod.to(x0.device)[timesteps], x0)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise, timesteps.to(x0.dtype), noise


def epsilon_loss(net: Net, x0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor,
                 alphas_cumprod: torch.Tensor, **extra: Any) -> torch.Tensor:
    """DDPM's simple loss (Ho et al. 2020): mean ||net(x_t, t) - noise||^2, x_t = sqrt(abar) x0 + sqrt(1-abar) noise."""
    x_t, time, target = epsilon_pair(x0, timesteps, noise, alphas_cumprod)
    return F.mse_loss(net(x_t, time, **extra).float(), target.float())


def scaled_linear_betas(beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = 1000) -> torch.Tensor:
    """Stable Diffusion's schedule (also U-ViT's and DC-AE's): betas linear in sqrt, float64 (steps,)."""
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2


def classifier_free_guidance(net: Net, scale: float, null_class: int) -> Net:
    """Classifier-free guidance (Ho & Salimans 2022): uncond + scale (cond - uncond), both halves in one batch.

    Guidance mixes the net's raw prediction; since D is affine in it for both objectives, this equals guiding D.
    """
    def guided(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **extra: Any) -> torch.Tensor:
        out = net(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, torch.full_like(y, null_class)]), **extra)
        cond, uncond = out.chunk(2)
        return uncond + scale * (cond - uncond)

    return guided


class FlowMatching:
    """Linear-path flow matching with velocity prediction (SiT; Liu et al. 2023 rectified flow; Lipman et al. 2023)."""

    name = "flow"
    samplers = ("euler", "heun")
    default_sampler = "heun"
    default_steps = 25  # Heun: 49 net evaluations

    def draw(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch's (times (B,), noise like x0), drawn in this order from `generator`."""
        t = torch.rand(x0.shape[0], device=x0.device, generator=generator)  # uniform time, as SiT
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        return t, noise

    def pair(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> Pair:
        return flow_matching_pair(x0, t, noise)

    def loss(self, net: Net, x0: torch.Tensor, generator: torch.Generator | None = None, **extra: Any) -> torch.Tensor:
        t, noise = self.draw(x0, generator)
        return flow_matching_loss(net, x0, t, noise, **extra)

    def denoiser(self, net: Net) -> Denoiser:
        def denoise(x: torch.Tensor, sigma: torch.Tensor, **extra: Any) -> torch.Tensor:
            v = net(x, sigma * TIME_SCALE, **extra).to(x.dtype)
            return x - _per_sample(sigma, x) * v

        return denoise

    def sigmas(self, steps: int) -> torch.Tensor:
        """Times 1 -> 0, uniformly spaced: (steps + 1,), float64."""
        return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)

    def prior(self, noise: torch.Tensor, sigma_max: float) -> torch.Tensor:
        """Start of sampling: at t = 1 the path is pure noise."""
        return noise


class EpsilonPrediction:
    """DDPM epsilon prediction on Stable Diffusion's scaled-linear schedule, 1000 steps (as DC-AE's UViT runs)."""

    name = "eps"
    samplers = ("ddim", "dpmpp_2m", "euler", "heun")
    default_sampler = "dpmpp_2m"
    default_steps = 30  # DC-AE's UViT evaluation uses DPM-Solver with 30 steps

    def __init__(self, betas: torch.Tensor | None = None, spacing: str = "logsnr"):
        if spacing not in ("logsnr", "linear"):
            raise ValueError(f"unknown sigma spacing {spacing!r}; choose 'logsnr' or 'linear'")
        self.spacing = spacing
        betas = scaled_linear_betas() if betas is None else betas.to(torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # (N,) float64
        self.log_sigmas = 0.5 * torch.log((1 - self.alphas_cumprod) / self.alphas_cumprod)  # (N,) increasing
        self.num_timesteps = len(betas)

    def draw(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch's (DDPM timesteps (B,) int64, noise like x0), drawn in this order from `generator`."""
        timesteps = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        return timesteps, noise

    def pair(self, x0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> Pair:
        return epsilon_pair(x0, timesteps, noise, self.alphas_cumprod.to(torch.float32))

    def loss(self, net: Net, x0: torch.Tensor, generator: torch.Generator | None = None, **extra: Any) -> torch.Tensor:
        timesteps, noise = self.draw(x0, generator)
        return epsilon_loss(net, x0, timesteps, noise, self.alphas_cumprod.to(torch.float32), **extra)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """VE sigma -> fractional DDPM timestep, interpolating log sigma (k-diffusion's DiscreteSchedule)."""
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.to(torch.float64).log().clamp(log_sigmas[0], log_sigmas[-1])
        high = torch.searchsorted(log_sigmas, log_sigma).clamp(1, self.num_timesteps - 1)
        low = high - 1
        w = (log_sigma - log_sigmas[low]) / (log_sigmas[high] - log_sigmas[low])
        return (low + w).to(sigma.dtype)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Fractional DDPM timestep -> VE sigma, the inverse of `sigma_to_t`."""
        t = t.to(torch.float64).clamp(0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - low
        log_sigmas = self.log_sigmas.to(t.device)
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()

    def denoiser(self, net: Net) -> Denoiser:
        def denoise(x: torch.Tensor, sigma: torch.Tensor, **extra: Any) -> torch.Tensor:
            s = _per_sample(sigma, x)
            eps = net(x / (1 + s ** 2).sqrt(), self.sigma_to_t(sigma).to(x.dtype), **extra).to(x.dtype)
            return x - s * eps

        return denoise

    def sigmas(self, steps: int) -> torch.Tensor:
        """sigma(t=999) -> sigma(t=0) in `steps` points, then a final 0: (steps + 1,) float64.

        'logsnr' spaces them evenly in log sigma (= log-SNR, DPM-Solver's recommendation); 'linear' evenly in the
        DDPM timestep (DDIM's spacing), which leaves long final steps: on the Gaussian test target DDIM and
        DPM-Solver++ are several times more accurate with 'logsnr' at the same step count.
        """
        if self.spacing == "linear":
            sigmas = self.t_to_sigma(torch.linspace(self.num_timesteps - 1, 0, steps, dtype=torch.float64))
        else:
            sigmas = torch.linspace(self.log_sigmas[-1], self.log_sigmas[0], steps, dtype=torch.float64).exp()
        return torch.cat([sigmas, sigmas.new_zeros(1)])

    def prior(self, noise: torch.Tensor, sigma_max: float) -> torch.Tensor:
        """Start of sampling: x = x_vp / sqrt(abar) with x_vp ~ N(0, I) at the largest timestep."""
        return noise * (1 + sigma_max ** 2) ** 0.5


OBJECTIVES: dict[str, type] = {"flow": FlowMatching, "eps": EpsilonPrediction}


def get_objective(name: str, **options: Any) -> FlowMatching | EpsilonPrediction:
    """'flow' or 'eps' -> the objective; options go to its constructor (eps: spacing)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose from {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](**options)
