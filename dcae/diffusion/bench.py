"""`dcae bench diffusion`: one diffusion transformer on three latent spaces, the paper's speedup claim measured.

The SAME transformer (one preset; only its input width, token count and patch size change) is timed on
  f8p2  SD-VAE-f8 latents (4 ch, R/8 side) with patch 2   -> (R/16)^2 tokens
  f32p1 DC-AE-f32 latents (32 ch, R/32 side) with patch 1 -> (R/32)^2 tokens
  f64p1 DC-AE-f64 latents (128 ch, R/64 side) with patch 1 -> (R/64)^2 tokens
Training: images/s of forward + backward + AdamW step (flow loss), each part timed apart. Sampling: images/s of
`steps` net evaluations (no classifier-free guidance, which would halve every row alike), and the same with one
autoencoder decode per image added (decode timed once, at batch 1). Ratios are to the f8p2 row. The paper (DC-AE,
Table 6 / Fig. 1) reports 17.9x training and 19.1x inference for UViT-H at 512px on an H100 going from SD-VAE-f8 p2
to DC-AE-f64 p1, at a batch that fills the device.

Batch: by default every row gets the same number of tokens per step (--tokens-per-step), so f64p1 runs 16x the
images of f8p2 per step. A fixed small batch (--batch-size 2) gives f64p1 a step of 128 tokens, where per-op overhead
and the AdamW update (whose cost does not depend on the batch) dominate, and measures those instead of the token
reduction. Equal tokens rather than the largest batch within a memory budget: the per-step work is then the same
for every row, on any device, without a memory probe per row, and one setting serves CPU and GPU alike.

Peer (--peer diffusers): diffusers' DiTTransformer2DModel (the DiT behind DiTPipeline) against dcae's DiT of the same
size, patch and latent shape, with the same weights, timed in the same interleaved rounds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from dcae.bench import git_commit, machine_record, write_markdown as write_between_markers
from dcae.diffusion.objectives import FlowMatching
from dcae.diffusion.presets import ModelConfig, create_diffusion_model, get_diffusion_config, list_diffusion_presets
from dcae.errors import DCAEError
from dcae.provenance import reproducing_command

# row -> (spatial factor, latent channels, patch size)
LATENTS: dict[str, tuple[int, int, int]] = {"f8p2": (8, 4, 2), "f32p1": (32, 32, 1), "f64p1": (64, 128, 1)}
# row -> decoder timed with it: "sd-vae" is diffusers' AutoencoderKL in SD's config; anything else a dcae preset
DEFAULT_DECODERS = {"f8p2": "sd-vae", "f32p1": "dc-ae-f32c32-in-1.0", "f64p1": "dc-ae-f64c128-in-1.0"}
MD_BEGIN, MD_END = "<!-- BEGIN dcae bench diffusion -->", "<!-- END dcae bench diffusion -->"
TINY_DECODERS = {"f8p2": "dc-ae-tiny-f8c4", "f32p1": "dc-ae-tiny-f32c32", "f64p1": "dc-ae-tiny-f64c128"}


DEFAULT_TOKENS_PER_STEP = {"cpu": 4096, "cuda": 16384}  # f8p2 at 512px: batch 4 on CPU, 16 on CUDA (as before)


@dataclass
class BenchRow:
    latent: str
    latent_shape: list[int]  # (C, H, W) at this resolution
    patch_size: int
    tokens: int
    params: int
    gflops_per_image_forward: float | None  # one net evaluation, counted by torch's FlopCounterMode
    batch_size: int | None = None  # images per training step and per net call
    train_images_per_s: float | None = None  # None with --flops-only
    forward_seconds_per_step: float | None = None  # the training step's parts (medians): forward with the loss,
    backward_seconds_per_step: float | None = None  # backward,
    optimizer_seconds_per_step: float | None = None  # AdamW update and zero_grad
    sample_images_per_s: float | None = None  # `steps` net evaluations per image
    decoder: str | None = None
    decode_seconds_per_image: float | None = None
    sample_images_per_s_with_decode: float | None = None
    train_speedup: float | None = None  # ratios to the f8p2 row (None without one)
    sample_speedup: float | None = None
    sample_with_decode_speedup: float | None = None
    flops_ratio: float | None = None  # f8p2's forward FLOPs / this row's: the speedup if time followed FLOPs


@dataclass
class PeerRow:
    impl: str  # "dcae" or "diffusers"
    model: str  # class timed
    latent: str
    latent_shape: list[int]
    patch_size: int
    tokens: int
    params: int
    batch_size: int
    train_images_per_s: float
    forward_seconds_per_step: float
    backward_seconds_per_step: float
    optimizer_seconds_per_step: float
    sample_images_per_s: float
    train_ratio: float | None = None  # dcae / diffusers (1.0 on the diffusers row)
    sample_ratio: float | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels (default: 512)")
    parser.add_argument("--preset", choices=list_diffusion_presets(), metavar="NAME",
                        help="transformer size (its patch size is replaced per row); default UViT-H/1 on CUDA, "
                             "UViT-S/1 on CPU")
    parser.add_argument("--steps", type=int, default=30, help="sampling steps (net evaluations; default: 30)")
    parser.add_argument("--tokens-per-step", type=int,
                        help="every row's batch holds this many tokens (default: 16384 CUDA, 4096 CPU; f8p2 at 512px "
                             "then runs batch 16 / 4 and f64p1 batch 256 / 64)")
    parser.add_argument("--batch-size", type=int,
                        help="a fixed batch for every row instead (e.g. 2: the small-batch setting, which measures "
                             "per-step overhead more than the token reduction)")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="recompute blocks in backward (as efficientvit's UViT runs): less memory, more compute")
    parser.add_argument("--rows", nargs="+", choices=tuple(LATENTS), default=list(LATENTS), help="rows to measure")
    parser.add_argument("--no-decode", action="store_true", help="skip the autoencoder decode timings")
    parser.add_argument("--flops-only", action="store_true",
                        help="count parameters and FLOPs only (no timing; any preset, on any machine, in seconds)")
    parser.add_argument("--decode-preset", action="append", default=[], metavar="ROW=AE",
                        help="decoder for a row: a dcae preset or sd-vae (random weights); ROW=tiny or 'tiny' alone "
                             f"uses {', '.join(TINY_DECODERS.values())}")
    parser.add_argument("--peer", choices=("diffusers", "none"), default="diffusers",
                        help="diffusers: time diffusers' DiTTransformer2DModel against dcae's DiT (same size, patch, "
                             "latent and weights) in the same rounds (default)")
    parser.add_argument("--peer-preset", choices=[p for p in list_diffusion_presets() if p.startswith("DiT")],
                        metavar="NAME", help="DiT size for the peer comparison (default: DiT-XL/1 CUDA, DiT-S/1 CPU)")
    parser.add_argument("--peer-latent", choices=tuple(LATENTS), default="f32p1",
                        help="latent the peer comparison runs on (default: f32p1)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile dcae's transformers (training and sampling; the peer stays eager)")
    parser.add_argument("--min-seconds", type=float, default=3.0,
                        help="time each row's training and sampling at least this long in all (default: 3)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="interleaved timing rounds over the rows; the median is reported (default: 2)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), help="autocast dtype (default: bf16 CUDA, fp32 CPU)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="wall (default) or process: CPU seconds of this process, for a CPU shared with other jobs "
                             "(use with --threads 1, since waiting threads also burn CPU time)")
    parser.add_argument("--threads", type=int, help="torch CPU threads for this run (default: torch's, all cores)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--md", metavar="FILE",
                        help="write the results as Markdown (between the BEGIN/END markers if FILE has them)")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def seconds_per_call(fn: Callable[[], object], device: torch.device, min_seconds: float, min_calls: int = 1,
                     clock: str = "wall") -> float:
    """Mean time of fn() over at least min_calls calls and min_seconds (warm up before calling this).

    clock "process" counts this process's CPU seconds (all threads): on a CPU shared with other jobs it measures the
    work rather than the share of the machine this process got. Meaningless for CUDA, whose work is not CPU time.
    """
    now = CLOCKS[clock]
    synchronize(device)
    calls, start = 0, now()
    while calls < min_calls or now() - start < min_seconds:
        fn()
        calls += 1
    synchronize(device)
    return (now() - start) / calls


def forward_gflops(config: ModelConfig, device_batch: int = 1) -> float | None:
    """GFLOPs of one forward pass per image, counted on the meta device (no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.device("meta"):
            model = create_diffusion_model(config)
            x = torch.randn(device_batch, config.in_channels, config.input_size, config.input_size)
            t, y = torch.full((device_batch,), 500.0), torch.zeros(device_batch, dtype=torch.int64)
            with FlopCounterMode(display=False) as counter:
                model(x, t, y)
        return counter.get_total_flops() / device_batch / 1e9
    except Exception:  # noqa: BLE001 - a counter gap is not worth failing the benchmark for
        return None


def build_decoder(name: str, device: torch.device) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """A decoder with random weights -> (decode function, latent channels)."""
    if name == "sd-vae":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32).to(device).eval()
        return (lambda z: vae.decode(z).sample), 4
    import dcae

    if name not in dcae.list_presets():
        raise DCAEError(f"--decode-preset: unknown autoencoder {name!r}; use sd-vae or a dcae preset")
    model = dcae.create_model(name).to(device).eval()
    return model.decode, model.latent_channels


