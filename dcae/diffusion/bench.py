"""`dcae bench diffusion`: one diffusion transformer on three latent spaces, the paper's speedup claim measured.

The SAME transformer (one preset; only its input width, token count and patch size change) is timed on
  f8p2  SD-VAE-f8 latents (4 ch, R/8 side) with patch 2   -> (R/16)^2 tokens
  f32p1 DC-AE-f32 latents (32 ch, R/32 side) with patch 1 -> (R/32)^2 tokens
  f64p1 DC-AE-f64 latents (128 ch, R/64 side) with patch 1 -> (R/64)^2 tokens
Training: images/s of forward + backward + AdamW step (flow loss). Sampling: images/s of `steps` net evaluations
(no classifier-free guidance, which would halve every row alike), and the same with one autoencoder decode per image
added (decode timed once, at batch 1). Ratios are to the f8p2 row. The paper (DC-AE, Table 6 / Fig. 1) reports a 17.9x
training speedup for UViT-H at 512px on an H100 going from SD-VAE-f8 p2 to DC-AE-f64 p1.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from dcae.diffusion.objectives import FlowMatching
from dcae.diffusion.presets import ModelConfig, create_diffusion_model, get_diffusion_config, list_diffusion_presets
from dcae.errors import DCAEError

# row -> (spatial factor, latent channels, patch size)
LATENTS: dict[str, tuple[int, int, int]] = {"f8p2": (8, 4, 2), "f32p1": (32, 32, 1), "f64p1": (64, 128, 1)}
# row -> decoder timed with it: "sd-vae" is diffusers' AutoencoderKL in SD's config; anything else a dcae preset
DEFAULT_DECODERS = {"f8p2": "sd-vae", "f32p1": "dc-ae-f32c32-in-1.0", "f64p1": "dc-ae-f64c128-in-1.0"}
MD_BEGIN, MD_END = "<!-- BEGIN dcae bench diffusion -->", "<!-- END dcae bench diffusion -->"
TINY_DECODERS = {"f8p2": "dc-ae-tiny-f8c4", "f32p1": "dc-ae-tiny-f32c32", "f64p1": "dc-ae-tiny-f64c128"}


@dataclass
class BenchRow:
    latent: str
    latent_shape: list[int]  # (C, H, W) at this resolution
    patch_size: int
    tokens: int
    params: int
    gflops_per_image_forward: float | None  # one net evaluation, counted by torch's FlopCounterMode
    train_images_per_s: float | None  # None with --flops-only
    optimizer_seconds_per_step: float | None  # the AdamW update alone, included in the training time
    sample_images_per_s: float | None  # `steps` net evaluations per image
    decoder: str | None
    decode_seconds_per_image: float | None
    sample_images_per_s_with_decode: float | None
    train_speedup: float | None = None  # ratios to the f8p2 row (None without one)
    sample_speedup: float | None = None
    sample_with_decode_speedup: float | None = None
    flops_ratio: float | None = None  # f8p2's forward FLOPs / this row's: the speedup if time followed FLOPs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels (default: 512)")
    parser.add_argument("--preset", choices=list_diffusion_presets(), metavar="NAME",
                        help="transformer size (its patch size is replaced per row); default UViT-H/1 on CUDA, "
                             "UViT-S/1 on CPU")
    parser.add_argument("--steps", type=int, default=30, help="sampling steps (net evaluations; default: 30)")
    parser.add_argument("--batch-size", type=int, help="images per training step / net call (default: 16 CUDA, 2 CPU)")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="recompute blocks in backward (as efficientvit's UViT runs): less memory, more compute")
    parser.add_argument("--rows", nargs="+", choices=tuple(LATENTS), default=list(LATENTS), help="rows to measure")
    parser.add_argument("--no-decode", action="store_true", help="skip the autoencoder decode timings")
    parser.add_argument("--flops-only", action="store_true",
                        help="count parameters and FLOPs only (no timing; any preset, on any machine, in seconds)")
    parser.add_argument("--decode-preset", action="append", default=[], metavar="ROW=AE",
                        help="decoder for a row: a dcae preset or sd-vae (random weights); ROW=tiny or 'tiny' alone "
                             f"uses {', '.join(TINY_DECODERS.values())}")
    parser.add_argument("--min-seconds", type=float, default=3.0,
                        help="time each row's training and sampling at least this long in all (default: 3)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="interleaved timing rounds over the rows; the median is reported (default: 2)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), help="autocast dtype (default: bf16 CUDA, fp32 CPU)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="wall (default) or process: CPU seconds of this process, for a CPU shared with other jobs "
                             "(use with --threads 1, since waiting threads also burn CPU time)")
    parser.add_argument("--threads", type=int, help="torch CPU threads for this run (default: torch's)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--md", metavar="FILE",
                        help="write the results as a Markdown table (between the BEGIN/END markers if FILE has them)")


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
    """One row's model, optimizer and inputs, and the two calls that get timed."""

    config: ModelConfig
    train_step: Callable[[], None]
    optimizer_step: Callable[[], None]  # AdamW update on gradients left by `fill_gradients`
    fill_gradients: Callable[[], None]
    net_call: Callable[[], None]


