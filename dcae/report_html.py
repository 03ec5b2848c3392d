"""Static HTML reports that open from disk (no server, no network): model comparisons and training runs.

Every page is one index.html plus local images beside it. Text that comes from outside (file names, model names, config
values, log keys) reaches the page only through `esc` (server-rendered HTML) or as JSON read with `textContent` in the
browser (never innerHTML), so a file named `<img src=x onerror=alert(1)>.png` shows as text and runs nothing.
"""
from __future__ import annotations

import html
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from dcae.errors import DCAEError
from dcae.images import atomic_output, write_image

ERROR_SCALE = 0.25  # heat maps saturate at a mean abs error of 0.25 (64/255): one scale for every model and image
THUMBNAIL_SIDE = 96
PAGE_SIZE = 25  # table rows per page; thumbnails load lazily, full images only when a row is opened
METRICS = (("psnr", "PSNR (dB)", "higher"), ("ssim", "SSIM", "higher"), ("lpips", "LPIPS", "lower"))


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def script_json(data: Any) -> str:
    """JSON safe inside <script type="application/json">: no `</script>`, no HTML-significant characters."""
    text = json.dumps(data, allow_nan=False, default=_json_default)
    for char, code in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                       ("\u2029", "\\u2029")):
        text = text.replace(char, code)
    return text


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


def finite_or_none(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer beyond float's range (JSON allows it)
        return None
    return number if math.isfinite(number) else None


def write_text(path: Path, text: str) -> None:
    with atomic_output(path) as handle:
        handle.write(text.encode("utf-8"))


# --- images -------------------------------------------------------------------------------------------------------
_COLORMAP = torch.tensor([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]],
                         dtype=torch.float32)  # inferno at 0, 1/4, 1/2, 3/4, 1


def error_heatmap(reference: torch.Tensor, reconstruction: torch.Tensor, scale: float = ERROR_SCALE) -> torch.Tensor:
    """(3, H, W) uint8 pair -> (3, H, W) uint8 heat map of the per-pixel mean abs error, saturating at `scale`."""
    error = (reference.float() - reconstruction.float()).abs().mean(dim=0) / 255  # (H, W) in [0, 1]
    t = (error / scale).clamp(0, 1) * (len(_COLORMAP) - 1)
    low = t.floor().long().clamp(max=len(_COLORMAP) - 2)
    frac = (t - low)[..., None]
    rgb = _COLORMAP[low] * (1 - frac) + _COLORMAP[low + 1] * frac  # (H, W, 3)
    return rgb.round().to(torch.uint8).permute(2, 0, 1)


def thumbnail(image: torch.Tensor, side: int = THUMBNAIL_SIDE) -> torch.Tensor:
    """(3, H, W) uint8 -> the image shrunk (antialiased) so its longer side is at most `side`."""
    height, width = image.shape[-2:]
    scale = side / max(height, width)
    if scale >= 1:
        return image
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    small = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return small[0].round().clamp(0, 255).to(torch.uint8)


# --- the page shell -----------------------------------------------------------------------------------------------
_ASSETS = Path(__file__).with_name("assets") / "report"


def page(title: str, body: str, data: Any, script: str) -> str:
    """A complete page: inline CSS and JS, the data as JSON, nothing fetched from anywhere."""
    css = (_ASSETS / "report.css").read_text(encoding="utf-8")
    js = (_ASSETS / script).read_text(encoding="utf-8")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src 'self' data:; "
            f"style-src 'unsafe-inline'; script-src 'unsafe-inline'\">"
            f"<title>{esc(title)}</title><style>{css}</style></head><body>\n{body}\n"
            f'<script type="application/json" id="report-data">{script_json(data)}</script>\n'
            f"<script>{js}</script></body></html>\n")


def settings_table(settings: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in settings.items())
    return f'<table class="settings">{rows}</table>'


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


# --- comparison report --------------------------------------------------------------------------------------------
@dataclass
class _Row:
    name: str
    index: int
    metrics: dict[int, dict[str, float | None]] = field(default_factory=dict)