def decoders_for(args: argparse.Namespace) -> dict[str, str]:
    chosen = dict(DEFAULT_DECODERS)
    for item in args.decode_preset:
        if item == "tiny":
            chosen.update(TINY_DECODERS)
            continue
        row, sep, name = item.partition("=")
        if not sep or row not in LATENTS:
            raise DCAEError(f"--decode-preset {item!r}: expected ROW=AE with ROW one of {', '.join(LATENTS)}, or tiny")
        chosen[row] = TINY_DECODERS[row] if name == "tiny" else name
    return chosen


@dataclass
class Workload:
    """One model, its optimizer and inputs, and the two calls that get timed."""

    name: str  # a latent row ("f8p2") or a peer row ("peer dcae", "peer diffusers")
    batch: int
    model: torch.nn.Module
    train_step: Callable[[], tuple[float, float, float]]  # -> (forward, backward, optimizer) seconds
    net_call: Callable[[], None]


def row_config(latent: str, resolution: int, preset: str, **overrides) -> ModelConfig:
    """The preset sized for a row: its latent channels and side, its patch size, 1000 classes (ImageNet)."""
    factor, channels, patch = LATENTS[latent]
    if resolution % (factor * patch):
        raise DCAEError(f"--resolution {resolution} is not a multiple of {factor * patch} (row {latent})")
    return get_diffusion_config(preset, in_channels=channels, input_size=resolution // factor, patch_size=patch,
                                num_classes=1000, **overrides)


