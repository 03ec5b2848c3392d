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
    seeds = sorted({arm["seed"] for arm in arms})
    return {"study": study, "claim": "the paper says so", "created": "2026-01-01T00:00:00Z",
            "command": f"python -m experiments.{study}", "smoke": smoke,
            "settings": {"budget_min": 40.0, "seeds": seeds, "resolution": 128, "batch_size": 8, "weights": "model",
                         "eval_limit": None},
            "machine": {"platform": "test", "cpus": 2, "torch": "x", "cuda": None},
            "specs": specs, "arms": arms, "wall_s": 3600.0, **extra}


NOISE = (0.0, 0.1, -0.1)  # the same seed-to-seed offsets in every arm: each arm's spread 0.1, paired gaps exact


def _residual(smoke: bool = False, seeds: tuple[int, ...] = (0, 1, 2)) -> dict:
    # f32: shortcuts help by 0.5 dB (> the 0.1 spread); f64: the plain model is *better*; conv-shortcut 0.05 dB
    # from residual: inside the spread
    values = {"f32 residual": (25.0, 0.20), "f32 plain": (24.5, 0.22), "f32 conv-shortcut": (24.95, 0.20),
              "f64 residual": (23.0, 0.30), "f64 plain": (23.4, 0.28), "f64 conv-shortcut": (22.0, 0.33)}
    specs = ["kodak24@128", "kodak24@native"]
    arms = [_arm(name, seed, {s: (p + NOISE[seed], lp, 50.0) for s in specs}, preset=f"dc-ae-tiny-{name[:3]}",
                 variant=name.split()[1]) for seed in seeds for name, (p, lp) in values.items()]
    return _results("residual_study", specs, arms, smoke)


def _other_studies(seeds: tuple[int, ...] = (0, 1, 2)) -> dict[str, dict]:
    scales = ["kodak24@128", "kodak24@256", "kodak24@512", "sunhays80@1024"]
    gen = {"phase 1 only": [24, 23, 22, 20], "+ phase 1 continued @128": [24.5, 23.4, 22.3, 20.2],
           "+ phase 2 latent adaptation @256": [24.2, 23.8, 23.5, 22.5], "+ full-model tuning @256": [24.3, 24, 23, 22]}
    generalization = _results("generalization_study", scales,
                              [_arm(n, seed, {s: (p + NOISE[seed], 0.3, 40.0) for s, p in zip(scales, ps)},
                                    preset="dc-ae-tiny-f64c128") for seed in seeds for n, ps in gen.items()],
                              scales=[1, 2, 4, 8], adapt_resolution=256, adapt_budget_min=10.0)
    p3 = ["kodak24@128", "sunhays80@128"]
    phase3 = _results("phase3_study", p3, [
        _arm(n, seed, {s: (p + NOISE[seed], lp + NOISE[seed] / 100, fid) for s in p3}, preset="dc-ae-tiny-f32c32")
        for seed in seeds
        for n, (p, lp, fid) in {"phase 1 base": (25, 0.2, 60.0), "no GAN (phase 1 continued)": (25.3, 0.19, 58.0),
                                "full-model GAN": (24.5, 0.1805, 45.0),
                                "decoder-head GAN (phase 3)": (25.1, 0.18, 50.0)}.items()],
        extra_budget_min=10.0)
    b = ["kodak24@native"]
    baseline = _results("baseline_study", b, [
        _arm(n, seed, {b[0]: (p + NOISE[seed], lp, 30.0)}, preset=f"dc-ae-tiny-{n}", latent=n,
             compression_ratio=ratio, params=7_000_000)
        for seed in seeds for n, (p, lp, ratio) in {"f8c4": (28.0, 0.10, 48.0), "f32c32": (27.8, 0.105, 96.0),
                                                    "f64c128": (26.0, 0.2, 96.0)}.items()])
    return {"generalization_study": generalization, "phase3_study": phase3, "baseline_study": baseline,
            "structured_latent_study": _structured(seeds), "augmented_diffusion_study": _augmented(seeds)}


def _structured(seeds: tuple[int, ...] = (0, 1, 2)) -> dict:
    # prefixes of the structured latent decode far better; at full C the plain model is 0.1 dB better (the spread)
    channels = [16, 32, 64, 128]
    values = {"structured": [22.0, 23.0, 24.0, 25.0], "plain": [12.0, 13.0, 15.0, 25.1]}
    specs = [f"kodak24@256 k={k}" for k in channels]
    arms = [_arm(n, seed, {s: (p + NOISE[seed], 0.5 - p / 100, 80.0) for s, p in zip(specs, ps)},
                 preset="dc-ae-tiny-f32c128-1.5", overrides=[] if n == "plain" else ["phase.structured_latent.enabled=true"])
            for seed in seeds for n, ps in values.items()]
    return _results("structured_latent_study", specs, arms, channels=channels, preset="dc-ae-tiny-f32c128-1.5")