def row_config(latent: str, resolution: int, preset: str, **overrides) -> ModelConfig:
    """The preset sized for a row: its latent channels and side, its patch size, 1000 classes (ImageNet)."""
    factor, channels, patch = LATENTS[latent]
    if resolution % (factor * patch):
        raise DCAEError(f"--resolution {resolution} is not a multiple of {factor * patch} (row {latent})")
    return get_diffusion_config(preset, in_channels=channels, input_size=resolution // factor, patch_size=patch,
                                num_classes=1000, **overrides)


def build_workload(latent: str, resolution: int, preset: str, batch: int, device: torch.device,
                   precision: str, grad_checkpointing: bool = False) -> Workload:
    config = row_config(latent, resolution, preset, grad_checkpointing=grad_checkpointing)
    channels, side = config.in_channels, config.input_size
    torch.manual_seed(0)
    model = create_diffusion_model(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, channels, side, side, device=device)
    y = torch.randint(1000, (batch,), device=device)
    t = torch.full((batch,), 500.0, device=device)
    objective = FlowMatching()

    def autocast():
        return torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16")

    def fill_gradients() -> None:
        model.train()
        with autocast():
            loss = objective.loss(model, x, y=y)
        loss.backward()

    def train_step() -> None:
        fill_gradients()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def net_call() -> None:
        model.eval()
        with autocast():
            model(x, t, y)

    return Workload(config, train_step, optimizer.step, fill_gradients, net_call)


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


def measure(rows: list[str], args: argparse.Namespace, preset: str, batch: int, device: torch.device, precision: str,
            decoders: dict[str, str] | None) -> list[BenchRow]:
    """Time all rows in interleaved rounds (median per row), so that a busy machine slows every row alike."""
    if args.flops_only:
        return [flops_row(latent, args.resolution, preset) for latent in rows]
    workloads = {latent: build_workload(latent, args.resolution, preset, batch, device, precision,
                                        args.grad_checkpointing) for latent in rows}
    for work in workloads.values():  # warm-up: allocations, kernel selection, optimizer state
        work.train_step()
        work.net_call()
    train_s: dict[str, list[float]] = {latent: [] for latent in rows}
    forward_s: dict[str, list[float]] = {latent: [] for latent in rows}
    optimizer_s: dict[str, list[float]] = {latent: [] for latent in rows}
    for _ in range(args.rounds):
        for latent, work in workloads.items():
            budget = args.min_seconds / args.rounds
            train_s[latent].append(seconds_per_call(work.train_step, device, budget, clock=args.clock))
            forward_s[latent].append(seconds_per_call(work.net_call, device, budget, clock=args.clock))
            work.fill_gradients()  # AdamW skips parameters without gradients: time it on real ones
            optimizer_s[latent].append(seconds_per_call(work.optimizer_step, device, 0.0, min_calls=3,
                                                        clock=args.clock))
    out = []
    for latent, work in workloads.items():
        row = flops_row(latent, args.resolution, preset)
        sample_per_image_s = args.steps * statistics.median(forward_s[latent]) / batch
        row.train_images_per_s = batch / statistics.median(train_s[latent])
        row.optimizer_seconds_per_step = statistics.median(optimizer_s[latent])
        row.sample_images_per_s = 1.0 / sample_per_image_s
        if decoders:
            row.decoder = decoders[latent]
            row.decode_seconds_per_image = decode_seconds(row.decoder, latent, args.resolution, device, precision,
                                                          args.clock)
            row.sample_images_per_s_with_decode = 1.0 / (sample_per_image_s + row.decode_seconds_per_image)
        out.append(row)
        print(f"{latent}: {row.tokens} tokens, train {row.train_images_per_s:.3g} img/s, "
              f"sample {row.sample_images_per_s:.3g} img/s"
              + (f", decode {row.decode_seconds_per_image:.3g} s/img ({row.decoder})" if row.decoder else ""),
              flush=True)
    return out