class ComparisonReport:
    """Per image: the original, each model's reconstruction, error heat maps and metrics; written as images arrive
    (so a large data set never sits in memory), then `write(means)` writes index.html."""

    def __init__(self, directory: str | os.PathLike, models: list[str], title: str = "dcae comparison",
                 settings: dict[str, Any] | None = None):
        self.directory = Path(directory)
        self.models = list(models)
        self.title = title
        self.settings = dict(settings or {})
        self.rows: dict[str, _Row] = {}
        try:
            (self.directory / "images").mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DCAEError(f"{self.directory}: cannot create report folder ({error.strerror})") from None

    def _image(self, row: _Row, kind: str) -> str:
        return f"images/{row.index:05d}-{kind}.png"  # names from indices: no user text in a path

    def add(self, model_index: int, name: str, original: torch.Tensor, reconstruction: torch.Tensor,
            metrics: dict[str, float]) -> None:
        """One image's result for model `model_index`: (3, H, W) uint8 original and reconstruction."""
        row = self.rows.get(name)
        if row is None:
            row = self.rows[name] = _Row(name, len(self.rows))
            write_image(self.directory / self._image(row, "original"), original)
            write_image(self.directory / self._image(row, "thumb"), thumbnail(original))
        write_image(self.directory / self._image(row, f"m{model_index}"), reconstruction)
        write_image(self.directory / self._image(row, f"m{model_index}-error"), error_heatmap(original, reconstruction))
        row.metrics[model_index] = {k: finite_or_none(metrics.get(k)) for k, _, _ in METRICS}

    def batch_writer(self, model_index: int, names: dict[Path, str]):
        """A callback for `dcae.commands.eval.evaluate(on_batch=...)`: names maps each file to its shown name."""
        def on_batch(paths: list[Path], images: torch.Tensor, reconstructions: torch.Tensor,
                     metrics: dict[str, torch.Tensor]) -> None:
            for i, path in enumerate(paths):
                self.add(model_index, names.get(path, str(path)), images[i].cpu(), reconstructions[i].cpu(),
                         {k: float(v[i]) for k, v in metrics.items()})
        return on_batch

    def data(self) -> dict[str, Any]:
        rows = sorted(self.rows.values(), key=lambda r: r.index)
        return {
            "models": self.models,
            "metrics": [{"key": k, "label": label, "better": better} for k, label, better in METRICS],
            "page_size": PAGE_SIZE,
            "error_scale": ERROR_SCALE,
            "rows": [{"name": r.name,
                      "original": self._image(r, "original"), "thumb": self._image(r, "thumb"),
                      "recon": [self._image(r, f"m{m}") for m in range(len(self.models))],
                      "error": [self._image(r, f"m{m}-error") for m in range(len(self.models))],
                      "metrics": [r.metrics.get(m, {}) for m in range(len(self.models))]} for r in rows],
        }

    def write(self, means: list[dict[str, Any]] | None = None) -> Path:
        """index.html with the data set means per model (psnr/ssim/lpips/rfid/n as `evaluate` returns them)."""
        means = means or [{} for _ in self.models]
        header = "".join(f"<th>{esc(label)}</th>" for _, label, _ in METRICS)
        summary = "".join(
            f"<tr><th>{esc(model)}</th><td>{esc(m.get('n', len(self.rows)))}</td>"
            + "".join(f"<td>{_fmt(finite_or_none(m.get(k)), 4)}</td>" for k, _, _ in METRICS)
            + f"<td>{_fmt(finite_or_none(m.get('rfid')), 3)}</td></tr>"
            for model, m in zip(self.models, means))
        body = (f"<h1>{esc(self.title)}</h1>{settings_table(self.settings)}"
                f'<h2>Data set means</h2><table class="summary" id="summary"><tr><th>model</th><th>n</th>{header}'
                f"<th>rFID</th></tr>{summary}</table>"
                '<h2>Image <span id="viewer-name"></span></h2>'
                '<p class="help">Wheel or +/- zooms, drag pans, double-click resets: every panel shows the same crop. '
                f"Heat maps: mean abs error per pixel, black 0 to yellow {ERROR_SCALE:g} (of the 0-1 range).</p>"
                '<div class="controls"><button id="zoom-in">+</button><button id="zoom-out">-</button>'
                '<button id="zoom-reset">reset</button> <span id="zoom-level"></span></div>'
                '<div id="viewer" class="viewer"></div>'
                '<h2>Per image</h2><p class="help">Click a column to sort, a row to open it above.</p>'
                '<div class="pager"><button id="prev">&larr; previous</button> <span id="page-info"></span> '
                '<button id="next">next &rarr;</button></div><table id="images" class="images"></table>')
        path = self.directory / "index.html"
        write_text(path, page(self.title, body, self.data(), "compare.js"))
        return path


