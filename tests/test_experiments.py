"""The reproduction studies' shared helpers and report renderer (experiments/common.py, experiments/report.py).

Run from the repository root (`python -m pytest`), which puts `experiments` on the import path.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
from experiments import common, report  # noqa: E402


def test_union_folder_links_the_splits(tmp_path: Path):
    source = tmp_path / "bsds"
    splits = {"train": ["a.jpg", "b.JPG", "Thumbs.db", ".hidden.jpg"], "test": ["c.png"], "val": ["v.jpg"]}
    for part, names in splits.items():
        (source / part).mkdir(parents=True)
        for name in names:
            (source / part / name).write_bytes(name.encode())
    root = common.union_folder(tmp_path / "union", source, ("train", "test"))
    again = common.union_folder(tmp_path / "union", source, ("train", "test"))  # idempotent
    assert root == again
    links = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_symlink())
    assert links == ["test/c.png", "train/a.jpg", "train/b.JPG"]  # no val, no non-images, no hidden files
    assert (root / "train" / "a.jpg").read_bytes() == b"a.jpg"
    with pytest.raises(FileNotFoundError):
        common.union_folder(tmp_path / "bad", source, ("nope",))


def test_write_json_atomic_and_eval_spec(tmp_path: Path):
    common.write_json_atomic(tmp_path / "x" / "r.json", {"a": 1})
    assert json.loads((tmp_path / "x" / "r.json").read_text()) == {"a": 1}
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["r.json"]
    assert common.parse_eval_spec("kodak24@256") == ("kodak24", 256)
    assert common.parse_eval_spec("sunhays80@native") == ("sunhays80", None)
    with pytest.raises(ValueError):
        common.parse_eval_spec("bsds500@128")  # training data is never an eval set


def _arm(name: str, seed: int, metrics: dict[str, tuple[float, float, float]], **extra) -> dict:
    """A synthetic arm: spec -> (psnr, lpips, rfid)."""
    evals = {spec: {"psnr": p, "ssim": 0.5 + p / 100, "lpips": lp, "rfid": fid, "n": 24,
                    "command": f"dcae eval --model {name} --data {spec}"} for spec, (p, lp, fid) in metrics.items()}
    return {"name": name, "seed": seed, "run_dir": f"runs/{name}", "train_wall_s": 2460.0, "train_loop_s": 2400.0,
            "train": [{"final_step": 1000, "images_per_s": 8.0, "commands": [f"dcae train --preset {name}"]}],
            "eval": evals, **extra}


def _results(study: str, specs: list[str], arms: list[dict], smoke: bool = False, **extra) -> dict:
    return {"study": study, "claim": "the paper says so", "created": "2026-01-01T00:00:00Z",
            "command": f"python -m experiments.{study}", "smoke": smoke,
            "settings": {"budget_min": 40.0, "seeds": [0, 1], "resolution": 128, "batch_size": 8, "weights": "model",
                         "eval_limit": None},
            "machine": {"platform": "test", "cpus": 2, "torch": "x", "cuda": None},
            "specs": specs, "arms": arms, "wall_s": 3600.0, **extra}


def _residual(smoke: bool = False) -> dict:
    # f32: shortcuts help by 0.5 dB; f64: the plain model is *better* (a trend that does not reproduce)
    values = {"f32 residual": (25.0, 0.20), "f32 plain": (24.5, 0.22), "f32 conv-shortcut": (24.9, 0.21),
              "f64 residual": (23.0, 0.30), "f64 plain": (23.4, 0.28), "f64 conv-shortcut": (22.0, 0.33)}
    specs = ["kodak24@128", "kodak24@native"]
    arms = [_arm(name, seed, {s: (p + 0.02 * seed, lp, 50.0) for s in specs}, preset=f"dc-ae-tiny-{name[:3]}",
                 variant=name.split()[1]) for seed in (0, 1) for name, (p, lp) in values.items()]
    return _results("residual_study", specs, arms, smoke)


def _other_studies() -> dict[str, dict]:
    scales = ["kodak24@128", "kodak24@256", "kodak24@512", "sunhays80@1024"]
    gen = {"phase 1 only": [24, 23, 22, 20], "+ phase 1 continued @128": [24.5, 23.4, 22.3, 20.2],
           "+ phase 2 latent adaptation @256": [24.2, 23.8, 23.5, 22.5], "+ full-model tuning @256": [24.3, 24, 23, 22]}
    generalization = _results("generalization_study", scales,
                              [_arm(n, 0, {s: (p, 0.3, 40.0) for s, p in zip(scales, ps)}, preset="dc-ae-tiny-f64c128")
                               for n, ps in gen.items()],
                              scales=[1, 2, 4, 8], adapt_resolution=256, adapt_budget_min=10.0)
    p3 = ["kodak24@128", "sunhays80@128"]
    phase3 = _results("phase3_study", p3, [
        _arm(n, 0, {s: (p, lp, fid) for s in p3}, preset="dc-ae-tiny-f32c32")
        for n, (p, lp, fid) in {"phase 1 base": (25, 0.2, 60.0), "no GAN (phase 1 continued)": (25.3, 0.19, 58.0),
                                "full-model GAN": (24.5, 0.18, 45.0),
                                "decoder-head GAN (phase 3)": (25.1, 0.18, 50.0)}.items()],
        extra_budget_min=10.0)
    b = ["kodak24@native"]
    baseline = _results("baseline_study", b, [
        _arm(n, 0, {b[0]: (p, lp, 30.0)}, preset=f"dc-ae-tiny-{n}", latent=n, compression_ratio=ratio, params=7_000_000)
        for n, (p, lp, ratio) in {"f8c4": (28.0, 0.10, 48.0), "f32c32": (27.8, 0.105, 96.0),
                                  "f64c128": (26.0, 0.2, 96.0)}.items()])
    return {"generalization_study": generalization, "phase3_study": phase3, "baseline_study": baseline}


def test_report_renders_tables_figures_and_verdicts(tmp_path: Path):
    results, out, figures = tmp_path / "results", tmp_path / "REPORT.md", tmp_path / "docs" / "figures"
    common.write_json_atomic(results / "residual_study.json", _residual())
    assert report.main(["--results", str(results), "--out", str(out), "--figures", str(figures)]) == 0
    text = out.read_text()
    assert "| f32 residual | 25.01 ± 0.01 |" in text  # mean ± std over the two seeds
    assert "**Reproduces.** f32: with shortcuts vs without" in text
    assert "**Does not reproduce at this scale.** f64: with shortcuts vs without" in text
    assert "**Does not reproduce at this scale.** the shortcuts' PSNR gain grows" in text
    assert text.count("Not run yet.") == 3  # the other three studies
    assert "![residual_study](docs/figures/residual_study.png)" in text
    png = (figures / "residual_study.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    for study, data in _other_studies().items():
        common.write_json_atomic(results / f"{study}.json", data)
    report.main(["--results", str(results), "--out", str(out), "--figures", str(figures)])
    text = out.read_text()
    assert "Not run yet." not in text
    assert "**Reproduces.** phase 2 vs the phase-1-only model: PSNR gain +0.20 dB at kodak24@128, +2.50 dB" in text
    assert "**Reproduces.** at sunhays80@1024, phase 2 vs the same extra budget" in text
    assert "**Does not reproduce at this scale.** decoder-head GAN vs full-model GAN" in text
    assert "**Reproduces.** f32c32 (96 pixel numbers per latent number) vs f8c4 (48)" in text
    assert "**Does not reproduce at this scale.** f64c128" in text
    assert sorted(p.name for p in figures.iterdir()) == [f"{s}.png" for s in sorted(report_keys())]

    common.write_json_atomic(results / "residual_study.json", _residual(smoke=True))
    report.main(["--results", str(results), "--out", str(out), "--figures", str(figures)])
    section = out.read_text().split("## 1.")[1].split("## 2.")[0]
    assert "**SMOKE RUN**" in section and "Smoke run: no verdict." in section and "Reproduces." not in section


def report_keys() -> list[str]:
    return [study.key for study in report.STUDIES]


def test_phase3_init_record_and_report(tmp_path: Path):
    import hashlib

    from experiments import phase3_study

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    (model / "config.json").write_text("{}")
    record = phase3_study.init_record(model, tmp_path / "runs")
    run_dir = Path(record["run_dir"])
    assert record["sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert run_dir.name == f"init-{record['sha256'][:8]}" and sorted(p.name for p in run_dir.iterdir()) == [
        "budget.json", "config.json", "model.safetensors"]
    assert phase3_study.init_record(model, tmp_path / "runs")["run_dir"] == str(run_dir)  # reused, not copied again
    with pytest.raises(SystemExit, match="no model.safetensors"):
        phase3_study.init_record(tmp_path / "runs", tmp_path / "runs")

    specs = ["kodak24@128", "kodak24@native", "sunhays80@128"]
    values = {"trained model (base)": (25, 0.2, 60.0, 26.0), "no GAN (phase 1 restarted)": (25.3, 0.19, 58.0, 25.5),
              "full-model GAN": (24.5, 0.18, 45.0, 25.0), "decoder-head GAN (phase 3)": (25.1, 0.18, 44.0, 25.9)}
    arms = [_arm(n, 0, {s: ((native if s.endswith("native") else p), lp, fid) for s in specs}, preset="x")
            for n, (p, lp, fid, native) in values.items()]
    results = _results("phase3_study", specs, arms, extra_budget_min=15.0,
                       init={"source": "dcae/assets/default-f32c32", "sha256": record["sha256"]})
    common.write_json_atomic(tmp_path / "results" / "phase3_study.json", results)
    out = tmp_path / "REPORT.md"
    report.main(["--results", str(tmp_path / "results"), "--out", str(out), "--figures", str(tmp_path / "fig")])
    section = out.read_text().split("## 3.")[1].split("## 4.")[0]
    assert f"from the trained model `dcae/assets/default-f32c32` (sha256 {record['sha256'][:12]})" in section
    assert "GAN refinement vs no GAN at the same extra budget, rFID on sunhays80@128: better" in section
    assert "decoder-head GAN vs full-model GAN PSNR better (25.90 vs 25.00 dB)" in section
