"""`dcae bench ae`: dcae and diffusers' AutoencoderDC on the same weights, encode and decode, in one run.

Every row reports images/s; its ratio to diffusers fp32 (what a user switching gains) and to diffusers in the same
dtype (bf16: diffusers under bf16 autocast; the implementation's own gain, not the dtype's); achieved GFLOP/s (FLOPs
counted with torch.utils.flop_counter) as a fraction of a GEMM peak measured in the same run for that dtype; peak
memory (see `peak_allocated`); and the output difference against diffusers fp32 (max abs diff and PSNR). Times are the
median of --repeats rounds after --warmup runs; each round runs every implementation and dtype once, in a rotating
order, so that load from other processes slows them alike. Absolute numbers on a shared machine mean little, ratios
from one run mean more; the machine record (CPU ISA, bf16 native or emulated, threads) goes with every result.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from dcae.errors import DCAEError
from dcae.provenance import reproducing_command
from dcae.runtime import (
    DTYPE_CHOICES,
    DTYPES,
    LAYOUTS,
    InferenceOptions,
    bf16_is_native,
    cpu_isa,
    decode,
    encode,
    hardware_record,
    other_layout,
    prepare_model,
    resolve_device,
    resolve_dtype,
)

MD_BEGIN, MD_END = "<!-- BEGIN dcae bench ae -->", "<!-- END dcae bench ae -->"
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
ISA_ENVIRONMENT = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS")


def layouts_markers(isa: str) -> tuple[str, str]:
    """The markers of the `--layouts` table of one ISA in docs/speed.md (one table per ISA)."""
    return f"<!-- BEGIN dcae bench ae --layouts {isa} -->", f"<!-- END dcae bench ae --layouts {isa} -->"


def compile_markers(isa: str) -> tuple[str, str]:
    """The markers of the `--compile` table of one ISA in docs/speed.md (compiled rows beside eager ones)."""
    return f"<!-- BEGIN dcae bench ae --compile {isa} -->", f"<!-- END dcae bench ae --compile {isa} -->"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="dc-ae-f32c32-in-1.0", help="model preset (random weights)")
    parser.add_argument("--model", help="a checkpoint to use instead of random weights")
    parser.add_argument("--resolution", type=int, nargs="+", default=[256])
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPE_CHOICES), default=["auto"],
                        help="dcae dtypes to time (default: auto = fp32, plus bf16 where the device runs it natively; "
                             "bf16 on a CPU that emulates it only when asked, with a warning)")
    parser.add_argument("--ops", nargs="+", choices=["encode", "decode"], default=["encode", "decode"])
    parser.add_argument("--compare", choices=["diffusers", "none"], default="diffusers",
                        help="diffusers: AutoencoderDC on the same weights, in fp32 and in every other timed dtype")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="wall (default) or process: this process's CPU seconds (all threads), which on a CPU "
                             "shared with other jobs measure the work rather than the share of the machine it got")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="force dcae's memory layout for every pass (default: per pass, by "
                             "dcae.runtime.memory_format's rule)")
    parser.add_argument("--layouts", action="store_true",
                        help="time dcae in both layouts (NCHW and channels_last) for every pass, interleaved: the "
                             "measurements behind the layout rule (--md writes a table per ISA)")
    parser.add_argument("--compile", action="store_true",
                        help="add torch.compile'd dcae rows beside the eager ones (the first call, reported apart, "
                             "pays for the compile)")
    parser.add_argument("--onnx", action="store_true",
                        help="add onnxruntime (CPU, fp32) rows: dcae's own ONNX export of the same weights")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--md", help="write a markdown table here (between the BEGIN/END dcae bench ae markers if the "
                                     "file has them, e.g. docs/speed.md)")


def bench_dtypes(names: list[str], device: torch.device) -> list[str]:
    """--dtype names -> dtypes to time. 'auto' is fp32 plus bf16 where native: fp32 always, as the reference row."""
    out: list[str] = []
    for name in names:
        for dtype in (["fp32", resolve_dtype("auto", device)] if name == "auto" else [resolve_dtype(name, device)]):
            if dtype not in out:
                out.append(dtype)
    return out


def environment() -> dict[str, str]:
    """The environment variables that change which kernels run (an imitated ISA, a thread count)."""
    return {name: os.environ[name] for name in ISA_ENVIRONMENT if name in os.environ}


def git_commit(path: Path = Path(__file__).resolve().parent) -> str | None:
    """The checkout's commit (with '-dirty' when tracked files changed), or None outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def machine_record(device: torch.device) -> dict[str, Any]:
    """hardware_record (ISA, bf16 native or not, torch, threads) plus the CPU's name and core count."""
    return {**hardware_record(device), "name": _device_name(device), "cpu_count": os.cpu_count()}


