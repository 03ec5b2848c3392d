"""Figures from results JSONs: reconstruction quality against the number of kept latent channels (DC-AE 1.5).

    from dcae.report_plots import plot_channel_sweep
    plot_channel_sweep({"tiny-1.5": json.load(open("a.json")), "f32c128-1.5": json.load(open("b.json"))}, "sweep.png")

Pure functions of their inputs (no pyplot state, no reading files): `dcae eval --channels ... --plot` draws one model,
an experiment script draws several on one figure. matplotlib (the `experiments` extra) is imported when a figure is
drawn, never at import time.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dcae.errors import DCAEError
from dcae.files import atomic_output

SWEEP_METRICS = (("psnr", "PSNR (dB)", "higher"), ("ssim", "SSIM", "higher"), ("lpips", "LPIPS", "lower"),
                 ("rfid", "rFID", "lower"))


def require_matplotlib(what: str = "plotting") -> None:
    """A one-line DCAEError when matplotlib is missing (check before a long run, not after it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DCAEError(f"{what} needs matplotlib: pip install 'dcae[experiments]' (or matplotlib>=3.8)") from None


def sweep_points(result: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The per-channel entries of a `dcae eval --channels` JSON (or that list itself), sorted by channels."""
    entries = result.get("by_channels") if isinstance(result, Mapping) else result
    if not isinstance(entries, Sequence) or not all(isinstance(e, Mapping) and "channels" in e for e in entries):
        raise DCAEError("not a channel sweep: expected a `dcae eval --channels` result (a 'by_channels' list)")
    return sorted(entries, key=lambda e: e["channels"])


def plot_channel_sweep(curves: Mapping[str, Mapping[str, Any] | Sequence[Mapping[str, Any]]], path: str | Path,
                       metrics: Sequence[str] = ("psnr", "ssim", "lpips", "rfid"), title: str = "") -> Path:
    """Quality against kept latent channels: one panel per metric, one line per model; writes `path` (PNG, SVG, PDF).

    `curves` maps a line label to a `dcae eval --channels` result (or its `by_channels` list). Missing values (rFID
    of fewer than 2 images) leave gaps; a metric no model has is left out. Returns the path written.
    """
    require_matplotlib("drawing a figure")
    from matplotlib.figure import Figure

    labels = {key: (label, better) for key, label, better in SWEEP_METRICS}
    unknown = [m for m in metrics if m not in labels]
    if unknown:
        raise DCAEError(f"unknown metric {unknown[0]!r}: choose from {', '.join(labels)}")
    points = {name: sweep_points(result) for name, result in curves.items()}
    shown = [m for m in metrics if any(e.get(m) is not None for entries in points.values() for e in entries)]
    if not shown:
        raise DCAEError("nothing to plot: no model has any of " + ", ".join(metrics))
    fig = Figure(figsize=(3.6 * len(shown), 3.4), layout="constrained")
    axes = [fig.add_subplot(1, len(shown), i + 1) for i in range(len(shown))]
    ticks = sorted({e["channels"] for entries in points.values() for e in entries})
    for ax, key in zip(axes, shown):
        for i, (name, entries) in enumerate(points.items()):
            xy = [(e["channels"], e[key]) for e in entries if e.get(key) is not None]
            if xy:
                ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", color=f"C{i}", label=name)
        ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)
        ax.set_xlabel("kept latent channels")
        label, better = labels[key]
        ax.set_title(f"{label} ({better} is better)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    kind = path.suffix.lstrip(".").lower() or "png"
    if kind not in fig.canvas.get_supported_filetypes():
        raise DCAEError(f"{path}: cannot draw a .{kind} file; use .png, .svg or .pdf")
    with atomic_output(path) as handle:  # no version stamp in a PNG: reruns give the same bytes
        fig.savefig(handle, format=kind, dpi=110, metadata={"Software": None} if kind == "png" else None)
    return path