def flops_row(latent: str, resolution: int, preset: str) -> BenchRow:
    """A row with the model's shape, size and FLOPs, and no timings yet."""
    config = row_config(latent, resolution, preset)
    side, patch = config.input_size, config.patch_size
    return BenchRow(latent=latent, latent_shape=[config.in_channels, side, side], patch_size=patch,
                    tokens=(side // patch) ** 2, params=param_count(config),
                    gflops_per_image_forward=forward_gflops(config), train_images_per_s=None,
                    optimizer_seconds_per_step=None, sample_images_per_s=None, decoder=None,
                    decode_seconds_per_image=None, sample_images_per_s_with_decode=None)


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


def markdown(rows: list[BenchRow], header: dict) -> str:
    lines = [f"{header['preset']} (patch per row), {header['resolution']}px, batch {header['batch_size']}, "
             f"{header['steps']} sampling steps, {header['precision']}, {header['device_name']}, {header['clock']} clock",
             "",
             "| latent | latent shape | tokens | GFLOPs/img fwd | FLOPs x | train img/s | train x | AdamW s/step "
             "| sample img/s | sample x | decoder | decode s/img | sample+decode img/s | sample+decode x |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in rows:
        lines.append(f"| {r.latent} | {'x'.join(map(str, r.latent_shape))} | {r.tokens} "
                     f"| {num(r.gflops_per_image_forward, '.4g')} | {num(r.flops_ratio, '.1f')} "
                     f"| {num(r.train_images_per_s, '.3g')} | {num(r.train_speedup, '.1f')} "
                     f"| {num(r.optimizer_seconds_per_step, '.3g')} "
                     f"| {num(r.sample_images_per_s, '.3g')} | {num(r.sample_speedup, '.1f')} | {r.decoder or '-'} "
                     f"| {num(r.decode_seconds_per_image, '.3g')} | {num(r.sample_images_per_s_with_decode, '.3g')} "
                     f"| {num(r.sample_with_decode_speedup, '.1f')} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from dcae.runtime import resolve_device as select_device

    device = select_device(args.device)
    cuda = device.type == "cuda"
    if args.clock == "process" and cuda:
        raise DCAEError("--clock process measures CPU time; use the wall clock on CUDA")
    if args.threads is not None:
        if args.threads < 1:
            raise DCAEError("--threads must be positive")
        torch.set_num_threads(args.threads)
    preset = args.preset or ("UViT-H/1" if cuda else "UViT-S/1")
    batch = args.batch_size or (16 if cuda else 2)
    precision = args.precision or ("bf16" if cuda else "fp32")
    if batch < 1 or args.steps < 1 or args.rounds < 1:
        raise DCAEError("--batch-size, --steps and --rounds must be positive")
    decoders = None if args.no_decode or args.flops_only else decoders_for(args)
    header = {"preset": preset, "resolution": args.resolution, "batch_size": batch, "steps": args.steps,
              "rounds": args.rounds, "min_seconds": args.min_seconds, "grad_checkpointing": args.grad_checkpointing,
              "clock": args.clock, "flops_only": args.flops_only,
              "precision": precision, "device": str(device), "torch": torch.__version__,
              "device_name": torch.cuda.get_device_name(device) if cuda else
              f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"}
    rows = measure(args.rows, args, preset, batch, device, precision, decoders)
    add_ratios(rows)
    table = markdown(rows, header)
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**header, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    if args.md:
        write_markdown(Path(args.md), table)
    return 0


def write_markdown(path: Path, table: str) -> None:
    """Replace the text between the BEGIN/END markers if the file has them (docs/diffusion.md), else write the file."""
    text = path.read_text() if path.is_file() else ""
    if MD_BEGIN in text and MD_END in text:
        head, rest = text.split(MD_BEGIN, 1)
        table = head + MD_BEGIN + "\n" + table + rest[rest.index(MD_END):]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table)