def write_markdown(path: Path, block: str, begin: str, end: str) -> None:
    """Replace the text between the begin/end markers if the file has them (docs/speed.md), else write the file."""
    text = path.read_text() if path.is_file() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        block = head + begin + "\n" + block + rest[rest.index(end):]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(block)


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


def time_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int,
                     rounds: dict[str, dict[str, list[float]]] | None = None, clock: str = "wall"
                     ) -> tuple[dict[str, float], dict[str, float]]:
    """(median seconds, first-call seconds) of each fn. Timed in rounds that run every fn once (in a rotating order):
    a load that comes and goes on a shared machine then slows every implementation alike instead of whichever ran
    during it. The first call (warm-up) is reported apart: it holds one-off costs such as torch.compile's. `rounds`,
    if given, receives every round's seconds per fn on both clocks ({clock: {key: seconds}}, for ratios paired within a
    round). `clock` (see CLOCKS) is the one the medians use."""
    first: dict[str, float] = {}
    for key, fn in fns.items():
        for i in range(warmup):
            start = time.perf_counter()  # wall, whatever the clock: how long the first call keeps you waiting
            fn()
            sync(device)
            if i == 0:
                first[key] = time.perf_counter() - start
    times: dict[str, dict[str, list[float]]] = {name: {key: [] for key in fns} for name in CLOCKS}
    keys = list(fns)
    for round_ in range(repeats):
        for key in keys[round_ % len(keys):] + keys[:round_ % len(keys)]:
            start = {name: now() for name, now in CLOCKS.items()}
            fns[key]()
            sync(device)
            for name, now in CLOCKS.items():
                times[name][key].append(now() - start[name])
    if rounds is not None:
        rounds.update(times)
    return {key: statistics.median(values) for key, values in times[clock].items()}, first


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
    """Make process RSS follow live tensors (used by the tiling tests' RSS probe; the bench uses `peak_allocated`): glibc then serves every block over 64 KiB with its own mmap and unmaps
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


def peak_allocated(fn: Callable[[], Any], device: torch.device) -> tuple[int, Any]:
    """(peak bytes of tensor memory allocated above the start of the call, fn's result).

    CUDA: the caching allocator's peak. CPU: every allocation and free that torch's CPU allocator sees (tensors, and
    oneDNN's buffers and scratchpads, which ideep allocates through it) is recorded by the profiler with its size; the
    running sum's maximum is the peak. Exact at the allocator, as CUDA's figure is, and it costs no more than one
    plain call: no page faults, no process-wide malloc tuning (the RSS way's price, see `exact_cpu_memory`).
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base, out
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # some torch builds print a line on every profiler start and stop
        prof.start()
    try:
        out = fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:  # allocations positive, frees negative
        live += nbytes
        peak = max(peak, live)
    return peak, out


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def gemm_peak_gflops(dtype: torch.dtype, device: torch.device, size: int = 1024, repeats: int = 10) -> float:
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


def count_flops_and_run(fn: Callable[[], Any]) -> tuple[int, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    return counter.get_total_flops(), out


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
    started, commit = time.perf_counter(), git_commit()  # the code that runs, before anyone edits the tree
    load_start = _load_average()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.clock == "process" and device.type == "cuda":
        raise DCAEError("--clock process measures CPU time; use the wall clock on CUDA")
    dtypes = bench_dtypes(args.dtype, device)
    model, reference = build_models(args)
    name = model.config.name
    onnx = onnx_runners(model, args.threads) if args.onnx else {}  # exported from the fp32 model, before prepare
    model = model.eval().to(device)
    prepared: dict[tuple[str, bool], torch.nn.Module] = {}  # (layout, compiled) -> a copy of the model set up so

    def prepared_model(layout: str, compiled: bool) -> torch.nn.Module:
        """One copy per layout (and compiled or not): a row never pays for converting weights between layouts."""
        if (layout, compiled) not in prepared:
            prepared[(layout, compiled)] = prepare_model(copy.deepcopy(model), InferenceOptions(
                device=str(device), channels_last=layout == "channels_last", compile=compiled))
        return prepared[(layout, compiled)]

    peaks = {dtype: gemm_peak_gflops(DTYPES[dtype], device) for dtype in dict.fromkeys(["fp32", *dtypes])}
    print(f"dcae bench ae: {name}, {_device_name(device)}, ISA {cpu_isa() if device.type == 'cpu' else device.type}, "
          f"bf16 {'native' if bf16_is_native(device) else 'emulated'}, {torch.get_num_threads()} threads, "
          f"dtypes {' '.join(dtypes)}, load average {load_start[0]:.1f}", flush=True)
    rows: list[dict[str, Any]] = []
    case_seconds: dict[str, float] = {}
    case_cpu_seconds: dict[str, float] = {}  # this process's CPU time: what the case costs a machine of its own
    case_load: dict[str, list[float]] = {}

    def write_result(complete: bool) -> dict[str, Any]:
        """The results JSON, written after every pass (complete=False) and at the end."""
        result = {
            "command": command_line(args),
            "environment": environment(),
            "git_commit": commit,
            "machine": machine_record(device),
            "preset": name, "device": _device_name(device), "cpu_isa": cpu_isa(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "dtypes": dtypes, "batch_size": args.batch_size, "repeats": args.repeats,
            "warmup": args.warmup, "clock": args.clock, "channels_last": args.channels_last, "layouts": args.layouts,
            "compile": args.compile,
            "layout_rule": "dcae.runtime.memory_format" if args.channels_last is None else None,
            "memory_method": "allocator peak (CUDA caching allocator; CPU: profiler memory events of torch's "
                             "allocator)",
            "gemm_peak_gflops": peaks, "seconds_per_resolution": case_seconds,
            "cpu_seconds_per_resolution": case_cpu_seconds,
            "load_average": {"start": load_start, "end_of_resolution": case_load},
            "total_seconds": time.perf_counter() - started, "complete": complete, "rows": rows,
        }
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")
        return result

    for resolution in args.resolution:
        case_start, case_cpu_start = time.perf_counter(), time.process_time()
        x = torch.rand(args.batch_size, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
        z = None  # the decode input: diffusers fp32's latent (dcae's without a peer)
        refs: dict[str, torch.Tensor] = {}
        for op in args.ops:
            if op == "decode" and z is None:
                with torch.inference_mode():
                    z = (reference.encode(x.to(device)).latent if reference is not None
                         else encode(model, x, InferenceOptions(device=str(device), channels_last=False))).float().cpu()
            value = x if op == "encode" else z
            # (impl, dtype, layout, compiled) -> the call; diffusers runs NCHW, as its users run it
            fns: dict[tuple[str, str, str, bool], Callable[[], torch.Tensor]] = {}
            if reference is not None:
                for dtype in dict.fromkeys(["fp32", *dtypes]):
                    fns[("diffusers", dtype, "nchw", False)] = (
                        lambda op=op, dtype=dtype: _diffusers_call(reference, op, value, dtype, device))
            chosen: dict[str, str] = {}  # dtype -> the layout dcae picks for this pass (forced or by the rule)
            for dtype in dtypes:
                chosen[dtype] = InferenceOptions(dtype, str(device), args.channels_last).layout(op, resolution**2)
                for layout in (LAYOUTS if args.layouts else [chosen[dtype]]):
                    for compiled in ([False, True] if args.compile else [False]):
                        opts = InferenceOptions(dtype, str(device), layout == "channels_last", compiled)
                        fns[("dcae", dtype, layout, compiled)] = (
                            lambda op=op, opts=opts, m=prepared_model(layout, compiled):
                            (encode if op == "encode" else decode)(m, value, opts))
            if op in onnx:
                fns[("onnxruntime", "fp32", "nchw", False)] = lambda op=op: onnx[op](value)
            rounds: dict[str, dict[str, list[float]]] = {}
            with torch.inference_mode():
                seconds, first = time_interleaved({_label(k): fn for k, fn in fns.items()}, device, args.repeats,
                                                  args.warmup, rounds, args.clock)
            # One more call each, after the timings: peak memory and the output (FLOPs counted on dcae's first row;
            # the count does not depend on the dtype).
            flops = None
            measured: dict[tuple[str, str, str, bool], tuple[int, torch.Tensor]] = {}
            for key, fn in fns.items():
                if key[0] == "dcae" and flops is None:
                    peak, (flops, out) = peak_allocated(lambda fn=fn: count_flops_and_run(fn), device)
                else:
                    peak, out = peak_allocated(fn, device)
                if key[0] == "onnxruntime":
                    peak = None  # ONNX Runtime allocates outside torch's allocator: not measured
                measured[key] = (peak, out.float().cpu())
            if flops is None:
                flops, _ = count_flops_and_run(next(iter(fns.values())))
            flops /= args.batch_size
            ref_key = (("diffusers", "fp32", "nchw", False) if reference is not None
                       else ("dcae", "fp32", chosen.get("fp32"), False))
            refs[op] = measured[ref_key][1] if ref_key in measured else None
            if op == "encode" and reference is not None:
                z = measured[ref_key][1]
            new_rows = []
            for key, (peak, out) in measured.items():
                impl, dtype, layout, compiled = key
                row = _row(impl, op, dtype, resolution, args.batch_size, seconds[_label(key)], peak, flops,
                           peaks[dtype])
                row.update(layout=layout, layout_chosen=impl != "dcae" or layout == chosen[dtype], compiled=compiled,
                           first_call_seconds=first.get(_label(key)),
                           round_seconds=rounds[args.clock][_label(key)],
                           round_seconds_by_clock={name: times[_label(key)] for name, times in rounds.items()})
                if refs[op] is not None and key != ref_key:
                    row["max_abs_diff"] = (out - refs[op]).abs().max().item()
                    row["psnr_vs_fp32"] = psnr_against(refs[op], out)
                new_rows.append(row)
            rows.extend(new_rows)
            _add_ratios(rows)
            for row in new_rows:
                print(_line(row), flush=True)
            write_result(complete=False)  # a run stopped half-way keeps the passes it timed
        case_seconds[str(resolution)] = time.perf_counter() - case_start
        case_cpu_seconds[str(resolution)] = time.process_time() - case_cpu_start
        case_load[str(resolution)] = _load_average()
    result = write_result(complete=True)
    if args.md:
        begin, end = (layouts_markers(result["cpu_isa"]) if args.layouts else
                      compile_markers(result["cpu_isa"]) if args.compile else (MD_BEGIN, MD_END))
        write_markdown(Path(args.md), markdown(result), begin, end)
    print(f"total {result['total_seconds']:.0f} s (" + ", ".join(f"{r} px {s:.0f} s" for r, s in case_seconds.items())
          + ")", flush=True)
    return 0


def _label(key: tuple[str, str, str, bool]) -> str:
    impl, dtype, layout, compiled = key
    return f"{impl}{' compiled' if compiled else ''} {dtype} {layout}"


def _load_average() -> list[float]:
    """os.getloadavg() (1, 5, 15 minutes): how busy the shared machine was; [] where it is not available."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def _diffusers_call(reference, op: str, value: torch.Tensor, dtype: str, device: torch.device) -> torch.Tensor:
    """diffusers as its users run it: default memory layout, low precision through autocast."""
    value = value.to(device)
    with torch.autocast(device.type, DTYPES[dtype], enabled=dtype != "fp32"):
        return reference.encode(value).latent if op == "encode" else reference.decode(value).sample


def command_line(args: argparse.Namespace) -> str:
    """The `dcae bench ae` command that reproduces this run (options that differ from the defaults)."""
    return reproducing_command("dcae bench ae", add_arguments, args)


def _row(impl, op, dtype, resolution, batch, seconds, memory, flops, peak) -> dict[str, Any]:
    gflops_per_s = flops * batch / seconds / 1e9
    return {"impl": impl, "op": op, "dtype": dtype, "resolution": resolution, "batch_size": batch,
            "seconds": seconds, "images_per_s": batch / seconds,
            "peak_memory_mb": None if memory is None or memory < 0 else memory / 2**20,
            "gflop_per_image": flops / 1e9, "gflop_per_s": gflops_per_s, "gemm_peak_gflop_per_s": peak,
            "fraction_of_gemm_peak": gflops_per_s / peak}


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """The median over rounds of numerator[i] / denominator[i], taken on the logarithms so that paired_ratio(a, b) is
    exactly 1 / paired_ratio(b, a) for an even number of rounds too."""
    return math.exp(statistics.median(math.log(a / b) for a, b in zip(numerator, denominator)))


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """ratio_vs_diffusers_fp32 (the gain of switching), ratio_vs_diffusers_same_dtype (the implementation's),
    ratio_vs_dcae_fp32 (what a dtype, a layout, compilation or ONNX Runtime buys over dcae's own fp32: eager, in the
    layout dcae picks), and for dcae rows timed in both layouts (--layouts) ratio_vs_other_layout, the median over
    rounds of the other layout's seconds over this one's in the same round (> 1: this layout is faster)."""
    base = {(r["op"], r["resolution"], r["dtype"]): r["images_per_s"] for r in rows if r["impl"] == "diffusers"}
    dcae_fp32 = {(r["op"], r["resolution"]): r["images_per_s"] for r in rows
                 if (r["impl"], r["dtype"]) == ("dcae", "fp32") and not r.get("compiled")
                 and r.get("layout_chosen", True)}
    by_variant = {(r["impl"], r["op"], r["resolution"], r["dtype"], r.get("compiled"), r.get("layout")): r
                  for r in rows}
    for row in rows:
        other = by_variant.get((row["impl"], row["op"], row["resolution"], row["dtype"], row.get("compiled"),
                                other_layout(row.get("layout"))))
        if row["impl"] == "dcae" and other is not None and row.get("round_seconds") and other.get("round_seconds"):
            row["ratio_vs_other_layout"] = paired_ratio(other["round_seconds"], row["round_seconds"])
        fp32 = base.get((row["op"], row["resolution"], "fp32"))
        same = base.get((row["op"], row["resolution"], row["dtype"]))
        own = dcae_fp32.get((row["op"], row["resolution"]))
        row["ratio_vs_diffusers_fp32"] = row["images_per_s"] / fp32 if fp32 else None
        row["ratio_vs_diffusers_same_dtype"] = row["images_per_s"] / same if same else None
        row["ratio_vs_dcae_fp32"] = row["images_per_s"] / own if own else None


def onnx_runners(model: torch.nn.Module, threads: int | None) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """op -> ONNX Runtime session of dcae's export of `model` (any image size), for the onnxruntime rows."""
    import tempfile

    from dcae.export import export_onnx, onnx_runner

    folder = Path(tempfile.mkdtemp(prefix="dcae-bench-onnx-"))
    f = model.spatial_factor
    export_onnx(model, folder, image_size=(2 * f, 3 * f), dynamic_size=True)
    threads = threads or torch.get_num_threads()
    return {op: onnx_runner(folder / f"{part}.onnx", threads=threads)
            for op, part in (("encode", "encoder"), ("decode", "decoder"))}


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value else "-"


def _line(row: dict[str, Any]) -> str:
    diff = f"  maxdiff {row['max_abs_diff']:.2e}  psnr {row['psnr_vs_fp32']:.1f} dB" if "max_abs_diff" in row else ""
    impl = row["impl"] + (" (compiled)" if row.get("compiled") else "")
    return (f"{impl:20s} {row['op']:6s} {row['dtype']:4s} {row['resolution']:5d}px {row.get('layout', '?'):13s} "
            f"{row['images_per_s']:7.3f} img/s  {_ratio(row['ratio_vs_diffusers_fp32']):>6s} vs fp32  "
            f"{_ratio(row['ratio_vs_diffusers_same_dtype']):>6s} vs same  {row['gflop_per_s']:7.1f} GFLOP/s "
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
    machine = result.get("machine", {})
    isa = machine.get("cpu_isa", result.get("cpu_isa", "?"))
    bf16 = "native" if machine.get("bf16_native") else "emulated"
    env = "".join(f"{k}={v} " for k, v in result.get("environment", {}).items())
    load = result.get("load_average", {})
    layout = {None: "dcae's layout per pass by the rule `dcae.runtime.memory_format` (column layout)",
              True: "layout forced channels_last", False: "layout forced NCHW"}[result["channels_last"]]
    if result.get("layouts"):
        layout = "dcae timed in both layouts (vs other layout: the other layout's seconds over this one's, median " \
                 "of the per-round ratios; > 1: this one is faster; chosen: what the rule picks)"
    other = bool(result.get("layouts"))
    lines = [
        "<!-- generated by `dcae bench ae`; do not edit by hand -->",
        f"Generated by `{env}{result['command']}` at commit {result.get('git_commit') or '?'}.",
        f"Preset `{result['preset']}`, {result['device']}, ISA **{isa}** (bf16 {bf16}), {result['threads']} threads, "
        f"torch {result['torch']}, batch {result['batch_size']}, median of {result['repeats']} after "
        f"{result.get('warmup', 1)} warm-up, {layout}, compile={result['compile']}, "
        + ("process clock (this process's CPU seconds, both threads: images/s is per CPU second; read the ratios). "
           if result.get("clock") == "process" else "wall clock. ")
        + (f"Load average (1 min) {load['start'][0]:.1f} at the start, "
           + ", ".join(f"{v[0]:.1f} after {r} px" for r, v in load.get("end_of_resolution", {}).items() if v)
           + ". " if load.get("start") else "")
        + "GEMM peak measured in the same run: "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in result["gemm_peak_gflops"].items()) + ". "
        "Peak MB: tensor memory one call allocates at its peak, above what was live before it (allocator-exact; "
        "see below). Each resolution's case took (wall / this process's CPU seconds): " + ", ".join(
            f"{r} px {s:.0f} s / {result.get('cpu_seconds_per_resolution', {}).get(r, float('nan')):.0f} s"
            for r, s in result.get("seconds_per_resolution", {}).items()) + ".",
        "",
        "| impl | op | dtype | res | layout | images/s | vs diffusers fp32 | vs diffusers same dtype | vs dcae fp32 "
        + ("| vs other layout " if other else "")
        + "| GFLOP/image | GFLOP/s | of GEMM peak | peak MB | max abs diff | PSNR vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if other else "") + "---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "-"
        psnr = f"{r['psnr_vs_fp32']:.1f} dB" if "psnr_vs_fp32" in r else "-"
        impl = r["impl"] + (" (compiled)" if r.get("compiled") else "")
        row_layout = {"nchw": "NCHW", "channels_last": "channels_last"}.get(r.get("layout"), "?")
        if other and r["impl"] == "dcae" and r.get("layout_chosen"):
            row_layout += " (chosen)"
        lines.append(f"| {impl} | {r['op']} | {r['dtype']} | {r['resolution']} | {row_layout} "
                     f"| {r['images_per_s']:.3f} "
                     f"| {_ratio(r['ratio_vs_diffusers_fp32'])} | {_ratio(r.get('ratio_vs_diffusers_same_dtype'))} "
                     f"| {_ratio(r.get('ratio_vs_dcae_fp32'))} "
                     + (f"| {_ratio(r.get('ratio_vs_other_layout'))} " if other else "")
                     + f"| {r['gflop_per_image']:.0f} | {r['gflop_per_s']:.0f} "
                     f"| {100 * r['fraction_of_gemm_peak']:.0f}% | {_mb(r['peak_memory_mb'])} | {diff} | {psnr} |")
    return "\n".join(lines) + "\n"