def _augmented(seeds: tuple[int, ...] = (0, 1, 2)) -> dict:
    curves = {"unstructured": [330, 290, 250, 210], "structured": [320, 280, 240, 200],
              "structured+augmented": [300, 250, 200, 150]}
    arms = [{"name": n, "seed": seed, "autoencoder": "plain" if n == "unstructured" else "structured",
             "run_dir": f"runs/{n}", "command": f"dcae train-diffusion {n}", "train_wall_s": 60.0,
             "images_per_s": 900.0, "gfid": [{"step": 250 * (i + 1), "gfid": g + NOISE[seed]} for i, g in enumerate(c)],
             "loss": [{"step": 10 * i, "loss": 1.0 / (1 + i)} for i in range(1, 100)]}
            for seed in seeds for n, c in curves.items()]
    results = _results("augmented_diffusion_study", [], arms, gfid_reference="bsds500/val (100 images)")
    results["settings"].update(budget_min=0.0, steps=1000, lr=3e-4, preset="DiT-S/1", override=["model.depth=6"],
                               samples=200)
    return results


def _render(tmp_path: Path, studies: dict[str, dict]) -> str:
    results, out, figures = tmp_path / "results", tmp_path / "REPORT.md", tmp_path / "docs" / "figures"
    for study, data in studies.items():
        common.write_json_atomic(results / f"{study}.json", data)
    assert report.main(["--results", str(results), "--out", str(out), "--figures", str(figures)]) == 0
    return out.read_text()


