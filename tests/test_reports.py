"""HTML reports: the page writers (escaping, heat maps, logs), the commands, and the pages loaded in headless Chromium
(no console errors, images decode, the table sorts, the zoom moves every panel, a hostile file name stays text)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from dcae.cli import main
from dcae.errors import DCAEError
from dcae.report_html import ComparisonReport, error_heatmap, read_log, script_json, svg_plot, training_report

XSS = "<img src=x onerror=alert(1)>"
CLOSE_TAGS = "</pre></script><script>alert(2)</script>"  # a string that would end the element it is shown in
KODAK = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kodak24"


def synthetic_report(directory: Path, images: int = 30) -> Path:
    """A two-model comparison of `images` 48x64 images (more than a page), the first named XSS + '.png'."""
    generator = torch.Generator().manual_seed(0)
    report = ComparisonReport(directory, [f"model {XSS}", "b&b"], settings={"data": f"/data/{XSS}"})
    for i in range(images):
        original = torch.randint(0, 256, (3, 48, 64), generator=generator, dtype=torch.uint8)
        for m in range(2):
            noise = torch.randint(-8 * (m + 1), 8 * (m + 1) + 1, original.shape, generator=generator)
            recon = (original.int() + noise).clamp(0, 255).to(torch.uint8)
            report.add(m, f"{XSS}.png" if i == 0 else f"img{i:02d}.png", original, recon,
                       {"psnr": 30.0 - m + (i * 7 % 13) / 10, "ssim": 0.9 - i / 100, "lpips": 0.1 + i / 200})
    return report.write([{"psnr": 30.0, "ssim": 0.8, "lpips": 0.1, "rfid": 1.5, "n": images}, {"n": images}])


def training_run(directory: Path) -> Path:
    """A run directory as dcae train writes it: log lines, validation events, a checkpoint event, sample grids; its
    name, a log key, log values, a config string and a sample file name are hostile HTML."""
    run = directory / XSS
    (run / "samples").mkdir(parents=True)
    lines = [{"event": "start", "step": 0, "device": "cpu", "note": CLOSE_TAGS}]
    for step in range(10, 101, 10):
        lines.append({"step": step, "lr": 1e-4 * min(1, step / 50), "images_per_s": 20 + step / 10,
                      "loss": 1 / step, "l1": 0.5 / step, "lpips": 0.3 / step, XSS: 1.0})
        if step % 50 == 0:
            lines.append({"event": "val", "step": step, "val_psnr": 20 + step / 50, "val_lpips": 0.5 - step / 500})
            name = f"step_{step:08d}.png" if step == 50 else f"step_{step:08d}<img src=x onerror=alert(this)>.png"
            Image.new("RGB", (64, 32), (step, 0, 0)).save(run / "samples" / name)
    lines.append({"event": "checkpoint", "step": 100, "path": f"checkpoints/{XSS}"})
    (run / "log.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    (run / "config.json").write_text(json.dumps({"name": XSS, "data": {"path": CLOSE_TAGS}}, indent=2))
    return run


# --- writers ------------------------------------------------------------------------------------------------------
def test_script_json_cannot_close_the_script_tag():
    text = script_json({"name": "</script><script>alert(1)</script>", "amp": "a&b"})
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == {"name": "</script><script>alert(1)</script>", "amp": "a&b"}


def test_hostile_strings_are_escaped_in_the_html(tmp_path):
    index = synthetic_report(tmp_path, images=2)
    text = index.read_text()
    assert XSS not in text  # neither in the server-rendered HTML nor in the JSON block
    assert "&lt;img src=x onerror=alert(1)&gt;" in text  # the settings row and the means row show it as text
    assert not any("alert" in p.name for p in (tmp_path / "images").iterdir())  # file names come from indices


def test_error_heatmap_scale():
    a = torch.zeros(3, 2, 2, dtype=torch.uint8)
    b = a.clone()
    b[:, 0, 0] = 255  # error 1.0: saturated (yellow)
    b[:, 0, 1] = 32  # error 0.125: half the scale
    heat = error_heatmap(a, b)
    assert heat[:, 1, 1].tolist() == [0, 0, 4]  # no error: the colormap's black
    assert heat[:, 0, 0].tolist() == [252, 255, 164]
    assert heat[:, 0, 1].tolist() == [188, 56, 83]  # 32/255 = 0.1255: 0.8% of the way past the middle stop


def test_read_log_names_the_bad_line(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 0.5}\nnot json\n{"step": 2}\n')
    with pytest.raises(DCAEError, match=r"log.jsonl: line 2 is not JSON"):
        read_log(log)
    log.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')  # a torn last line from a killed run
    assert read_log(log) == [{"step": 1, "loss": 0.5}]


def test_svg_plot_log_scale_drops_non_positive_values():
    svg = svg_plot("t", {"a": [(0, 1.0), (1, 0.0), (2, 0.01)]}, log_y=True)
    assert svg.count(",") == 2 + 0 and "polyline" in svg  # two points survive
    assert svg_plot("t", {"a": [(0, 0.0)]}, log_y=True) == ""


def test_training_report_command(tmp_path, capsys):
    run = training_run(tmp_path)
    assert main(["report", str(run)]) == 0
    text = (run / "report" / "index.html").read_text()
    assert XSS not in text and text.count("<svg") == 5  # losses, val psnr, val lpips, lr, throughput
    # The run's name (title, heading, settings), a log key (legend), log values (events), config strings (the config
    # block) and a sample's file name reach the page as text only.
    assert CLOSE_TAGS not in text and "alert(2)" in text and text.count("<script") == 2
    assert text.count("&lt;img src=x onerror=alert(1)&gt;") >= 4 and "onerror=alert(this)" not in text
    assert sorted(p.name for p in (run / "report" / "samples").iterdir()) == ["step_00000050.png",
                                                                              "step_00000100.png"]
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no log.jsonl" in capsys.readouterr().err


def small_folder(tmp_path: Path) -> Path:
    if not KODAK.exists():
        pytest.skip("shared data missing (kodak24)")
    data = tmp_path / "data"
    data.mkdir()
    for i, name in ((2, f"{XSS}.png"), (8, "b.png")):
        Image.open(KODAK / f"kodim{i:02d}.png").convert("RGB").crop((200, 150, 264, 214)).save(data / name)
    return data


def test_compare_and_eval_html(tmp_path, capsys):
    data = small_folder(tmp_path)
    out = tmp_path / "cmp"
    assert main(["compare", "--model", "dc-ae-tiny-f8c4", "--model", "dcae/assets/default-f32c32", "--data",
                 str(data), "--resolution", "32", "-o", str(out), "--device", "cpu",
                 "--stats-cache", str(tmp_path / "stats")]) == 0
    payload = json.loads(_data_block((out / "index.html").read_text()))
    assert payload["models"] == ["dc-ae-tiny-f8c4", "dcae/assets/default-f32c32"]
    assert sorted(r["name"] for r in payload["rows"]) == sorted([f"{XSS}.png", "b.png"])
    for row in payload["rows"]:
        assert all((out / p).is_file() for p in [row["original"], row["thumb"], *row["recon"], *row["error"]])
        assert row["metrics"][1]["psnr"] > row["metrics"][0]["psnr"]  # trained beats random weights
    assert "rfid" in capsys.readouterr().out
    html_dir = tmp_path / "eval"
    assert main(["eval", "--model", "dcae/assets/default-f32c32", "--data", str(data), "--resolution", "32",
                 "--html", str(html_dir), "--device", "cpu", "--stats-cache", str(tmp_path / "stats")]) == 0
    payload = json.loads(_data_block((html_dir / "index.html").read_text()))
    assert len(payload["rows"]) == 2 and payload["rows"][0]["metrics"][0]["lpips"] is not None


def _data_block(text: str) -> str:
    start = text.index('id="report-data">') + len('id="report-data">')
    return text[start:text.index("</script>", start)]


# --- in a real browser --------------------------------------------------------------------------------------------
def chromium_path() -> str | None:
    for candidate in (os.environ.get("DCAE_CHROMIUM"), "/usr/lib/chromium/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (pip install playwright; no browser download)")
    executable = chromium_path()
    if executable is None:
        pytest.skip("chromium is not installed (apt-get install chromium), or set DCAE_CHROMIUM")
    with tempfile.TemporaryDirectory() as profile, sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=executable, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 2400})
        yield context
        context.close()


def open_page(browser, index: Path):
    """Load a page; returns (page, problems): console errors, uncaught exceptions, dialogs, non-file requests."""
    page = browser.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
            else None)
    page.on("pageerror", lambda e: problems.append(f"exception: {e}"))
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    page.on("request", lambda r: problems.append(f"request: {r.url}") if not r.url.startswith("file:") else None)
    page.goto(index.resolve().as_uri())
    page.wait_for_load_state("load")
    return page, problems


def all_images_decode(page, selector: str) -> bool:
    return page.evaluate("""async (sel) => {
        const imgs = [...document.querySelectorAll(sel)];
        await Promise.all(imgs.map(i => i.decode().catch(() => null)));
        return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);
    }""", selector)


def transforms(page) -> list[str]:
    return page.eval_on_selector_all("#viewer img", "imgs => imgs.map(i => i.style.transform)")


def test_comparison_page_in_chromium(browser, tmp_path):
    index = synthetic_report(tmp_path)
    page, problems = open_page(browser, index)
    assert all_images_decode(page, "#viewer img") and all_images_decode(page, "img.thumb")
    assert page.locator("#viewer img").count() == 5  # original, 2 reconstructions, 2 heat maps
    # The hostile name is text, in the viewer title and the table; nothing ran, no element was injected.
    assert page.inner_text("#viewer-name") == f"{XSS}.png"
    assert page.locator("td.name", has_text=XSS).count() == 1
    assert page.locator('img[src="x"]').count() == 0
    # Paging: 30 images at 25 a page.
    assert page.locator("#images tbody tr").count() == 25
    page.click("#next")
    assert page.locator("#images tbody tr").count() == 5
    # Sorting by model 0's PSNR: descending first (higher is better), then ascending.
    header = page.locator("#images th", has_text="b&b PSNR")
    header.click()
    first_page = [float(x) for x in page.eval_on_selector_all(
        "#images tbody tr", "rows => rows.map(r => r.children[3 + 3].textContent)")]
    assert first_page == sorted(first_page, reverse=True) and len(first_page) == 25
    header.click()
    ascending = [float(x) for x in page.eval_on_selector_all(
        "#images tbody tr", "rows => rows.map(r => r.children[3 + 3].textContent)")]
    assert ascending == sorted(ascending) and ascending[0] <= first_page[-1]
    # Zoom on one panel moves them all: the same transform everywhere, and not the identity.
    assert len(set(transforms(page))) == 1
    viewports = page.locator(".viewport")
    box = viewports.nth(1).bounding_box()
    page.mouse.move(box["x"] + 100, box["y"] + 80)
    page.mouse.wheel(0, -300)
    page.wait_for_function("document.querySelector('#viewer img').style.transform.includes('scale(1.25')")
    zoomed = transforms(page)
    assert len(set(zoomed)) == 1 and "scale(1)" not in zoomed[0]
    box = viewports.nth(3).bounding_box()  # drag on another panel
    page.mouse.move(box["x"] + 150, box["y"] + 150)
    page.mouse.down()
    page.mouse.move(box["x"] + 110, box["y"] + 120, steps=4)
    page.mouse.up()
    panned = transforms(page)
    assert len(set(panned)) == 1 and panned[0] != zoomed[0]
    # Opening another image keeps the crop.
    page.locator("#images tbody tr").nth(2).click()
    assert page.inner_text("#viewer-name") != f"{XSS}.png" and len(set(transforms(page))) == 1
    assert transforms(page)[0] == panned[0]
    assert problems == []
    page.close()


def test_training_page_in_chromium(browser, tmp_path):
    run = training_run(tmp_path)
    page, problems = open_page(browser, training_report(run))
    assert page.locator("svg.plot").count() == 5
    assert all_images_decode(page, "#sample-image")
    assert page.inner_text("#sample-label").startswith("step 100")
    page.locator("#sample-step").fill("0")
    page.wait_for_function("document.getElementById('sample-image').src.endsWith('step_00000050.png')")
    assert page.inner_text("#sample-label").startswith("step 50")
    body = page.inner_text("body")
    assert XSS in body and CLOSE_TAGS in body  # the hostile names, log contents and config strings show as text
    assert XSS in page.title() and XSS in page.inner_text("h1")
    assert page.locator('img[src="x"]').count() == 0 and page.locator("script").count() == 2
    assert problems == []  # no dialog: nothing ran
    page.close()


# --- TensorBoard --------------------------------------------------------------------------------------------------
def test_tensorboard_logger_is_a_no_op_without_a_folder():
    from dcae.tensorboard import TensorBoardLogger

    with TensorBoardLogger(None) as tb:
        assert not tb.enabled
        tb.scalars(1, {"loss": 0.5})
        tb.image(1, "samples", torch.zeros(3, 4, 4, dtype=torch.uint8))


def test_tensorboard_logger_writes_scalars_and_images(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dcae.tensorboard import TensorBoardLogger

    with TensorBoardLogger(tmp_path / "tb") as tb:
        tb.scalars(10, {"loss": 0.5, "lr": torch.tensor(1e-4), "event": "val", "nan": float("nan")}, prefix="train/")
        tb.scalars(20, {"loss": 0.25}, prefix="train/")
        tb.image(20, "samples", torch.full((3, 8, 16), 200, dtype=torch.uint8))
        with pytest.raises(ValueError, match="uint8"):
            tb.image(20, "samples", torch.zeros(3, 8, 16))
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert sorted(events.Tags()["scalars"]) == ["train/loss", "train/lr"]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(10, 0.5), (20, 0.25)]
    [image] = events.Images("samples")
    assert (image.step, image.width, image.height) == (20, 16, 8)
