"""Latent diffusion on DC-AE latents: DiT / UViT, flow and eps objectives, samplers, latent cache, training, bench.

Training (`dcae.diffusion.train`), the cache (`dcae.diffusion.latents`) and the benchmark (`dcae.diffusion.bench`) are
imported from their modules; this package exports the models and the sampling pieces. See docs/diffusion.md.
"""
from dcae.diffusion.dit import DiT, DiTConfig
from dcae.diffusion.objectives import EpsilonPrediction, FlowMatching, classifier_free_guidance, get_objective
from dcae.diffusion.presets import (
    DIFFUSION_PRESETS,
    create_diffusion_model,
    get_diffusion_config,
    list_diffusion_presets,
)
from dcae.diffusion.samplers import SAMPLERS, generate, sample_ddim, sample_dpmpp_2m, sample_euler, sample_heun
from dcae.diffusion.uvit import UViT, UViTConfig

__all__ = [
    "DiT", "DiTConfig", "UViT", "UViTConfig", "DIFFUSION_PRESETS", "create_diffusion_model", "get_diffusion_config",
    "list_diffusion_presets", "FlowMatching", "EpsilonPrediction", "get_objective", "classifier_free_guidance",
    "SAMPLERS", "generate", "sample_euler", "sample_heun", "sample_ddim", "sample_dpmpp_2m",
]