def row_batch(config: ModelConfig, tokens_per_step: int | None, batch_size: int | None) -> int:
    """A fixed --batch-size, or as many images as fill --tokens-per-step (at least one)."""
    if batch_size:
        return batch_size
    return max(1, tokens_per_step // (config.input_size // config.patch_size) ** 2)


def make_workload(name: str, model: torch.nn.Module, in_channels: int, side: int, batch: int, device: torch.device,
                  precision: str, clock: str = "wall", compile: bool = False) -> Workload:
    """AdamW + flow loss on random latents; the training step reports its parts' seconds."""
    model = model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    net = torch.compile(model) if compile else model
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, in_channels, side, side, generator=generator).to(device)
    y = torch.randint(1000, (batch,), generator=generator).to(device)
    t = torch.full((batch,), 500.0, device=device)
    objective, now = FlowMatching(), CLOCKS[clock]

    def autocast():
        return torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16")

    def train_step() -> tuple[float, float, float]:
        model.train()
        start = now()
        with autocast():
            loss = objective.loss(net, x, y=y)
        synchronize(device)
        forward_done = now()
        loss.backward()
        synchronize(device)
        backward_done = now()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return forward_done - start, backward_done - forward_done, now() - backward_done

    @torch.no_grad()
    def net_call() -> None:
        model.eval()
        with autocast():
            net(x, t, y)

    return Workload(name, batch, model, train_step, net_call)