# --- training report ----------------------------------------------------------------------------------------------
LOG_META = {"step", "event", "lr", "images_per_s", "skipped_images", "bad_steps", "time", "path"}
_STEP_FILE = re.compile(r"(?:step_)?0*(\d+)\D*\.(?:png|jpg|jpeg|webp)$", re.IGNORECASE)


def read_log(path: Path) -> list[dict[str, Any]]:
    """log.jsonl -> records; a malformed line is a DCAEError naming the file and line (a torn last line is skipped)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise DCAEError(f"{path}: cannot read: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise DCAEError(f"{path}: not a UTF-8 text file") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):  # a run killed mid-write leaves half a last line
                break
            raise DCAEError(f"{path}: line {number} is not JSON ({error.msg})") from None
        except RecursionError:
            raise DCAEError(f"{path}: line {number} is JSON nested too deeply") from None
        if not isinstance(record, dict):
            raise DCAEError(f"{path}: line {number} is not a JSON object")
        records.append(record)
    return records


def series(records: Iterable[dict[str, Any]], event: str | None) -> dict[str, list[tuple[float, float]]]:
    """{key: [(step, value), ...]} of the numeric keys of the records with this `event` (None: plain log lines)."""
    out: dict[str, list[tuple[float, float]]] = {}
    for record in records:
        step = finite_or_none(record.get("step"))
        if record.get("event") != event or step is None:
            continue
        for key, value in record.items():
            number = finite_or_none(value) if not isinstance(value, bool) else None
            if key not in ("step", "event") and number is not None:
                out.setdefault(key, []).append((step, number))
    return out


def svg_plot(title: str, lines: dict[str, list[tuple[float, float]]], width: int = 520, height: int = 240,
             log_y: bool = False) -> str:
    """An inline SVG line plot with axes, ticks and a legend; `log_y` plots log10 of positive values."""
    palette = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
    points = {k: [(x, math.log10(y) if log_y else y) for x, y in v if not log_y or y > 0] for k, v in lines.items()}
    points = {k: v for k, v in points.items() if v}
    if not points:
        return ""
    xs = [x for v in points.values() for x, _ in v]
    ys = [y for v in points.values() for _, y in v]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + abs(y0) * 0.1 + 1e-12)
    if not math.isfinite(x1) or not math.isfinite(y1):  # a flat line at +-1e308: its padding overflowed
        x1, y1 = (x1 if math.isfinite(x1) else x0), (y1 if math.isfinite(y1) else y0)
    left, right, top, bottom = 64, 12, 24, 36
    sx = lambda x: left + _fraction(x, x0, x1) * (width - left - right)  # noqa: E731
    sy = lambda y: height - bottom - _fraction(y, y0, y1) * (height - top - bottom)  # noqa: E731
    parts = [f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img"><title>{esc(title)}</title>',
             f'<text x="{left}" y="16" class="plot-title">{esc(title)}</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" class="axis"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" class="axis"/>']
    for i in range(5):
        yv, xv = y0 + (y1 - y0) * i / 4, x0 + (x1 - x0) * i / 4
        label = _power_of_ten(yv) if log_y else f"{yv:.4g}"
        parts.append(f'<text x="{left - 4}" y="{sy(yv) + 4:.1f}" class="tick" text-anchor="end">{esc(label)}</text>')
        parts.append(f'<text x="{sx(xv):.1f}" y="{height - bottom + 14}" class="tick" text-anchor="middle">'
                     f"{xv:.0f}</text>")
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 4}" class="tick" '
                 'text-anchor="middle">step</text>')
    for n, (key, v) in enumerate(sorted(points.items())):
        color = palette[n % len(palette)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in v)
        shape = (f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>' if len(v) > 1 else
                 f'<circle cx="{sx(v[0][0]):.1f}" cy="{sy(v[0][1]):.1f}" r="3" fill="{color}"/>')
        parts.append(f'<g class="series" data-key="{esc(key)}">{shape}</g>')
        parts.append(f'<text x="{width - right - 4}" y="{top + 12 + 13 * n}" text-anchor="end" fill="{color}" '
                     f'class="legend">{esc(key)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _fraction(value: float, low: float, high: float) -> float:
    """Where `value` lies from `low` (0) to `high` (1); halved first, so that a span of +-1e308 does not overflow."""
    return (value / 2 - low / 2) / (high / 2 - low / 2) if high > low else 0.5


def _power_of_ten(exponent: float) -> str:
    """10 ** exponent as a tick label; past float's range, written as 1e+N."""
    try:
        return f"{10 ** exponent:.3g}"
    except OverflowError:
        return f"1e+{exponent:.0f}"