def test_report_renders_tables_figures_and_verdicts(tmp_path: Path):
    text = _render(tmp_path, {"residual_study": _residual()})
    assert "| f32 residual | 25.00 ± 0.10 |" in text  # mean ± std over the three seeds
    assert "**Reproduces.** f32: with shortcuts vs without" in text
    assert "**Does not reproduce at this scale.** f64: with shortcuts vs without" in text
    assert "**Does not reproduce at this scale.** the shortcuts' PSNR gain grows" in text
    assert "f32: space-to-channel vs conventional shortcuts: PSNR not resolved (inside the seed-to-seed spread)" in text
    assert text.count("Not run yet.") == 5  # the other five studies
    assert "![residual_study](docs/figures/residual_study.png)" in text
    png = (tmp_path / "docs" / "figures" / "residual_study.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    text = _render(tmp_path, _other_studies())
    assert "Not run yet." not in text
    assert ("**Reproduces.** phase 2 vs the phase-1-only model: PSNR gain +0.20 ± 0.00 dB at kodak24@128, "
            "+2.50 ± 0.00 dB") in text
    assert "**Reproduces.** at sunhays80@1024, phase 2 vs the same extra budget" in text
    # LPIPS 0.1800 vs 0.1805 with a spread of 0.001: not a verdict, whatever the means say; rFID decides nothing
    assert "**Not resolved at this budget.** decoder-head GAN vs full-model GAN on sunhays80@128" in text
    assert "**Reproduces.** GAN refinement vs no GAN at the same extra budget on sunhays80@128: LPIPS better" in text
    assert "**Reproduces.** f32c32 (96 pixel numbers per latent number) vs f8c4 (48)" in text
    assert "**Does not reproduce at this scale.** f64c128" in text
    assert "**Reproduces.** kodak24@256: prefixes of the structured latent decode better" in text
    assert "| structured | PSNR ↑ | 22.00 ± 0.10 | 23.00 ± 0.10 | 24.00 ± 0.10 | 25.00 ± 0.10 |" in text
    assert ("**Reproduces.** kodak24@256: dropping channels costs the structured latent less than the unstructured "
            "one (each model's PSNR at k minus its own PSNR at C = 128, per seed, structured vs plain: k=16: "
            "-3.00 ± 0.00 vs -13.10 ± 0.00 dB (better)") in text
    assert "**Reproduces.** kodak24@256: at full C = 128 the mask costs little" in text  # 0.1 dB: resolved, small
    assert "**Reproduces.** structured+augmented converges faster than structured: final gFID better" in text
    assert "1000 steps per training run" in text
    assert sorted(p.name for p in (tmp_path / "docs" / "figures").iterdir()) == [
        f"{s}.png" for s in sorted(report_keys())]

    text = _render(tmp_path, {"residual_study": _residual(smoke=True)})
    section = text.split("## 1.")[1].split("## 2.")[0]
    assert "**SMOKE RUN**" in section and "Smoke run: no verdict." in section and "Reproduces." not in section


def test_one_seed_gives_no_verdict(tmp_path: Path):
    """However large the gap, one seed cannot say whether it is larger than the seed-to-seed spread."""
    text = _render(tmp_path, {"residual_study": _residual(seeds=(0,)), **_other_studies(seeds=(0,))})
    verdicts = [line for line in text.splitlines() if line.startswith("- **")]
    assert verdicts and all(line.startswith("- **Not resolved (1 seed).**") for line in verdicts), verdicts
    assert "Reproduces." not in text and "Does not reproduce" not in text


def test_verdict_rule_uses_the_seed_spread():
    def arm(name: str, psnrs: list[float], lpips: float = 0.3, rfid: float = 50.0) -> report.Arm:
        records = [_arm(name, i, {"k@native": (p, lpips, rfid)}) for i, p in enumerate(psnrs)]
        return report.Arm(name, list(range(len(psnrs))), records)

    a, b = arm("a", [20.0, 20.5, 21.0]), arm("b", [20.2, 20.4, 20.6])
    assert report.compare(a, b, "k@native", "psnr") == report.SPREAD  # 0.3 dB gap, 0.5 dB spread
    assert report.compare(arm("c", [22.0, 22.1, 22.2]), b, "k@native", "psnr") == 1
    assert report.compare(b, arm("c", [22.0, 22.1, 22.2]), "k@native", "psnr") == -1
    assert report.compare(arm("d", [30.0]), arm("e", [10.0]), "k@native", "psnr") == report.FEW_SEEDS
    assert report.compare(a, arm("f", [9, 9, 9], rfid=5.0), "k@native", "rfid") == report.BIAS
    assert report.overall([1, report.SPREAD]) is True and report.overall([1, -1]) is None
    assert report.overall([report.SPREAD, report.BIAS]) == report.SPREAD
    assert report.overall([1, report.FEW_SEEDS]) == report.FEW_SEEDS
    # per-seed values that are not one spec's metric (a drop between two specs): the same rule
    assert report.compare_groups([0.1, -0.1, 0.0], [-1.6, -3.9, -0.1]) == report.SPREAD  # 1.9 gap, 1.9 spread
    assert report.compare_groups([0.1, -0.1, 0.0], [-1.6, -2.0, -1.8]) == 1
    assert report.compare_groups([0.0, 0.1], [-5.0, -5.1]) == report.FEW_SEEDS


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
    assert ("**Not resolved (1 seed).** GAN refinement vs no GAN at the same extra budget on sunhays80@128: LPIPS "
            "not resolved (fewer than 3 seeds)") in section
    assert "decoder-head GAN vs full-model GAN PSNR not resolved (fewer than 3 seeds) (25.90 vs 25.00 dB)" in section


# ----------------------------------------------------------------------------------------------------------------------
# Provenance: the results a reader is shown must be the results of what ships
REPO = Path(__file__).resolve().parents[1]
EMBEDDED = "dcae/assets/default-f32c32"
MODEL_KEYS = ("model", "autoencoder", "source", "trained", "init")  # keys whose values name a model a result used


def _claims_embedded_default(data) -> bool:
    """Does a results JSON say (outside its provenance record) that it used the embedded default, as it is now?"""
    def names(value) -> list[str]:
        return [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)] \
            if isinstance(value, list) else []

    def walk(node) -> bool:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "provenance":
                    continue
                if key in MODEL_KEYS and any(n.removeprefix("./").removesuffix("/model.safetensors").rstrip("/")
                                             == EMBEDDED for n in names(value)):
                    return True
                if walk(value):
                    return True
        elif isinstance(node, list):
            return any(walk(v) for v in node)
        return False

    return walk(data)


def _results_files() -> list[Path]:
    return sorted((REPO / "results").rglob("*.json"))


@pytest.mark.parametrize("path", _results_files(), ids=lambda p: p.relative_to(REPO / "results").as_posix())
def test_results_that_claim_the_embedded_default_carry_its_hash(path: Path):
    """Replacing the shipped model fails this test for every result it invalidates, until each is regenerated or
    relabelled (a result of an earlier version names it as `dcae/assets/default-f32c32@<commit>`)."""
    from dcae.provenance import EMBEDDED_DEFAULT, file_sha256

    data = json.loads(path.read_text())
    shipped = file_sha256(EMBEDDED_DEFAULT)
    recorded = [m for m in data.get("provenance", {}).get("models", {}).values() if m.get("embedded_default")]
    for model in recorded:
        assert model["sha256"] == shipped, f"{path.name} was made with another {EMBEDDED}: regenerate or relabel it"
    if _claims_embedded_default(data):
        assert recorded, f"{path.name} names {EMBEDDED} but records no sha256 of it (dcae/provenance.py)"