def build_workload(latent: str, resolution: int, preset: str, batch: int, device: torch.device, precision: str,
                   grad_checkpointing: bool = False, clock: str = "wall", compile: bool = False) -> Workload:
    config = row_config(latent, resolution, preset, grad_checkpointing=grad_checkpointing)
    torch.manual_seed(0)
    return make_workload(latent, create_diffusion_model(config), config.in_channels, config.input_size, batch, device,
                         precision, clock, compile)


class DiffusersDiT(torch.nn.Module):
    """diffusers' DiTTransformer2DModel behind dcae's `forward(x, t, y)`."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner(x, timestep=t, class_labels=y).sample


def diffusers_dit_like(model: torch.nn.Module) -> DiffusersDiT:
    """diffusers' DiTTransformer2DModel with dcae DiT's size, patch, latent shape and weights.

    diffusers' DiT computes the time + label embedding in every block (one copy of the embedder per block, all
    holding dcae's weights here) and splits q, k, v into three projections; the maths is the same. Its sinusoid
    divides the frequency exponent by half - 1 where DiT's divides by half (downscale_freq_shift=1): set to 0 here so
    that the outputs match and the weight mapping is checked; the cost is the same.
    """
    from diffusers import DiTTransformer2DModel

    c = model.config
    D = c.hidden_size
    inner = DiTTransformer2DModel(num_attention_heads=c.num_heads, attention_head_dim=D // c.num_heads,
                                  in_channels=c.in_channels, out_channels=c.in_channels, num_layers=c.depth,
                                  sample_size=c.input_size, patch_size=c.patch_size, num_embeds_ada_norm=c.num_classes,
                                  norm_eps=1e-6)
    ours = model.state_dict()
    theirs: dict[str, torch.Tensor] = {"pos_embed.proj.weight": ours["x_embedder.proj.weight"],
                                       "pos_embed.proj.bias": ours["x_embedder.proj.bias"],
                                       "proj_out_1.weight": ours["final_layer.adaLN_modulation.1.weight"],
                                       "proj_out_1.bias": ours["final_layer.adaLN_modulation.1.bias"],
                                       "proj_out_2.weight": ours["final_layer.linear.weight"],
                                       "proj_out_2.bias": ours["final_layer.linear.bias"]}
    for i in range(c.depth):
        block, b = f"blocks.{i}.", f"transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            theirs[b + f"norm1.emb.timestep_embedder.linear_1.{kind}"] = ours[f"t_embedder.mlp.0.{kind}"]
            theirs[b + f"norm1.emb.timestep_embedder.linear_2.{kind}"] = ours[f"t_embedder.mlp.2.{kind}"]
            theirs[b + f"norm1.linear.{kind}"] = ours[block + f"adaLN_modulation.1.{kind}"]
            for part, chunk in zip(("to_q", "to_k", "to_v"), ours[block + f"attn.qkv.{kind}"].chunk(3, dim=0)):
                theirs[b + f"attn1.{part}.{kind}"] = chunk
            theirs[b + f"attn1.to_out.0.{kind}"] = ours[block + f"attn.proj.{kind}"]
            theirs[b + f"ff.net.0.proj.{kind}"] = ours[block + f"mlp.fc1.{kind}"]
            theirs[b + f"ff.net.2.{kind}"] = ours[block + f"mlp.fc2.{kind}"]
        theirs[b + "norm1.emb.class_embedder.embedding_table.weight"] = ours["y_embedder.embedding_table.weight"]
    missing, unexpected = inner.load_state_dict(theirs, strict=False)
    if unexpected or [k for k in missing if k != "pos_embed.pos_embed"]:
        raise RuntimeError(f"DiT -> diffusers weight map is off: missing {missing}, unexpected {unexpected}")
    for block in inner.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return DiffusersDiT(inner)


def peer_models(preset: str, latent: str, resolution: int, device: torch.device) -> tuple[ModelConfig, torch.nn.Module,
                                                                                         torch.nn.Module, float]:
    """(config, dcae DiT, diffusers DiT on the same weights, max abs output difference in eval mode)."""
    config = row_config(latent, resolution, preset)
    if config.arch != "dit":
        raise DCAEError(f"--peer-preset {preset}: the diffusers peer is a DiT; choose a DiT preset")
    torch.manual_seed(0)
    ours = create_diffusion_model(config)
    with torch.no_grad():  # adaLN-Zero starts every block as the identity: give the comparison something to compare
        for p in ours.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    theirs = diffusers_dit_like(ours)
    x = torch.randn(2, config.in_channels, config.input_size, config.input_size)
    t, y = torch.tensor([10.0, 700.0]), torch.tensor([3, 1000])
    with torch.no_grad():
        diff = (ours.eval()(x, t, y) - theirs.eval()(x, t, y)).abs().max().item()
    return config, ours.to(device), theirs.to(device), diff


def decode_seconds(name: str, latent: str, resolution: int, device: torch.device, precision: str,
                   clock: str = "wall") -> float:
    """Wall time of one decode at batch 1 (after a warm-up decode on CUDA), random weights."""
    factor, channels, _ = LATENTS[latent]
    decode, decoder_channels = build_decoder(name, device)
    if decoder_channels != channels:
        raise DCAEError(f"--decode-preset {latent}={name}: has {decoder_channels} latent channels, not {channels}")
    z = torch.randn(1, channels, resolution // factor, resolution // factor, device=device)

    @torch.no_grad()
    def decode_once() -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
            decode(z)

    if device.type == "cuda":
        decode_once()  # kernel selection and allocator warm-up; on CPU one cold decode is close enough and costly
    return seconds_per_call(decode_once, device, min_seconds=0.0, clock=clock)


@dataclass
class Timing:
    """Medians over the rounds: seconds per training step and its parts, per net call."""

    train: float
    forward: float
    backward: float
    optimizer: float
    net_call: float


def time_workloads(workloads: list[Workload], args: argparse.Namespace, device: torch.device) -> dict[str, Timing]:
    """Time all workloads in interleaved rounds (median per workload), so that a busy machine slows them alike."""
    for work in workloads:  # warm-up: allocations, kernel selection, optimizer state, compilation
        work.train_step()
        work.net_call()
    steps: dict[str, list[tuple[float, float, float]]] = {w.name: [] for w in workloads}
    calls: dict[str, list[float]] = {w.name: [] for w in workloads}
    budget = args.min_seconds / args.rounds
    for _ in range(args.rounds):
        for work in workloads:
            parts, start = [], time.perf_counter()
            while not parts or time.perf_counter() - start < budget:
                parts.append(work.train_step())
            steps[work.name].append(tuple(sum(p[i] for p in parts) / len(parts) for i in range(3)))
            calls[work.name].append(seconds_per_call(work.net_call, device, budget, clock=args.clock))
    out = {}
    for work in workloads:
        forward, backward, optimizer = (statistics.median(p[i] for p in steps[work.name]) for i in range(3))
        out[work.name] = Timing(statistics.median(sum(p) for p in steps[work.name]), forward, backward, optimizer,
                                statistics.median(calls[work.name]))
    return out


def measure(rows: list[str], args: argparse.Namespace, preset: str, device: torch.device, precision: str,
            decoders: dict[str, str] | None) -> tuple[list[BenchRow], dict | None]:
    """The latent rows and the peer comparison, timed in the same interleaved rounds."""
    if args.flops_only:
        return [flops_row(latent, args.resolution, preset) for latent in rows], None
    workloads = []
    for latent in rows:
        config = row_config(latent, args.resolution, preset)
        workloads.append(build_workload(latent, args.resolution, preset,
                                        row_batch(config, args.tokens_per_step, args.batch_size), device, precision,
                                        args.grad_checkpointing, args.clock, args.compile))
    peer = None
    if args.peer == "diffusers":
        config, ours, theirs, diff = peer_models(args.peer_preset, args.peer_latent, args.resolution, device)
        batch = row_batch(config, args.tokens_per_step, args.batch_size)
        side = config.input_size
        workloads.append(make_workload("peer dcae", ours, config.in_channels, side, batch, device, precision,
                                       args.clock, args.compile))
        workloads.append(make_workload("peer diffusers", theirs, config.in_channels, side, batch, device, precision,
                                       args.clock))
        peer = {"preset": args.peer_preset, "latent": args.peer_latent, "max_abs_diff": diff, "config": config}
    timings = time_workloads(workloads, args, device)
    by_name = {w.name: w for w in workloads}
    out = []
    for latent in rows:
        work, timing = by_name[latent], timings[latent]
        row = flops_row(latent, args.resolution, preset)
        sample_per_image_s = args.steps * timing.net_call / work.batch
        row.batch_size = work.batch
        row.train_images_per_s = work.batch / timing.train
        row.forward_seconds_per_step = timing.forward
        row.backward_seconds_per_step = timing.backward
        row.optimizer_seconds_per_step = timing.optimizer
        row.sample_images_per_s = 1.0 / sample_per_image_s
        if decoders:
            row.decoder = decoders[latent]
            row.decode_seconds_per_image = decode_seconds(row.decoder, latent, args.resolution, device, precision,
                                                          args.clock)
            row.sample_images_per_s_with_decode = 1.0 / (sample_per_image_s + row.decode_seconds_per_image)
        out.append(row)
        print(f"{latent}: {row.tokens} tokens x batch {work.batch}, train {row.train_images_per_s:.3g} img/s "
              f"(fwd {timing.forward:.3g} + bwd {timing.backward:.3g} + AdamW {timing.optimizer:.3g} s/step), "
              f"sample {row.sample_images_per_s:.3g} img/s"
              + (f", decode {row.decode_seconds_per_image:.3g} s/img ({row.decoder})" if row.decoder else ""),
              flush=True)
    if peer is not None:
        peer = peer_result(peer, by_name, timings, args)
    return out, peer


def peer_result(peer: dict, workloads: dict[str, Workload], timings: dict[str, Timing], args: argparse.Namespace
                ) -> dict:
    config = peer.pop("config")
    side, patch = config.input_size, config.patch_size
    rows = []
    for impl, model_name in (("diffusers", "diffusers.DiTTransformer2DModel"), ("dcae", "dcae.diffusion.dit.DiT")):
        work, timing = workloads[f"peer {impl}"], timings[f"peer {impl}"]
        rows.append(PeerRow(impl=impl, model=model_name, latent=peer["latent"],
                            latent_shape=[config.in_channels, side, side], patch_size=patch,
                            tokens=(side // patch) ** 2, params=sum(p.numel() for p in work.model.parameters()),
                            batch_size=work.batch, train_images_per_s=work.batch / timing.train,
                            forward_seconds_per_step=timing.forward, backward_seconds_per_step=timing.backward,
                            optimizer_seconds_per_step=timing.optimizer,
                            sample_images_per_s=work.batch / (args.steps * timing.net_call)))
    base = rows[0]
    for row in rows:
        row.train_ratio = row.train_images_per_s / base.train_images_per_s
        row.sample_ratio = row.sample_images_per_s / base.sample_images_per_s
        print(f"peer {row.impl}: {row.params / 1e6:.1f}M params, batch {row.batch_size}, train "
              f"{row.train_images_per_s:.3g} img/s ({row.train_ratio:.2f}x), sample {row.sample_images_per_s:.3g} "
              f"img/s ({row.sample_ratio:.2f}x)", flush=True)
    return {**peer, "train_ratio": rows[1].train_ratio, "sample_ratio": rows[1].sample_ratio,
            "rows": [asdict(r) for r in rows]}


def flops_row(latent: str, resolution: int, preset: str) -> BenchRow:
    """A row with the model's shape, size and FLOPs, and no timings yet."""
    config = row_config(latent, resolution, preset)
    side, patch = config.input_size, config.patch_size
    return BenchRow(latent=latent, latent_shape=[config.in_channels, side, side], patch_size=patch,
                    tokens=(side // patch) ** 2, params=param_count(config),
                    gflops_per_image_forward=forward_gflops(config))


def param_count(config: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in create_diffusion_model(config).parameters())


def add_ratios(rows: list[BenchRow]) -> None:
    """Throughputs (and, with --flops-only, FLOPs) relative to the f8p2 row."""
    base = next((r for r in rows if r.latent == "f8p2"), None)
    if base is None:
        return

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    for row in rows:
        row.train_speedup = ratio(row.train_images_per_s, base.train_images_per_s)
        row.sample_speedup = ratio(row.sample_images_per_s, base.sample_images_per_s)
        row.sample_with_decode_speedup = ratio(row.sample_images_per_s_with_decode,
                                               base.sample_images_per_s_with_decode)
        row.flops_ratio = ratio(base.gflops_per_image_forward, row.gflops_per_image_forward)


def _num(v, fmt):
    return "-" if v is None else format(v, fmt)


def markdown(rows: list[BenchRow], header: dict, peer: dict | None = None) -> str:
    machine = header["machine"]
    batch = (f"batch {header['batch_size']}" if header.get("batch_size") else
             f"{header['tokens_per_step']} tokens per step")
    lines = ["<!-- generated by `dcae bench diffusion`; do not edit by hand -->",
             f"Generated by `{header['command']}` at commit {header.get('git_commit') or '?'}.",
             f"{header['preset']} (patch per row), {header['resolution']}px, {batch}, {header['steps']} sampling "
             f"steps, {header['precision']}, compile={header.get('compile', False)}, {header['device_name']}, ISA "
             f"**{machine['cpu_isa']}**, {machine['threads']} threads, {header['clock']} clock. Train s/step parts: "
             "forward (with the loss) + backward + AdamW.",
             "",
             "| latent | latent shape | tokens | batch | GFLOPs/img fwd | FLOPs x | train img/s | train x "
             "| fwd / bwd / AdamW s/step | sample img/s | sample x | decoder | decode s/img | sample+decode img/s "
             "| sample+decode x |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        parts = ("-" if r.forward_seconds_per_step is None else
                 f"{r.forward_seconds_per_step:.3g} / {r.backward_seconds_per_step:.3g} / "
                 f"{r.optimizer_seconds_per_step:.3g}")
        lines.append(f"| {r.latent} | {'x'.join(map(str, r.latent_shape))} | {r.tokens} | {_num(r.batch_size, 'd')} "
                     f"| {_num(r.gflops_per_image_forward, '.4g')} | {_num(r.flops_ratio, '.1f')} "
                     f"| {_num(r.train_images_per_s, '.3g')} | {_num(r.train_speedup, '.1f')} | {parts} "
                     f"| {_num(r.sample_images_per_s, '.3g')} | {_num(r.sample_speedup, '.1f')} | {r.decoder or '-'} "
                     f"| {_num(r.decode_seconds_per_image, '.3g')} | {_num(r.sample_images_per_s_with_decode, '.3g')} "
                     f"| {_num(r.sample_with_decode_speedup, '.1f')} |")
    if peer:
        lines += ["",
                  f"Peer: {peer['preset']} on {peer['latent']} latents, same weights (max abs output difference "
                  f"{peer['max_abs_diff']:.1e}), timed in the same rounds.",
                  "",
                  "| model | params | batch | train img/s | train x | fwd / bwd / AdamW s/step | sample img/s | sample x |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in peer["rows"]:
            lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['batch_size']} "
                         f"| {r['train_images_per_s']:.3g} | {r['train_ratio']:.2f} "
                         f"| {r['forward_seconds_per_step']:.3g} / {r['backward_seconds_per_step']:.3g} / "
                         f"{r['optimizer_seconds_per_step']:.3g} | {r['sample_images_per_s']:.3g} "
                         f"| {r['sample_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def command_line(args: argparse.Namespace) -> str:
    """The `dcae bench diffusion` command that reproduces this run (options that differ from the defaults)."""
    return reproducing_command("dcae bench diffusion", add_arguments, args)


def run(args: argparse.Namespace) -> int:
    from dcae.runtime import resolve_device as select_device

    commit, command = git_commit(), command_line(args)  # before the defaults below are filled in
    device = select_device(args.device)
    cuda = device.type == "cuda"
    if args.clock == "process" and cuda:
        raise DCAEError("--clock process measures CPU time; use the wall clock on CUDA")
    if args.threads is not None:
        if args.threads < 1:
            raise DCAEError("--threads must be positive")
        torch.set_num_threads(args.threads)
    preset = args.preset or ("UViT-H/1" if cuda else "UViT-S/1")
    args.peer_preset = args.peer_preset or ("DiT-XL/1" if cuda else "DiT-S/1")
    if args.tokens_per_step is None and not args.batch_size:
        args.tokens_per_step = DEFAULT_TOKENS_PER_STEP[device.type]
    precision = args.precision or ("bf16" if cuda else "fp32")
    if (args.batch_size is not None and args.batch_size < 1) or args.steps < 1 or args.rounds < 1 or (
            args.tokens_per_step is not None and args.tokens_per_step < 1):
        raise DCAEError("--batch-size, --tokens-per-step, --steps and --rounds must be positive")
    decoders = None if args.no_decode or args.flops_only else decoders_for(args)
    machine = machine_record(device)
    header = {"command": command, "git_commit": commit, "machine": machine,
              "preset": preset, "resolution": args.resolution, "batch_size": args.batch_size,
              "tokens_per_step": None if args.batch_size else args.tokens_per_step, "steps": args.steps,
              "rounds": args.rounds, "min_seconds": args.min_seconds, "grad_checkpointing": args.grad_checkpointing,
              "compile": args.compile, "clock": args.clock, "flops_only": args.flops_only,
              "precision": precision, "device": str(device), "torch": torch.__version__,
              "device_name": machine["name"]}
    started = time.perf_counter()
    rows, peer = measure(args.rows, args, preset, device, precision, decoders)
    add_ratios(rows)
    header["total_seconds"] = time.perf_counter() - started
    table = markdown(rows, header, peer)
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**header, "rows": [asdict(r) for r in rows], "peer": peer}, indent=2)
                                   + "\n")
    if args.md:
        write_markdown(Path(args.md), table)
    return 0


def write_markdown(path: Path, table: str) -> None:
    """Replace the text between the BEGIN/END markers if the file has them (docs/diffusion.md), else write the file."""
    write_between_markers(path, table, MD_BEGIN, MD_END)
