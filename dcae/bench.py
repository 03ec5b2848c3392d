"""`dcae bench ae`: dcae and diffusers' AutoencoderDC on the same weights, encode and decode, in one run.

Every row reports images/s, its ratio to diffusers fp32 for the same op and resolution, achieved GFLOP/s (FLOPs counted
with torch.utils.flop_counter) as a fraction of a GEMM peak measured in the same run for that dtype, peak memory, and
the output difference against diffusers fp32 (max abs diff and PSNR). Times are the median of --repeats rounds after
--warmup runs; each round runs diffusers and every dcae dtype once, in a rotating order, so that load from other
processes slows them alike. Absolute numbers on a shared machine mean little, ratios from one run mean more.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from dcae.inference import DTYPES, InferenceOptions, decode, encode, prepare_model, resolve_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="dc-ae-f32c32-in-1.0", help="model preset (random weights)")
    parser.add_argument("--model", help="a checkpoint to use instead of random weights")
    parser.add_argument("--resolution", type=int, nargs="+", default=[256])
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--ops", nargs="+", choices=["encode", "decode"], default=["encode", "decode"])
    parser.add_argument("--compare", choices=["diffusers", "none"], default="diffusers")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile dcae's encoder/decoder")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--md", help="write a markdown table here (e.g. docs/speed.md)")


# ----------------------------------------------------------------------------------------------------------------------
# Measurement helpers
# ----------------------------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> float:
    """Median seconds of `fn` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int
                     ) -> dict[str, float]:
    """Median seconds of each fn, timed in rounds that run every fn once (in a rotating order): a load that comes
    and goes on a shared machine then slows every implementation alike instead of whichever ran during it."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {key: [] for key in fns}
    keys = list(fns)
    for round_ in range(repeats):
        for key in keys[round_ % len(keys):] + keys[:round_ % len(keys)]:
            start = time.perf_counter()
            fns[key]()
            sync(device)
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def exact_cpu_memory() -> bool:
    """Make process RSS follow live tensors: glibc then serves every block over 64 KiB with its own mmap and unmaps
    it on free (no dynamic threshold, no retained heap), so the kernel's high-water mark (VmHWM, reset through
    /proc/self/clear_refs) is the true peak of a call. Costs a page fault per new block: call after the timings."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 64 * 1024) == 1 and libc.mallopt(m_trim_threshold, 128 * 1024) == 1
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return ok and _hwm_bytes() is not None
    except (OSError, AttributeError):
        return False


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak memory above the baseline during one call: the CUDA allocator's peak, or on CPU the kernel's RSS
    high-water mark (exact after `exact_cpu_memory()`; -1 where /proc is missing)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # VmHWM := current RSS
        base = _rss_bytes()
        fn()
        peak = _hwm_bytes()
    except OSError:
        return -1
    return -1 if peak is None else max(peak - base, 0)


