"""Peak memory of tiled vs untiled decoding, and how far tiled output departs from untiled output.

Memory: decodes random latents of 2048x2048 and 4096x4096 images with the full `dc-ae-f32c32-in-1.0` preset
(random weights: memory and time do not depend on the weights), each case in a fresh subprocess whose peak RSS
is read with os.wait4 (the child's own ru_maxrss). Untiled decoding of the largest size is skipped when its
memory or time, extrapolated from the smaller untiled run, would exceed what the machine has (--max-untiled-minutes).
Quality: PSNR between tiled and untiled reconstructions (encode + decode) of Kodak images with the tiny preset and,
when given (--trained DIR), a trained checkpoint.

Writes results/tiled_memory.json and the tables between the markers in docs/images.md.

    python -m benchmarks.tiled_memory        # the full run, from the repository root (CPU: about an hour on 2 cores)
    python -m benchmarks.tiled_memory --sizes 512 1024 --skip-quality --json /tmp/t.json --doc none   # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import dcae
from dcae.images import from_model_range, read_image, to_model_range
from dcae.metrics import psnr
from dcae.provenance import file_sha256, model_file, provenance
from dcae.tiling import MemoryBudget, activation_bytes_per_pixel, decode_latent, encode_image, resolve_tile, tile_spans

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
BEGIN, END = "<!-- BEGIN benchmarks/tiled_memory.py -->", "<!-- END benchmarks/tiled_memory.py -->"


# --- one case, in a child process ------------------------------------------------------------------------------------
def child(spec: dict) -> None:
    """Build the preset, decode one random latent as asked, print a JSON line; peak RSS is read by the parent."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = dcae.create_model(spec["preset"]).eval()
    result: dict = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    if spec["mode"] != "model-only":
        f, c = model.spatial_factor, model.latent_channels
        generator = torch.Generator().manual_seed(spec["size"])
        z = torch.randn(1, c, spec["size"] // f, spec["size"] // f, generator=generator)  # (1, c, h, w)
        tile = spec["tile"] if spec["mode"] == "tiled" else "none"
        start = time.perf_counter()
        with torch.inference_mode():
            y = decode_latent(model, z, tile=tile, overlap=spec["overlap"])  # (1, 3, S, S)
        result["seconds"] = time.perf_counter() - start
        result["finite"] = bool(torch.isfinite(y).all())
        if spec.get("save"):
            np.save(spec["save"], from_model_range(y[0]).numpy())
    print(json.dumps(result), flush=True)


def run_case(spec: dict) -> dict:
    """Run `child(spec)` in a fresh interpreter -> its JSON result plus peak RSS (GB) from os.wait4."""
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.tiled_memory", "--child", json.dumps(spec)],
                               stdout=subprocess.PIPE, cwd=REPO)
    start = time.perf_counter()
    output = process.stdout.read().decode()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"case {spec} failed with exit status {process.returncode}")
    result = json.loads(output.strip().splitlines()[-1])
    result.update(spec, peak_rss_gb=usage.ru_maxrss * 1024 / 1e9, wall_seconds=time.perf_counter() - start)
    result.pop("save", None)
    return result


def mem_available_gb() -> float:
    match = re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    return int(match.group(1)) * 1024 / 1e9