def test_provenance_record(tmp_path: Path):
    from dcae.provenance import EMBEDDED_DEFAULT, file_sha256, provenance

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "m" / "ema.safetensors").write_bytes(b"ema")
    record = provenance({"run": tmp_path / "m", "default": EMBEDDED_DEFAULT.parent})
    assert len(record["commit"]) == 40 and isinstance(record["dirty"], bool)
    assert record["models"]["run"]["sha256"] == file_sha256(tmp_path / "m" / "model.safetensors")
    assert record["models"]["run"]["embedded_default"] is False
    assert record["models"]["default"] == {"path": f"{EMBEDDED}/model.safetensors",
                                           "sha256": file_sha256(EMBEDDED_DEFAULT), "embedded_default": True}
    assert provenance({"run": tmp_path / "m"}, weights="ema")["models"]["run"]["sha256"] == file_sha256(
        tmp_path / "m" / "ema.safetensors")
    assert {"command", "created", "machine"} <= record.keys() and "cpu_isa" in record["machine"]


def test_the_claims_detector():
    assert _claims_embedded_default({"model": "dcae/assets/default-f32c32"})
    assert _claims_embedded_default({"args": {"trained": ["./dcae/assets/default-f32c32/"]}})
    assert _claims_embedded_default({"arms": [{"train": [{"source": "dcae/assets/default-f32c32/model.safetensors"}]}]})
    assert not _claims_embedded_default({"model": "dcae/assets/default-f32c32@d3c3c0e"})  # an earlier version, named
    assert not _claims_embedded_default({"model": "runs/default-f32c32-hr"})
    assert not _claims_embedded_default({"provenance": {"models": {"m": {"path": "dcae/assets/default-f32c32"}}}})


def test_every_results_file_the_docs_cite_is_committed():
    """A figure in prose names its JSON; the JSON must be there (not a gitignored or never-written file)."""
    import re

    docs = [REPO / "README.md", REPO / "REPORT.md", *(REPO / "docs").glob("*.md"),
            REPO / EMBEDDED / "MODEL_CARD.md"]
    missing = {}
    for doc in docs:
        for name in set(re.findall(r"results/[\w./-]+\.json", doc.read_text())):
            if not (REPO / name).is_file():
                missing.setdefault(doc.name, []).append(name)
    assert not missing, missing


def test_strict_skips_turn_skips_into_failures(monkeypatch):
    """CI sets DCAE_STRICT_SKIPS=1 (.ci/run): a skip fails unless its reason names a root feature."""
    import conftest

    class Report:
        def __init__(self, reason: str):
            self.skipped, self.outcome, self.longrepr = True, "skipped", ("x.py", 1, f"Skipped: {reason}")

    monkeypatch.setenv("DCAE_STRICT_SKIPS", "1")
    missing, root = Report("shared data missing"), Report(f"{conftest.ROOT_FEATURE} no user namespaces")
    conftest._strict(missing)
    conftest._strict(root)
    assert missing.outcome == "failed" and root.outcome == "skipped"
    monkeypatch.setenv("DCAE_STRICT_SKIPS", "0")
    relaxed = Report("shared data missing")
    conftest._strict(relaxed)
    assert relaxed.outcome == "skipped"


def test_the_embedded_default_tables_are_the_recorded_numbers():
    """README's and the model card's Kodak24 tables print results/default_model.json, which describes the shipped
    file (the hash test above); so neither table can keep the numbers of a model that was replaced."""
    import re

    recorded = json.loads((REPO / "results" / "default_model.json").read_text())["mean"]

    def row(text: str, label: str) -> list[float]:
        line = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
        return [float(v) for v in re.findall(r"\| ([0-9.]+)(?= )", line)]

    readme = (REPO / "README.md").read_text()
    assert row(readme, "embedded f32c32 model") == [round(recorded["dcae_psnr"], 2), round(recorded["dcae_ssim"], 4),
                                                    round(recorded["dcae_lpips"], 3)]
    card = (REPO / EMBEDDED / "MODEL_CARD.md").read_text()
    assert row(card, "this model") == [round(recorded[k], d) for k, d in
                                       (("dcae_psnr", 2), ("dcae_ssim", 4), ("dcae_lpips", 4))]
