"""Screenshots of each HTML report for docs/reports.md: a comparison page and a training-run page.

    python scripts/screenshots.py [--data FOLDER] [--run RUN] [--out docs/figures]

The comparison is the embedded default model against a random-weight tiny-f8c4 on a few Kodak crops; the training
page is RUN's (default: a 16-step tiny-f8c4 run trained here on CPU). Needs playwright and a
Chromium (apt-get install chromium); no browser download.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def dcae(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "dcae.cli", *args], check=True, cwd=REPO)


def crops(source: Path, target: Path, count: int = 6, size: int = 128) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.glob("*.png"))[:count]:
        image = Image.open(path).convert("RGB")
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image.crop((left, top, left + size, top + size)).save(target / path.name)
    return target


def shoot(pages: dict[str, Path], out: Path, chromium: str) -> None:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(profile, executable_path=chromium, headless=True,
                                                                args=ARGS, viewport={"width": 1400, "height": 1100})
        for name, index in pages.items():
            page = context.new_page()
            page.goto(index.resolve().as_uri())
            page.wait_for_load_state("load")
            if name == "report_compare":  # zoom in on the panels, as a reader would
                box = page.locator(".viewport").nth(1).bounding_box()
                page.mouse.move(box["x"] + 160, box["y"] + 160)
                for _ in range(3):
                    page.mouse.wheel(0, -200)
                page.wait_for_timeout(200)
            page.screenshot(path=str(out / f"{name}.png"), full_page=name == "report_training")
            page.close()
        context.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "kodak24")
    parser.add_argument("--run", type=Path, default=None, help="a training run (default: train a short one)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "figures")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        data = crops(args.data, work / "data")
        dcae("compare", "--model", "dcae/assets/default-f32c32", "--model", "dc-ae-tiny-f8c4", "--data", str(data),
             "--resolution", "128", "-o", str(work / "compare"), "--stats-cache", str(work / "stats"))
        run = args.run
        if run is None:
            run = work / "run"
            dcae("train", "--preset", "dc-ae-tiny-f8c4", "--data", str(data), "--val-data", str(data), "--phase", "1",
                 "--steps", "16", "--batch-size", "2", "--resolution", "32", "--run-dir", str(run),
                 "log_every=2", "val_every=4", "ckpt_every=16", "data.num_workers=0")
        dcae("report", str(run), "-o", str(work / "report"))
        args.out.mkdir(parents=True, exist_ok=True)
        shoot({"report_compare": work / "compare" / "index.html", "report_training": work / "report" / "index.html"},
              args.out, args.chromium)
    print(f"wrote {args.out / 'report_compare.png'} and {args.out / 'report_training.png'}")


if __name__ == "__main__":
    main()