def tile_count(size: int, factor: int, tile: int, overlap: int) -> int:
    plan = resolve_tile(tile, size, size, factor, overlap)
    if plan is None:
        return 1
    return len(tile_spans(size // factor, plan[0] // factor, plan[1] // factor)) ** 2


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    ta, tb = (torch.from_numpy(v)[None].float() / 255 for v in (a, b))
    return float(psnr(ta, tb)[0])


def memory_benchmark(args: argparse.Namespace, save: Callable[[dict], None]) -> dict:
    """Model-only baseline; tiled decodes, largest first (the bound that matters); then guarded untiled decodes.

    `save(section)` is called after every case, so a run cut short still leaves its finished cases on disk.
    """
    factor = dcae.get_config(args.preset).spatial_factor
    base = {"preset": args.preset, "tile": args.tile, "overlap": args.overlap, "threads": args.threads}
    section: dict = {"cases": [], "notes": []}

    def record(result: dict) -> None:
        section["cases"].append(result)
        save(section)
        print(f"{result['size']}x{result['size']} {result['mode']}: {result['peak_rss_gb']:.2f} GB peak RSS, "
              f"{result.get('seconds', 0):.0f} s, {result.get('tiles', 0)} tiles", flush=True)

    record(run_case({**base, "mode": "model-only", "size": 0}))
    baseline_gb = section["cases"][0]["peak_rss_gb"]
    with tempfile.TemporaryDirectory() as scratch:
        for size in sorted(args.sizes, reverse=True):
            result = run_case({**base, "mode": "tiled", "size": size, "save": str(Path(scratch) / f"tiled_{size}.npy")})
            record({**result, "tiles": tile_count(size, factor, args.tile, args.overlap)})
        per_pixel = None  # (GB above the model-only baseline, seconds) per pixel, from the last untiled run
        for size in sorted(args.sizes):
            pixels = size * size
            if per_pixel is not None:
                est_gb, est_min, available = baseline_gb + per_pixel[0] * pixels, per_pixel[1] * pixels / 60, \
                    mem_available_gb()
                if est_gb > 0.8 * available or est_min > args.max_untiled_minutes:
                    section["notes"].append(
                        f"untiled {size}x{size} skipped: extrapolated from the smaller untiled run it needs "
                        f"~{est_gb:.1f} GB peak RSS (80% of available: {0.8 * available:.1f} GB) and ~{est_min:.0f} "
                        f"min (limit --max-untiled-minutes {args.max_untiled_minutes:g})")
                    save(section)
                    print(section["notes"][-1], flush=True)
                    continue
            result = run_case({**base, "mode": "untiled", "size": size,
                               "save": str(Path(scratch) / f"untiled_{size}.npy")})
            result["tiles"] = 1
            result["psnr_tiled_vs_untiled_db"] = psnr_uint8(*(np.load(Path(scratch) / f"{m}_{size}.npy")
                                                             for m in ("untiled", "tiled")))
            per_pixel = (max(result["peak_rss_gb"] - baseline_gb, 0.0) / pixels, result["seconds"] / pixels)
            record(result)
    return section


# --- tiled vs untiled reconstructions (in process, small models) -----------------------------------------------------
def quality_benchmark(args: argparse.Namespace) -> list[dict]:
    """PSNR(tiled, untiled) of encode+decode reconstructions of Kodak images for several tile/overlap settings."""
    images = [read_image(DATA / "kodak24" / name) for name in args.kodak]
    models = [("dc-ae-tiny-f32c32 (random weights)", "dc-ae-tiny-f32c32")]
    models += [(f"{Path(p).name} (sha256 {file_sha256(model_file(p))[:12]})", p) for p in args.trained]
    rows = []
    for label, spec in models:
        torch.manual_seed(0)
        model = (dcae.create_model(spec) if spec in dcae.list_presets() else dcae.DCAE.from_pretrained(spec)).eval()
        f = model.spatial_factor
        sources = [to_model_range(image)[None] for image in images]  # (1, 3, H, W) each
        with torch.inference_mode():
            wholes = [from_model_range(decode_latent(model, encode_image(model, x, tile="none"), tuple(x.shape[-2:]),
                                                     tile="none")) for x in sources]
        for tile, overlap in [(t, o) for t in args.quality_tiles for o in (0, f, 2 * f, 4 * f) if o < t]:
            values, vs_source_tiled, vs_source_whole = [], [], []
            for image, x, whole in zip(images, sources, wholes):
                with torch.inference_mode():
                    z = encode_image(model, x, tile=tile, overlap=overlap)
                    tiled = from_model_range(decode_latent(model, z, tuple(x.shape[-2:]), tile=tile, overlap=overlap))
                values.append(float(psnr(whole.float() / 255, tiled.float() / 255)[0]))
                vs_source_whole.append(float(psnr(image[None].float() / 255, whole.float() / 255)[0]))
                vs_source_tiled.append(float(psnr(image[None].float() / 255, tiled.float() / 255)[0]))
            rows.append({"model": label, "tile": tile, "overlap": overlap, "images": len(images),
                         "psnr_tiled_vs_untiled_db": float(np.mean(values)),
                         "psnr_untiled_vs_source_db": float(np.mean(vs_source_whole)),
                         "psnr_tiled_vs_source_db": float(np.mean(vs_source_tiled))})
            print(rows[-1], flush=True)
    return rows


# --- report ----------------------------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    dates = "; ".join(f"{key} measured {report[f'{key}_date']}" for key in ("memory", "quality")
                      if report.get(f"{key}_date"))
    lines = [f"Generated by `python -m benchmarks.tiled_memory` on {report['machine']} "
             f"({report['date']}, torch {report['torch']}{'; ' + dates if dates else ''}); raw numbers in "
             "`results/tiled_memory.json`.", ""]
    memory = report.get("memory")
    if not memory:
        lines += ["Peak memory: not measured yet. `python -m benchmarks.tiled_memory --skip-quality` measures it; at "
                  "the default sizes it decodes 81 + 25 tiles of 512 px and one untiled 2048 px image with the "
                  "323M-parameter model, which needs a CPU that other jobs leave free.", ""]
    else:
        base = memory["cases"][0]
        lines += [f"Peak RSS of one decode with `{base['preset']}` ({base['params_m']:.0f}M parameters, random "
                  f"weights), each case in a fresh process with {base.get('threads', 'default')} torch thread(s). "
                  f"Building the model alone peaks at "
                  f"{base['peak_rss_gb']:.2f} GB. Tiled runs use tile {base['tile']} px, overlap {base['overlap']} px.",
                  "'Above the model' is the peak minus that; 'estimate' is what `--max-memory` budgets for one pass "
                  "(one tile, or the whole image untiled) by `dcae.tiling.activation_bytes_per_pixel`: an upper "
                  "bound by design.",
                  "", "| image | latent | mode | tiles | peak RSS (GB) | above the model (GB) | estimate of one pass "
                  "(GB) | decode time (s) | PSNR tiled vs untiled (dB) |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        with torch.device("meta"):
            per_pixel = activation_bytes_per_pixel(dcae.create_model(base["preset"]), ("decode",))
        for case in sorted(memory["cases"][1:], key=lambda c: (c["size"], c["mode"])):
            size, factor = case["size"], dcae.get_config(case["preset"]).spatial_factor
            latent = f"{dcae.get_config(case['preset']).latent_channels}x{size // factor}x{size // factor}"
            value = case.get("psnr_tiled_vs_untiled_db")
            psnr_text = "" if value is None else ("identical" if value == float("inf") else f"{value:.2f}")
            pixels = size * size if case["mode"] == "untiled" else min(size, case["tile"]) ** 2
            estimate = MemoryBudget(0, per_pixel).needed_gb(pixels)
            lines.append(f"| {size}x{size} | {latent} | {case['mode']} | {case['tiles']} | {case['peak_rss_gb']:.2f} "
                         f"| {case['peak_rss_gb'] - base['peak_rss_gb']:.2f} | {estimate:.2f} "
                         f"| {case['seconds']:.0f} | {psnr_text} |")
        lines += [""] + [f"- {note}" for note in memory["notes"]] + [""]
    quality = report.get("quality")
    if quality:
        lines += ["Tiled vs untiled reconstructions (encode and decode both tiled), mean over "
                  f"{quality[0]['images']} Kodak images:", "",
                  "| model | tile (px) | overlap (px) | PSNR tiled vs untiled (dB) "
                  "| PSNR vs source: untiled / tiled (dB) |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for row in quality:
            lines.append(f"| {row['model']} | {row['tile']} | {row['overlap']} | "
                         f"{row['psnr_tiled_vs_untiled_db']:.2f} | {row['psnr_untiled_vs_source_db']:.2f} / "
                         f"{row['psnr_tiled_vs_source_db']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def write_doc(path: Path, text: str) -> None:
    doc = path.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{path}: markers {BEGIN} / {END} not found")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--preset", default="dc-ae-f32c32-in-1.0")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--tile", type=int, default=512, help="tile side in pixels for the tiled runs")
    parser.add_argument("--overlap", type=int, default=64, help="tile overlap in pixels for the tiled runs")
    parser.add_argument("--max-untiled-minutes", type=float, default=15.0,
                        help="skip an untiled decode whose extrapolated time is longer")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared CPU, 2 OpenMP threads can be 40x slower)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--kodak", nargs="+", default=["kodim03.png", "kodim23.png"])
    parser.add_argument("--quality-tiles", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--trained", nargs="*", default=[], metavar="DIR", help="trained checkpoints to add")
    parser.add_argument("--json", default=str(REPO / "results" / "tiled_memory.json"))
    parser.add_argument("--doc", default=str(REPO / "docs" / "images.md"), help="'none' to leave the docs alone")
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    torch.set_num_threads(args.threads)
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {mem_available_gb():.0f} GB available",
              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "args": vars(args),
              "provenance": provenance({Path(p).name: p for p in args.trained})}
    json_path = Path(args.json)
    if json_path.exists():  # keep the sections this run skips
        previous = json.loads(json_path.read_text())
        for key in ("quality", "memory"):  # each section keeps the date it was measured on
            if key in previous:
                report[key], report[f"{key}_date"] = previous[key], previous.get(f"{key}_date", previous["date"])

    def save(key: str, section: object) -> None:
        report[key], report[f"{key}_date"] = section, report["date"]
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        if args.doc != "none":
            write_doc(Path(args.doc), markdown(report))

    if not args.skip_quality:
        save("quality", quality_benchmark(args))
    if not args.skip_memory:
        memory_benchmark(args, lambda section: save("memory", section))
    if args.skip_memory and args.skip_quality and args.doc != "none":
        write_doc(Path(args.doc), markdown(report))  # both skipped: re-render the tables from the JSON
    print(markdown(report))

if __name__ == "__main__":
    main()
