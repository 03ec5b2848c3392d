"""Sampler correctness against exact fields: a 2-D Gaussian mixture for flow, a 2-D Gaussian for eps.

Each toy "net" is the exact minimiser of its objective's loss for the stated target, so the sampled distribution
differs from the target only by ODE discretisation error (and Monte-Carlo error of the moment estimates: with
pytestmark = pytest.mark.usefixtures("one_thread")
N = 10000 points the standard error of a covariance entry here is below 0.008, of a weight below 0.005).
"""
from __future__ import annotations

import pytest
import torch

from dcae.diffusion.objectives import TIME_SCALE, EpsilonPrediction, FlowMatching
from dcae.diffusion.samplers import SAMPLERS, generate

N = 10000

# Target of the flow test: two well-separated 2-D Gaussians (split by the sign of the first coordinate).
WEIGHTS = torch.tensor([0.3, 0.7], dtype=torch.float64)
MEANS = torch.tensor([[-2.0, 1.0], [2.0, -1.0]], dtype=torch.float64)
COVS = torch.tensor([[[0.3, 0.1], [0.1, 0.2]], [[0.2, -0.05], [-0.05, 0.4]]], dtype=torch.float64)


def gmm_posterior_mean(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[x0 | x_t] for x_t = (1-t) x0 + t eps, x0 ~ GMM, eps ~ N(0, I): (B, 2), (B,) -> (B, 2), in closed form.

    Given component k, x_t ~ N((1-t) mu_k, C_k) with C_k = (1-t)^2 S_k + t^2 I, and
    E[x0 | x_t, k] = mu_k + (1-t) S_k C_k^-1 (x_t - (1-t) mu_k); the 2x2 algebra is written out for speed.
    """
    a, s2 = (1 - t)[:, None], (t ** 2)[:, None]  # (B, 1)
    c00, c01, c11 = a ** 2 * COVS[:, 0, 0] + s2, a ** 2 * COVS[:, 0, 1], a ** 2 * COVS[:, 1, 1] + s2  # (B, K)
    det = c00 * c11 - c01 ** 2
    d0 = x[:, :1] - a * MEANS[:, 0]  # (B, K)
    d1 = x[:, 1:] - a * MEANS[:, 1]
    p0, p1 = (c11 * d0 - c01 * d1) / det, (c00 * d1 - c01 * d0) / det  # C_k^-1 (x_t - (1-t) mu_k)
    log_w = WEIGHTS.log() - 0.5 * det.log() - 0.5 * (d0 * p0 + d1 * p1)  # (B, K)
    post0 = MEANS[:, 0] + a * (COVS[:, 0, 0] * p0 + COVS[:, 0, 1] * p1)
    post1 = MEANS[:, 1] + a * (COVS[:, 1, 0] * p0 + COVS[:, 1, 1] * p1)
    w = log_w.softmax(-1)
    return torch.stack([(w * post0).sum(1), (w * post1).sum(1)], dim=1)


def exact_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The flow objective's optimal net: v(x_t, t) = E[eps - x0 | x_t] = (x_t - E[x0 | x_t]) / t, on (B, 2, 1, 1)."""
    t = t / TIME_SCALE
    x2 = x[:, :, 0, 0]
    return ((x2 - gmm_posterior_mean(x2, t)) / t[:, None])[:, :, None, None]


def mixture_moments(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, 2) -> per component (split at x = 0): weights (2,), means (2, 2), covariances (2, 2, 2)."""
    k = (samples[:, 0] > 0).long()
    weights = torch.stack([(k == j).double().mean() for j in range(2)])
    means = torch.stack([samples[k == j].mean(0) for j in range(2)])
    covs = torch.stack([torch.cov(samples[k == j].T) for j in range(2)])
    return weights, means, covs


@pytest.fixture(scope="module")
def flow_runs() -> dict[str, torch.Tensor]:
    noise = torch.randn(N, 2, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    flow = FlowMatching()
    denoiser = flow.denoiser(exact_velocity)
    runs = {name: SAMPLERS[name](denoiser, noise, flow.sigmas(12))[:, :, 0, 0] for name in ("euler", "heun")}
    runs["reference"] = SAMPLERS["heun"](denoiser, noise, flow.sigmas(60))[:, :, 0, 0]
    runs["generate_heun"] = generate(exact_velocity, flow, noise[:500], sampler="heun", steps=12)[:, :, 0, 0]
    return runs


def test_flow_heun_matches_gaussian_mixture(flow_runs):
    weights, means, covs = mixture_moments(flow_runs["heun"])
    assert torch.allclose(weights, WEIGHTS, atol=0.015), weights  # about 3 standard errors
    assert torch.allclose(means, MEANS, atol=0.04), means
    assert torch.allclose(covs, COVS, atol=0.03), covs


def test_flow_reference_solution_matches_gaussian_mixture(flow_runs):
    weights, means, covs = mixture_moments(flow_runs["reference"])
    assert torch.allclose(weights, WEIGHTS, atol=0.015)
    assert torch.allclose(means, MEANS, atol=0.04)
    assert torch.allclose(covs, COVS, atol=0.03)


def test_flow_heun_more_accurate_than_euler(flow_runs):
    ref = flow_runs["reference"]
    rmse = {name: (flow_runs[name] - ref).pow(2).sum(1).mean().sqrt().item() for name in ("euler", "heun")}
    assert rmse["heun"] < 0.5 * rmse["euler"], rmse
    assert rmse["heun"] < 0.1, rmse
    # At 12 steps Euler's contraction error is visible in the moments; Heun's is not.
    cov_error = {name: (mixture_moments(flow_runs[name])[2] - COVS).abs().max().item() for name in ("euler", "heun")}
    assert cov_error["heun"] < cov_error["euler"], cov_error


def test_generate_is_the_sampler(flow_runs):
    assert torch.equal(flow_runs["generate_heun"], flow_runs["heun"][:500])


# Target of the eps test: one 2-D Gaussian, whose probability-flow ODE map is known in closed form.
MU = torch.tensor([1.0, -0.5], dtype=torch.float64)
SIGMA = torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=torch.float64)


def exact_eps_net(objective: EpsilonPrediction):
    """The eps objective's optimal net E[eps | x_t] for x0 ~ N(MU, SIGMA), at fractional DDPM timesteps."""
    def net(x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = 1 / (1 + objective.t_to_sigma(t) ** 2)  # (B,)
        cov_t = abar[:, None, None] * SIGMA + (1 - abar)[:, None, None] * torch.eye(2, dtype=torch.float64)
        r = x_vp[:, :, 0, 0] - abar.sqrt()[:, None] * MU  # (B, 2)
        eps = (1 - abar).sqrt()[:, None] * torch.linalg.solve(cov_t, r.unsqueeze(-1))[..., 0]
        return eps[:, :, None, None]

    return net


def exact_ode_map(x: torch.Tensor, sigma0: float) -> torch.Tensor:
    """Where the VE probability-flow ODE takes x (N, 2) at sigma0 to at sigma = 0, for the Gaussian target."""
    evals, evecs = torch.linalg.eigh(SIGMA)
    A = evecs @ torch.diag((evals / (evals + sigma0 ** 2)).sqrt()) @ evecs.T
    return MU + (x - MU) @ A.T


@pytest.fixture(scope="module")
def eps_start() -> tuple[EpsilonPrediction, torch.Tensor]:
    objective = EpsilonPrediction()
    sigma0 = float(objective.sigmas(10)[0])
    chol = torch.linalg.cholesky(SIGMA + sigma0 ** 2 * torch.eye(2, dtype=torch.float64))
    z = torch.randn(N, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return objective, (MU + z @ chol.T)[:, :, None, None]  # the exact marginal at sigma0


def eps_rmse(objective: EpsilonPrediction, x: torch.Tensor, sampler: str, steps: int) -> float:
    sigmas = objective.sigmas(steps)
    out = SAMPLERS[sampler](objective.denoiser(exact_eps_net(objective)), x, sigmas)[:, :, 0, 0]
    return (out - exact_ode_map(x[:, :, 0, 0], float(sigmas[0]))).pow(2).sum(1).mean().sqrt().item()


def test_ddim_and_dpmpp_converge_to_exact_ode_map(eps_start):
    objective, x = eps_start
    ddim = [eps_rmse(objective, x, "ddim", steps) for steps in (10, 40)]
    dpm = [eps_rmse(objective, x, "dpmpp_2m", steps) for steps in (10, 40)]
    assert ddim[1] < ddim[0] / 3 and ddim[1] < 0.05, ddim  # first order: 4x the steps, ~4x smaller error
    assert dpm[1] < dpm[0] / 8 and dpm[1] < 0.005, dpm  # second order: ~16x
    assert dpm[0] < ddim[0] / 3, (dpm, ddim)  # DPM-Solver++(2M) beats DDIM at the same step count


def test_ddim_equals_euler_and_eta_adds_seeded_noise(eps_start):
    objective, x = eps_start
    x = x[:500]
    denoiser, sigmas = objective.denoiser(exact_eps_net(objective)), objective.sigmas(8)
    assert torch.allclose(SAMPLERS["ddim"](denoiser, x, sigmas), SAMPLERS["euler"](denoiser, x, sigmas), atol=1e-10)
    noisy = [SAMPLERS["ddim"](denoiser, x, sigmas, eta=1.0, generator=torch.Generator().manual_seed(s)) for s in (3, 3, 4)]
    assert torch.equal(noisy[0], noisy[1]) and not torch.equal(noisy[0], noisy[2])


@pytest.mark.parametrize("sampler,steps", [("dpmpp_2m", 20), ("heun", 20)])
def test_eps_generate_gives_the_exact_pushforward_of_its_prior(sampler, steps):
    """From the prior N(0, (1 + sigma0^2) I) the exact ODE gives N(MU - A MU, (1 + sigma0^2) A A^T).

    Not exactly N(MU, SIGMA): SD's schedule keeps signal at t = 999 (abar = 0.0047), so the prior misses the data mean
    by MU in the VE view, and about 5% of MU survives to the sample (the non-zero terminal SNR bias).
    """
    objective = EpsilonPrediction()
    sigma0 = float(objective.sigmas(steps)[0])
    noise = torch.randn(N, 2, 1, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = generate(exact_eps_net(objective), objective, noise, sampler=sampler, steps=steps)[:, :, 0, 0]
    A = exact_ode_map(torch.eye(2, dtype=torch.float64), sigma0) - exact_ode_map(torch.zeros(1, 2, dtype=torch.float64), sigma0)
    mean, cov = exact_ode_map(torch.zeros(1, 2, dtype=torch.float64), sigma0)[0], (1 + sigma0 ** 2) * A.T @ A
    assert torch.allclose(out.mean(0), mean, atol=0.02), (out.mean(0), mean)
    assert torch.allclose(torch.cov(out.T), cov, atol=0.02), (torch.cov(out.T), cov)
    assert torch.allclose(cov, SIGMA, atol=0.01) and 0.03 < (mean - MU).norm() < 0.08  # the bias described above


def test_linear_spacing_is_less_accurate_than_logsnr(eps_start):
    _, x = eps_start
    errors = {spacing: eps_rmse(EpsilonPrediction(spacing=spacing), x, "dpmpp_2m", 20) for spacing in ("linear", "logsnr")}
    assert errors["logsnr"] < errors["linear"], errors


def test_sigma_time_roundtrip():
    objective = EpsilonPrediction()
    t = torch.tensor([0.0, 0.5, 17.25, 500.0, 998.9, 999.0], dtype=torch.float64)
    assert torch.allclose(objective.sigma_to_t(objective.t_to_sigma(t)), t, atol=1e-9)
    abar = objective.alphas_cumprod[[0, 999]]
    assert torch.allclose(objective.t_to_sigma(torch.tensor([0.0, 999.0], dtype=torch.float64)),
                          ((1 - abar) / abar).sqrt())
