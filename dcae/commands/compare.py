"""`dcae compare --model A --model B --data DIR -o OUT`: one static page comparing the models' reconstructions
image by image (synchronized zoom, error heat maps, sortable per-image PSNR/SSIM/LPIPS, data set means and rFID)."""
from __future__ import annotations

import argparse
from pathlib import Path

from dcae.commands.eval import add_pipeline_arguments, evaluate, find_eval_images, reference_key
from dcae.errors import DCAEError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", required=True, metavar="MODEL",
                        help="checkpoint dir/.safetensors, Hub id or preset name; repeat for each model")
    parser.add_argument("--data", required=True, type=Path, help="folder of images (searched recursively)")
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="DIR", help="folder for index.html")
    parser.add_argument("--resolution", type=int, default=256,
                        help="ADM centre-crop size R, as in dcae eval (default: 256)")
    add_pipeline_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from dcae.metrics import FeatureStats
    from dcae.report_html import ComparisonReport
    from dcae.runtime import Runtime, load_model

    found = find_eval_images(args)
    files, names = [p for p, _ in found], {p: str(rel) for p, rel in found}
    runtime = Runtime.choose(args.device, args.dtype)
    runtime.announce("compare")
    report = ComparisonReport(args.output, args.model, title=f"dcae compare: {len(args.model)} models",
                              settings={"data": args.data, "resolution": args.resolution, "images": len(files),
                                        **{f"model {i + 1}": m for i, m in enumerate(args.model)}})
    cache_dir = args.stats_cache or Path.home() / ".cache" / "dcae" / "fid_stats"
    cache = cache_dir / f"{reference_key(files, args.resolution)}.npz"
    reference = FeatureStats.load(cache) if cache.is_file() else None
    means = []
    for index, spec in enumerate(args.model):
        model, _ = load_model(spec, runtime.device, "compare")
        factor = int(getattr(model, "spatial_factor", 1))
        if args.resolution % factor:
            raise DCAEError(f"--resolution {args.resolution} is not a multiple of {spec}'s spatial factor {factor}")
        result, ref_stats = evaluate(model, files, args.resolution, args.batch_size, runtime.device, reference,
                                     runtime=runtime, on_batch=report.batch_writer(index, names))
        if reference is None and ref_stats.n >= 2:
            ref_stats.save(cache)
            reference = ref_stats
        means.append(result)
        rfid = "n/a (needs 2+ images)" if result["rfid"] is None else f"{result['rfid']:.4f}"
        print(f"{spec}: psnr {result['psnr']:.3f}  ssim {result['ssim']:.4f}  lpips {result['lpips']:.4f}  rfid {rfid}")
        del model
    print(f"wrote {report.write(means)}")
    return 0