def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def gemm_peak_gflops(dtype: torch.dtype, device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """Achieved GFLOP/s of a square matmul: the practical ceiling that convolutions are compared with."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    seconds = time_call(lambda: a @ b, device, repeats=repeats, warmup=2)
    return 2 * size**3 / seconds / 1e9


def psnr_against(reference: torch.Tensor, output: torch.Tensor) -> float:
    """PSNR with the reference's value range as the peak (2.0 for images in [-1, 1])."""
    mse = (reference.float() - output.float()).square().mean().item()
    peak = (reference.max() - reference.min()).item()
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


# ----------------------------------------------------------------------------------------------------------------------
def build_models(args: argparse.Namespace):
    import dcae
    from dcae.autoencoder import DCAE

    torch.manual_seed(0)
    model = DCAE.from_pretrained(args.model) if args.model else dcae.create_model(args.preset)
    with torch.no_grad():  # non-trivial norms, so that numerical differences are not hidden by identities
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    reference = None
    if args.compare == "diffusers":
        from diffusers import AutoencoderDC

        from dcae.weights import diffusers_config, to_diffusers

        config = {k: v for k, v in diffusers_config(model.config).items() if not k.startswith("_")}
        reference = AutoencoderDC(**config)
        reference.load_state_dict(to_diffusers(model.state_dict()), strict=True)
        reference = reference.eval().to(resolve_device(args.device))
    return model, reference


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model, reference = build_models(args)
    name = model.config.name
    options = {dtype: InferenceOptions(dtype=dtype, device=str(device), channels_last=not args.no_channels_last,
                                       compile=args.compile) for dtype in args.dtype}
    fast = prepare_model(model, options[args.dtype[0]])
    peaks = {dtype: gemm_peak_gflops(DTYPES[dtype], device) for dtype in args.dtype}
    rows: list[dict[str, Any]] = []
    memory_calls: list[tuple[dict[str, Any], Callable[[], Any]]] = []  # measured after all timings
    for resolution in args.resolution:
        x = torch.rand(args.batch_size, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
        with torch.inference_mode():
            if reference is not None:
                z_ref = reference.encode(x.to(device)).latent
                y_ref = reference.decode(z_ref).sample
            else:  # no peer: compare against dcae's own fp32 output
                z_ref = encode(fast, x, InferenceOptions(device=str(device)))
                y_ref = decode(fast, z_ref, InferenceOptions(device=str(device)))
        inputs = {"encode": x, "decode": z_ref.float().cpu()}
        refs = {"encode": z_ref.float().cpu(), "decode": y_ref.float().cpu()}
        def ours(op: str, opts: InferenceOptions) -> torch.Tensor:
            return encode(fast, inputs[op], opts) if op == "encode" else decode(fast, inputs[op], opts)

        def theirs(op: str) -> torch.Tensor:
            value = inputs[op].to(device)
            return reference.encode(value).latent if op == "encode" else reference.decode(value).sample

        fp32 = InferenceOptions(device=str(device), channels_last=not args.no_channels_last)
        flops = {op: count_flops(lambda op=op: ours(op, fp32)) / args.batch_size for op in args.ops}
        for op in args.ops:
            fns = {dtype: (lambda op=op, opts=opts: ours(op, opts)) for dtype, opts in options.items()}
            if reference is not None:
                fns["diffusers"] = lambda op=op: theirs(op)
            with torch.inference_mode():
                seconds = time_interleaved(fns, device, args.repeats, args.warmup)
            if reference is not None:
                rows.append(_row("diffusers", op, "fp32", resolution, args.batch_size, seconds["diffusers"], None,
                                 flops[op], peaks.get("fp32") or gemm_peak_gflops(torch.float32, device)))
                memory_calls.append((rows[-1], fns["diffusers"]))
            for dtype, opts in options.items():
                output = ours(op, opts).cpu()
                row = _row("dcae", op, dtype, resolution, args.batch_size, seconds[dtype], None, flops[op],
                           peaks[dtype])
                memory_calls.append((row, fns[dtype]))
                row["max_abs_diff"] = (output - refs[op]).abs().max().item()
                row["psnr_vs_fp32"] = psnr_against(refs[op], output)
                rows.append(row)
    # Memory after every timing: the exact CPU accounting slows allocation, so it must not touch the clocks.
    if device.type == "cpu":
        exact_cpu_memory()
    with torch.inference_mode():
        for row, fn in memory_calls:
            peak = peak_memory(fn, device)
            row["peak_memory_mb"] = peak / 2**20 if peak >= 0 else None
    _add_ratios(rows)
    for row in rows:
        print(_line(row), flush=True)
    result = {
        "command": command_line(args),
        "preset": name, "device": _device_name(device), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "batch_size": args.batch_size, "repeats": args.repeats,
        "channels_last": not args.no_channels_last, "compile": args.compile,
        "gemm_peak_gflops": peaks, "rows": rows,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(markdown(result))
    return 0


def command_line(args: argparse.Namespace) -> str:
    """The `dcae bench ae` command that reproduces this run (options that differ from the defaults)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = vars(parser.parse_args([]))
    parts = ["dcae bench ae"]
    for key, value in vars(args).items():
        if key not in defaults or value == defaults[key]:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        else:
            parts.append(" ".join([flag, *map(str, value if isinstance(value, list) else [value])]))
    return " ".join(parts)


def _row(impl, op, dtype, resolution, batch, seconds, memory, flops, peak) -> dict[str, Any]:
    gflops_per_s = flops * batch / seconds / 1e9
    return {"impl": impl, "op": op, "dtype": dtype, "resolution": resolution, "batch_size": batch,
            "seconds": seconds, "images_per_s": batch / seconds, "peak_memory_mb": None if memory is None else memory / 2**20,
            "gflop_per_image": flops / 1e9, "gflop_per_s": gflops_per_s, "gemm_peak_gflop_per_s": peak,
            "fraction_of_gemm_peak": gflops_per_s / peak}


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    base = {(r["op"], r["resolution"]): r["images_per_s"] for r in rows
            if r["impl"] == "diffusers" and r["dtype"] == "fp32"}
    for row in rows:
        key = (row["op"], row["resolution"])
        row["ratio_vs_diffusers_fp32"] = row["images_per_s"] / base[key] if key in base else None


def _line(row: dict[str, Any]) -> str:
    ratio = f"{row['ratio_vs_diffusers_fp32']:.2f}x" if row.get("ratio_vs_diffusers_fp32") else "-"
    diff = f"  maxdiff {row['max_abs_diff']:.2e}  psnr {row['psnr_vs_fp32']:.1f} dB" if "max_abs_diff" in row else ""
    return (f"{row['impl']:9s} {row['op']:6s} {row['dtype']:4s} {row['resolution']:5d}px  "
            f"{row['images_per_s']:7.3f} img/s  {ratio:>6s}  {row['gflop_per_s']:7.1f} GFLOP/s "
            f"({100 * row['fraction_of_gemm_peak']:.0f}% of GEMM)  {_mb(row['peak_memory_mb']):>7s} MB{diff}")


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def _jsonable(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else str(value)


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "<!-- generated by `dcae bench ae`; do not edit by hand -->",
        f"Generated by `{result['command']}`." if result.get("command") else "",
        f"Preset `{result['preset']}`, {result['device']}, {result['threads']} threads, torch {result['torch']}, "
        f"batch {result['batch_size']}, median of {result['repeats']}, channels_last={result['channels_last']}. "
        "GEMM peak measured in the same run: "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in result["gemm_peak_gflops"].items()) + ". "
        "Peak MB: memory one call adds at its peak (CUDA: allocator peak; CPU: the kernel's RSS high-water mark, "
        "with glibc set to unmap every freed block so that RSS follows live tensors), measured after all timings.",
        "",
        "| impl | op | dtype | res | images/s | vs diffusers fp32 | GFLOP/image | GFLOP/s | of GEMM peak "
        "| peak MB | max abs diff | PSNR vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ratio = f"{r['ratio_vs_diffusers_fp32']:.2f}x" if r.get("ratio_vs_diffusers_fp32") else "-"
        diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "-"
        psnr = f"{r['psnr_vs_fp32']:.1f} dB" if "psnr_vs_fp32" in r else "-"
        lines.append(f"| {r['impl']} | {r['op']} | {r['dtype']} | {r['resolution']} | {r['images_per_s']:.3f} "
                     f"| {ratio} | {r['gflop_per_image']:.0f} | {r['gflop_per_s']:.0f} "
                     f"| {100 * r['fraction_of_gemm_peak']:.0f}% | {_mb(r['peak_memory_mb'])} | {diff} | {psnr} |")
    return "\n".join(lines) + "\n"