def sample_images(run: Path) -> list[tuple[int, Path]]:
    """(step, file) for each image under RUN/samples named after its step (step_00000500.png), by step."""
    folder = run / "samples"
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            match = _STEP_FILE.search(path.name)
            if match and path.is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def training_report(run: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """RUN/log.jsonl (+ RUN/samples/) -> OUTPUT/index.html (default RUN/report): loss terms, validation metrics,
    learning rate and throughput over steps as inline SVG, events, and the sample images over time."""
    run = Path(run)
    log = run / "log.jsonl"
    if not log.is_file():
        raise DCAEError(f"{run}: no log.jsonl (not a training run directory)")
    records = read_log(log)
    directory = Path(output) if output is not None else run / "report"
    train, val = series(records, None), series(records, "val")
    norms = {k: v for k, v in train.items() if k.endswith("norm")}  # gradient norms: not losses, own scale
    losses = {k: v for k, v in train.items() if k not in LOG_META and k not in norms}
    plots = [svg_plot("training losses (log scale)", losses, log_y=True),
             svg_plot("gradient norm (log scale)", norms, log_y=True),
             *(svg_plot(f"validation {k.removeprefix('val_')}", {k: v}) for k, v in sorted(val.items())),
             svg_plot("learning rate", {k: v for k, v in train.items() if k == "lr"}),
             svg_plot("throughput (images/s)", {k: v for k, v in train.items() if k == "images_per_s"})]
    plots = [p for p in plots if p]
    events = [r for r in records if r.get("event") not in (None, "val")]
    event_rows = "".join(
        f"<tr><td>{esc(r.get('step', ''))}</td><td>{esc(r.get('event'))}</td><td>"
        + esc(", ".join(f"{k}={v}" for k, v in r.items() if k not in ("step", "event"))) + "</td></tr>"
        for r in events)
    samples = sample_images(run)
    copied = []
    for step, path in samples:
        target = directory / "samples" / f"step_{step:08d}{path.suffix.lower()}"
        try:
            data = path.read_bytes()
        except OSError as error:
            raise DCAEError(f"{path}: cannot read: {error.strerror or error}") from None
        with atomic_output(target) as handle:
            handle.write(data)
        copied.append({"step": step, "src": f"samples/{target.name}"})
    last = {k: v[-1][1] for k, v in {**train, **val}.items()}
    settings = {"run": run.resolve(), "log lines": len(records),
                "last step": max((int(step) for r in records if (step := finite_or_none(r.get("step"))) is not None),
                                 default="n/a")}
    settings.update({f"last {k}": f"{v:.5g}" for k, v in sorted(last.items())})
    config = run / "config.json"
    config_text = config.read_text(encoding="utf-8", errors="replace") if config.is_file() else ""
    body = (f"<h1>Training run {esc(run.name)}</h1>{settings_table(settings)}"
            f'<h2>Curves</h2><div class="plots">{"".join(plots) or "<p>no numeric log lines yet</p>"}</div>'
            + ('<h2>Samples over time</h2><p class="help">Validation images over their reconstructions (autoencoder) '
               'or sample grids (diffusion), as the run saved them.</p>'
               '<input type="range" id="sample-step" min="0" value="0"> <span id="sample-label"></span>'
               '<div><img id="sample-image" class="sample" alt="sample grid"></div>' if copied else "")
            + (f'<h2>Events</h2><table class="events"><tr><th>step</th><th>event</th><th>details</th></tr>'
               f"{event_rows}</table>" if events else "")
            + (f"<h2>Config</h2><pre>{esc(config_text)}</pre>" if config_text else ""))
    path = directory / "index.html"
    write_text(path, page(f"dcae run {run.name}", body, {"samples": copied}, "training.js"))
    return path
