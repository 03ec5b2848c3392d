"""Fuzzing what the training and reporting commands read: `key=value` overrides, run directories, `dcae export`'s
arguments, and the inputs of the HTML reports. The contract is tests/test_fuzz.py's (a result or one clean error line,
no traceback, no hang, no large allocation); the reports add one: no input string reaches a page unescaped.

The default suite runs a few dozen inputs per parser; `scripts/fuzz.py` runs the same strategies and checkers for
thousands, in child processes.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import html.parser
import json
import os
import shutil
import tempfile
from functools import cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from test_fuzz import (
    BYTE_OPS, CONFIG_VALUES, FUZZ, FAMILIES, JSON_VALUES, NUMBER_TEXT, RAW_JSON, _DELETE, _WORKDIR, _json_safe, _paths, _set,
    cache_seed, check_main, config_mutations, expect_clean, family_checkpoint, guarded, micro_checkpoint, mutate,
    one_line_dcae_error, safetensors_inputs,
)

import dcae
from dcae.errors import DCAEError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # warnings are outcomes the checkers allow


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """Run a command inside `path`: whatever a fuzzed relative path makes it write stays in the temporary folder."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


@cache
def train_images() -> Path:
    """Two 40x48 random images: the training data of the micro runs."""
    folder = Path(_WORKDIR.name) / "train-images"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def micro_diffusion_overrides() -> list[str]:
    return ["model.depth=1", "model.hidden_size=16", "model.num_heads=2"]


# ----------------------------------------------------------------------------------------------------------------------
# `key=value` overrides of dcae train and dcae train-diffusion
def _leaf_keys(config: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a (nested) config dataclass."""
    keys = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            keys += _leaf_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


@cache
def override_keys() -> dict[str, list[str]]:
    """The keys each trainer's overrides draw from: every field, short forms, sections and typos. Paths that name where
    a diffusion run reads or writes are left out (the checker runs that command for real)."""
    from dcae.commands.train_diffusion import build_config
    from dcae.train import TrainConfig

    ae = _leaf_keys(TrainConfig())
    diffusion = _leaf_keys(build_config(override_args([]))[0])
    wrong = ["", "nonexistent", "phase", "data", "optim", "model", "model.arch", "phase.gan", "a.b.c", ".", "..",
             "phase..lr", " steps", "STEPS", "optim.lr.x", "steps.x"]
    short = [k.removeprefix("phase.") for k in ae if k.startswith("phase.")]
    return {"train": ae + short + wrong,
            "train-diffusion": [k for k in diffusion if k not in ("latents", "run_dir")] + wrong}


OVERRIDE_VALUES = st.one_of(
    NUMBER_TEXT,
    st.sampled_from(["true", "false", "yes", "no", "on", "off", "(0.5, 0.9)", "[0.9,0.999]", "(1,)", "(1,2,3)", "()",
                     "(nan, 0.5)", "fp32", "bf16", "fp16", "auto", "cuda", "cpu", "meta", "mps", "cuda:7", "flow", "eps",
                     "hinge", "DiT-T/1", "UViT-T/2", "dit", "uvit", "all", "decoder_head", "latent_adaptation", "1e-4",
                     "-1e-4", "0.0", "1e308", "2e308", "-0.0", "null", "4.5", "65536", "1e9", "10000000000"]),
)


@st.composite
def override_inputs(draw) -> tuple[str, list[str]]:
    """(command, overrides): 1-4 `key=value` strings for dcae train or dcae train-diffusion."""
    command = draw(st.sampled_from(["train", "train-diffusion"]))
    keys = override_keys()[command]
    items = []
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from(keys) | st.text(max_size=10))
        items.append(f"{key}={draw(OVERRIDE_VALUES)}" if draw(st.integers(0, 19)) else key)  # or no `=` at all
    return command, items


def override_args(overrides: list[str]) -> argparse.Namespace:
    """dcae train-diffusion's arguments: the latent cache of the fuzzer, the micro model, then `overrides`."""
    from dcae.commands import train_diffusion

    cache_seed()
    parser = argparse.ArgumentParser(prog="dcae train-diffusion")
    train_diffusion.add_arguments(parser)
    cache_dir = Path(_WORKDIR.name) / "cache-seed" / "cache"
    return parser.parse_args(["--latents", str(cache_dir), "--preset", "DiT-T/1", "--batch-size", "4",
                              *micro_diffusion_overrides(), "progress=false", *overrides])


MAX_RUN_PARAMETERS = 300_000  # a fuzzed config this small (and batch_size <= 32) also trains one step


def check_overrides(case: tuple[str, list[str]]) -> None:
    """dcae train: `--print-config` exits cleanly, and the config passes or fails `check_config` with a DCAEError.
    dcae train-diffusion: the config is built and checked against the cache, the model is built on the meta device,
    and a config that passes trains one step when it is small: every step a DCAEError or a result."""
    command, overrides = case
    if command == "train":
        from dcae.train import TrainConfig, apply_overrides, check_config, phase_config

        check_main(["train", "--phase", "1", "--data", str(train_images()), *overrides, "--print-config"])
        base = dataclasses.replace(TrainConfig(), phase=phase_config(1))
        config = expect_clean(lambda: apply_overrides(base, overrides, {"data.path": str(train_images())}))
        if config is not None:
            refused(lambda: check_config(config))
        return
    from dcae.commands.train_diffusion import build_config
    from dcae.diffusion.latents import read_index
    from dcae.diffusion.presets import create_diffusion_model
    from dcae.diffusion.train import check_config, train_diffusion

    cache_seed()
    try:
        args = override_args(overrides)
    except SystemExit as exit_:  # argparse: a value it refuses (an override that looks like an option)
        assert exit_.code == 2
        return
    built = expect_clean(lambda: build_config(args))
    if built is None:
        return
    config = built[0]
    if refused(lambda: check_config(config, read_index(config.latents), 1)):
        return

    def meta_parameters() -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in create_diffusion_model(config.model).parameters())

    count = expect_clean(meta_parameters)
    if count is None or count > MAX_RUN_PARAMETERS or not 0 < config.batch_size <= 32:
        return
    with tempfile.TemporaryDirectory() as tmp, working_directory(Path(tmp)):
        small = dataclasses.replace(config, run_dir=str(Path(tmp) / "run"), steps=1, tensorboard=False,
                                    progress=False)
        expect_clean(lambda: train_diffusion(small), max_growth=512 << 20)


def refused(fn: Any, **guard: Any) -> bool:
    """fn() under `guarded`: True after a one-line DCAEError, False when it passed; anything else fails the check."""
    try:
        with guarded(**guard):
            fn()
    except DCAEError as error:
        one_line_dcae_error(error)
        return True
    return False


def warm_overrides() -> None:
    train_images()
    cache_seed()
    override_keys()


@FUZZ
@given(override_inputs())
def test_fuzz_overrides(case):
    check_overrides(case)


# ----------------------------------------------------------------------------------------------------------------------
# Run directories: a finished two-step run of each trainer, its files mutated, then resumed and loaded
@cache
def nano_checkpoint() -> Path:
    """A two-stage f2c4 DCAE of a dozen tensors (BatchNorm in the decoder): a run of it resumes in milliseconds."""
    from dcae.autoencoder import DCAEConfig, DecoderConfig, EncoderConfig

    config = DCAEConfig(name="nano", latent_channels=4, attention_head_dim=8,
                        encoder=EncoderConfig(width_list=(8, 8), depth_list=(0, 1), block_type=("ResBlock",) * 2),
                        decoder=DecoderConfig(width_list=(8, 8), depth_list=(0, 1), block_type=("ResBlock",) * 2,
                                              norm=("bn2d",) * 2, act=("relu",) * 2))
    torch.manual_seed(0)
    return dcae.DCAE(config).save_pretrained(Path(_WORKDIR.name) / "nano")


@cache
def seed_runs() -> dict[str, Path]:
    """{"ae": a two-step dcae train run of the nano model, "diffusion": a two-step dcae train-diffusion run}."""
    from dcae.cli import main
    from dcae.commands.train_diffusion import build_config
    from dcae.diffusion.train import train_diffusion

    root = Path(_WORKDIR.name) / "runs"
    ae = root / "ae"
    with contextlib.redirect_stdout(open(os.devnull, "w")):  # noqa: SIM115
        assert main(["train", "--phase", "1", "--init", str(nano_checkpoint()), "--data", str(train_images()),
                     "--steps", "2", "--batch-size", "1", "--resolution", "32", "--seed", "0", "--run-dir", str(ae),
                     "data.num_workers=0", "progress=false", "phase.lpips_weight=0", "ckpt_every=1",
                     "log_every=1", "precision=fp32"]) == 0
    cache_seed()
    config = build_config(override_args(["steps=2", "ckpt_every=1", "log_every=1", "precision=fp32"]))[0]
    diffusion = train_diffusion(dataclasses.replace(config, run_dir=str(root / "diffusion")))
    return {"ae": ae, "diffusion": diffusion}


@cache
def seed_files() -> dict[str, dict[str, bytes]]:
    """Each seed run's files: relative path -> bytes."""
    return {kind: {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
            for kind, run in seed_runs().items()}


TENSOR_VALUES = st.sampled_from([("tensor", "float32", (3,)), ("tensor", "uint8", (5,)), ("tensor", "uint8", (0,)),
                                 ("tensor", "float64", (2, 2)), ("tensor", "int64", ()), ("tensor", "bool", (1,)),
                                 ("tensor", "uint8", (2, 5056)), ("tensor", "float32", (0, 3))])
STATE_VALUES = st.one_of(CONFIG_VALUES.map(lambda v: ("json", v)), TENSOR_VALUES,
                         st.sampled_from([("json", -1), ("json", -(10 ** 12)), ("json", 10 ** 12), ("json", 2 ** 70),
                                          ("json", 1.5), ("json", "1"), ("delete",)]))
POINTER_TEXT = st.one_of(st.text(max_size=30), st.sampled_from(
    ["", "step_00000001", "step_00000001\n", "step_00000003", "../../etc", "/etc", "step_00000002/../../run",
     "step_00000002\x00", "latest", ".", "..", "step_" + "9" * 300]))


def _state_ops(draw, data: bytes) -> list[tuple]:
    """Edits of a state.pt's tree: 1-3 of its nodes replaced (JSON values, tensors of other dtypes and shapes) or
    deleted."""
    state = torch.load(_bytes_io(data), weights_only=True)
    paths = _paths(state)
    return [(draw(st.sampled_from(paths)), draw(STATE_VALUES)) for _ in range(draw(st.integers(1, 3)))]


def _bytes_io(data: bytes) -> Any:
    import io

    return io.BytesIO(data)


@st.composite
def run_dir_inputs(draw, skip_open: bool = False) -> tuple[str, list[tuple]]:
    """(kind, edits): 1-3 edits of a seed run's files (JSON values, state.pt nodes, safetensors headers, bytes,
    the latest pointer, a deleted file, lines appended to the log). `skip_open` leaves a diffusion run's weight
    files alone (kept for the bounded default run; scripts/fuzz.py edits them)."""
    kind = draw(st.sampled_from(["ae", "diffusion"]))
    files = seed_files()[kind]
    names = sorted(files)
    if skip_open and kind == "diffusion":
        names = [n for n in names if not n.endswith(".safetensors")]
    jsons = [n for n in names if n.endswith(".json")]
    states = [n for n in names if n.endswith("state.pt")]
    weights = [n for n in names if n.endswith(".safetensors")]
    ops = []
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["json", "state", "safetensors", "bytes", "latest", "delete", "log"] if weights else
                                  ["json", "state", "bytes", "latest", "delete", "log"]))
        if op == "json":
            name = draw(st.sampled_from(jsons))
            value = _json_safe(draw(config_mutations(json.loads(files[name]))))
            ops.append(("json", name, json.dumps(value) if draw(st.integers(0, 9)) else draw(RAW_JSON)))
        elif op == "state":
            name = draw(st.sampled_from(states))
            ops.append(("state", name, _state_ops(draw, files[name])))
        elif op == "safetensors":
            name = draw(st.sampled_from(weights))
            ops.append(("bytes_set", name, draw(safetensors_inputs(files[name]))))
        elif op == "bytes":
            ops.append(("bytes", draw(st.sampled_from(names)), draw(st.lists(BYTE_OPS, min_size=1, max_size=3))))
        elif op == "latest":
            ops.append(("latest", draw(POINTER_TEXT)))
        elif op == "delete":
            ops.append(("delete", draw(st.sampled_from(names))))
        else:
            ops.append(("log", draw(st.text(max_size=40) | JSON_VALUES.map(json.dumps))))
    return kind, ops


def _tensor(spec: tuple) -> torch.Tensor:
    _, dtype, shape = spec
    return torch.zeros(shape, dtype=getattr(torch, dtype))


def apply_run_ops(run: Path, ops: list[tuple]) -> None:
    for op in ops:
        kind, name = op[0], op[1]
        path = run / name if kind not in ("latest", "log") else None
        if kind in ("json", "state", "bytes_set", "bytes", "delete") and not path.is_file():
            continue  # an earlier edit deleted it
        if kind == "json":
            path.write_text(op[2], encoding="utf-8", errors="surrogatepass")
        elif kind == "state":
            try:
                state = torch.load(path, weights_only=True)
            except Exception:  # noqa: BLE001 - an earlier byte edit broke it: leave it broken
                continue
            for where, value in op[2]:
                if not _reachable(state, where):
                    continue
                new = _DELETE if value[0] == "delete" else _tensor(value) if value[0] == "tensor" else value[1]
                state = _set(state, where, new)
            torch.save(state, path)
        elif kind == "bytes_set":
            path.write_bytes(op[2])
        elif kind == "bytes":
            path.write_bytes(mutate(path.read_bytes(), op[2]))
        elif kind == "delete":
            path.unlink()
        elif kind == "latest":
            (run / "checkpoints").mkdir(exist_ok=True)
            (run / "checkpoints" / "latest").write_text(op[1])
        elif kind == "log":
            with open(run / "log.jsonl", "a") as handle:
                handle.write(op[1] + "\n")


def _reachable(value: Any, path: tuple) -> bool:
    """Whether `path` still leads to a node (an earlier edit may have replaced a parent)."""
    for key in path:
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and isinstance(key, int) and 0 <= key < len(value):
            value = value[key]
        else:
            return False
    return True


def check_run_dir(kind: str, ops: list[tuple]) -> None:
    """Resume the mutated run (to its own last step: nothing to train unless the edits moved its step back) and load
    its weights: each a result or one clean error."""
    from dcae.diffusion.train import load_diffusion_checkpoint

    with tempfile.TemporaryDirectory() as tmp, working_directory(Path(tmp)):
        run = Path(tmp) / "run"
        shutil.copytree(seed_runs()[kind], run)
        apply_run_ops(run, ops)
        if kind == "ae":
            check_main(["train", "--resume", str(run), "--steps", "2", "progress=false"], max_growth=512 << 20)
            for weights in ("model", "ema"):
                expect_clean(lambda: dcae.DCAE.from_pretrained(run, weights=weights), max_growth=512 << 20)
        else:
            check_main(["train-diffusion", "--resume", str(run), "--steps", "2", "progress=false"],
                       max_growth=512 << 20)
            for ema in (True, False):
                expect_clean(lambda: load_diffusion_checkpoint(run, ema=ema), max_growth=512 << 20)


def warm_run_dirs() -> None:
    seed_files()


@FUZZ
@given(run_dir_inputs(skip_open=True))
def test_fuzz_run_directories(case):
    check_run_dir(*case)


# ----------------------------------------------------------------------------------------------------------------------
# dcae export: its arguments and the model checks before the exporter (torch.onnx itself is stubbed out: seconds each)
EXPORT_MODELS = st.sampled_from(["micro", "1.5", "sana-1.1", "lite", "1.1", "dc-ae-tiny-f8c4", "missing", "", "-"])
SIZES = st.one_of(NUMBER_TEXT, st.sampled_from(
    ["16", "16x24", "0", "8x0", "32x32", "1x1", "4x8", "100000", "65536x65536", "16x", "x16", "16X24", " 16 ", "-16",
     "16x24x32", "\u0661\u0666", "4096x4096", "8192", "16x1000000"]))


@st.composite
def export_inputs(draw) -> list[str]:
    model = draw(EXPORT_MODELS)
    args = ["export", model, "-o", "OUT"]
    for _ in range(draw(st.integers(1, 4))):
        option = draw(st.sampled_from(["--part", "--size", "--channels", "--dynamic-size", "--no-check", "--format"]))
        if option == "--part":
            args += [option, draw(st.sampled_from(["encoder", "decoder", "both", "", "x"]))]
        elif option == "--size":
            args += [option, draw(SIZES)]
        elif option == "--channels":
            args += [option, draw(NUMBER_TEXT | st.sampled_from(["1", "4", "8", "9", "0", "-1", "128"]))]
        elif option == "--format":
            args += [option, draw(st.sampled_from(["onnx", "torchscript", ""]))]
        else:
            args.append(option)
    return args


@contextlib.contextmanager
def exporter_stubbed() -> Iterator[None]:
    """dcae.export without torch.onnx: a stub program, an empty file, and a parity of 0 (the checks before and after
    the exporter run for real)."""
    import dcae.export as export

    def write(program: Any, path: Path) -> None:
        Path(path).write_bytes(b"")

    saved = export.to_onnx_program, export.write_onnx, export.parity
    export.to_onnx_program = lambda *args, **kwargs: object()
    export.write_onnx = write
    export.parity = lambda *args, **kwargs: (0.0, export.PARITY_TOLERANCE)
    try:
        yield
    finally:
        export.to_onnx_program, export.write_onnx, export.parity = saved


def check_export(argv: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp, working_directory(Path(tmp)), exporter_stubbed():
        model = argv[1]
        if model in FAMILIES or model == "micro":
            model = str(family_checkpoint(model, "dcae"))
        elif model == "missing":
            model = str(Path(tmp) / "missing")
        check_main([argv[0], model, *[str(Path(tmp) / "out") if a == "OUT" else a for a in argv[2:]]])


def warm_export() -> None:
    for family in ("micro", *FAMILIES):
        family_checkpoint(family, "dcae")
    dcae.list_presets()


@FUZZ
@given(export_inputs())
def test_fuzz_export_arguments(argv):
    check_export(argv)


# ----------------------------------------------------------------------------------------------------------------------
# Reports: log.jsonl, config.json and sample names of a run (dcae report), names and settings of a comparison
HOSTILE = ["<img src=x onerror=alert(1)>", "</script><script>alert(1)</script>", "</pre><b>x</b>", "\"><svg onload=1>",
           "a&amp;b", "&lt;", "\u2028\u2029", "'; alert(1); '", "<!--", "]]>", "</title><h1>", "javascript:alert(1)"]
TEXT = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=20))
LOG_KEYS = st.one_of(st.sampled_from(["step", "event", "loss", "l1", "lr", "val_psnr", "val_lpips", "images_per_s",
                                      "grad_norm", "d_norm", "path", "time"]), TEXT)
LOG_VALUES = st.one_of(JSON_VALUES, TEXT, st.sampled_from([10 ** 400, -(10 ** 400), 1e308, -1e308, 5e-324, 0, -0.0, True,
                                                           "5", "1e3", "5.5", " 7 ", "nan", "inf", "val", "start"]))
LOG_RECORDS = st.dictionaries(LOG_KEYS, LOG_VALUES, max_size=5)


@st.composite
def log_text(draw) -> bytes:
    lines = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.integers(0, 9))
        if kind == 0:
            lines.append(draw(st.binary(max_size=20)))  # not UTF-8, or not JSON
        elif kind == 1:
            lines.append(json.dumps(draw(JSON_VALUES)).encode())  # JSON, but not an object
        elif kind == 2:
            lines.append(draw(RAW_JSON).encode("utf-8", errors="surrogatepass"))
        elif kind == 3:  # a plausible line: a step and numbers, at the edges of what a float holds
            numbers = st.sampled_from([1e308, -1e308, 10 ** 400, 5e-324, 0, 1, 0.5, -2, float("nan"), float("inf")])
            record = {"step": draw(numbers | st.sampled_from(["5", "5.5", "1e3", True, None, 7])),
                      draw(LOG_KEYS): draw(numbers)}
            if draw(st.booleans()):
                record["event"] = draw(st.sampled_from(["val", "start", "checkpoint", "nonfinite"]))
            lines.append(json.dumps(record).encode())
        else:
            record = draw(LOG_RECORDS)
            lines.append(json.dumps(record).encode() if draw(st.integers(0, 4)) else
                         _dumps_big(record).encode())
    return b"\n".join(lines) + (b"\n" if draw(st.booleans()) else b"")


def _dumps_big(record: dict) -> str:
    """JSON with integers too large for a float (Python's json writes them; float() of them overflows)."""
    return json.dumps({k: (10 ** 400 if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                       for k, v in record.items()}, allow_nan=True)


SAMPLE_NAMES = st.one_of(st.sampled_from(["step_00000010.png", "step_00000020.jpg", "10.png", "step_0.webp",
                                          "step_" + "9" * 30 + ".png", "step_5<img src=x>.png", "x.png", ".png",
                                          "step_00000010.PNG", "step_1.gif"]),
                         st.text(min_size=1, max_size=12).map(lambda s: s.replace("/", "_") + ".png"))


@st.composite
def report_inputs(draw) -> tuple[str, Any]:
    """("training", (run name, log.jsonl bytes, config.json text or None, {sample name: bytes})) or
    ("comparison", (model names, rows, settings, means))."""
    if draw(st.booleans()):
        samples = {}
        for _ in range(draw(st.integers(0, 3))):
            samples[draw(SAMPLE_NAMES)] = draw(st.sampled_from([b"", b"not an image", _png()]))
        return "training", (draw(st.sampled_from(["run", *HOSTILE[:2], "a b"])), draw(log_text()),
                            draw(st.none() | TEXT | JSON_VALUES.map(json.dumps)), samples)
    models = draw(st.lists(TEXT, min_size=1, max_size=3))
    metrics = st.dictionaries(st.sampled_from(["psnr", "ssim", "lpips", "rfid", "n"]), st.floats() | st.integers(),
                              max_size=3)  # computed by dcae: numbers, NaN and inf included
    rows = draw(st.lists(st.tuples(TEXT, st.integers(0, len(models) - 1), metrics), max_size=3))
    settings = draw(st.dictionaries(TEXT, LOG_VALUES, max_size=3))
    means = draw(st.none() | st.lists(metrics, min_size=len(models), max_size=len(models)))
    return "comparison", (models, rows, settings, means)


@cache
def _png() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (8, 4), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


# What a page may hold: these elements, no event-handler attribute, and images only from beside the page.
PAGE_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "table", "tr", "th", "td", "pre", "div", "p",
             "span", "svg", "text", "line", "g", "polyline", "circle", "input", "img", "button", "script"}


class PageChecker(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.problems: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in PAGE_TAGS:
            self.problems.append(f"element <{tag}>")
        for name, value in attrs:
            if name.startswith("on"):
                self.problems.append(f"attribute {name}= on <{tag}>")
            if name in ("src", "href") and value and (":" in value or value.startswith(("/", ".."))):
                self.problems.append(f"{name}={value!r} on <{tag}>")
        self.scripts += tag == "script"


def check_page(path: Path) -> dict[str, Any]:
    """index.html holds only PAGE_TAGS, no handler attribute, two scripts (the data and the code); returns the data."""
    text = path.read_text(encoding="utf-8")
    checker = PageChecker()
    checker.feed(text)
    checker.close()
    assert not checker.problems and checker.scripts == 2, f"injected into the page: {checker.problems[:3]}"
    start = text.index('<script type="application/json" id="report-data">') + len(
        '<script type="application/json" id="report-data">')
    return json.loads(text[start:text.index("</script>", start)])


def check_report(kind: str, case: Any) -> None:
    from dcae.report_html import ComparisonReport, training_report

    with tempfile.TemporaryDirectory() as tmp:
        if kind == "training":
            name, log, config, samples = case
            run = Path(tmp) / name
            (run / "samples").mkdir(parents=True)
            (run / "log.jsonl").write_bytes(log)
            if config is not None:
                (run / "config.json").write_bytes(config.encode("utf-8", errors="surrogatepass"))
            for sample, data in samples.items():
                with contextlib.suppress(OSError, ValueError):  # a name the file system refuses
                    (run / "samples" / sample).write_bytes(data)
            page = expect_clean(lambda: training_report(run, Path(tmp) / "out"), max_growth=256 << 20)
            if page is not None:
                check_page(page)
            return
        models, rows, settings, means = case
        image = torch.zeros(3, 4, 4, dtype=torch.uint8)

        def write() -> Path:
            report = ComparisonReport(Path(tmp) / "cmp", models, settings=settings)
            for name, model, metrics in rows:
                report.add(model, name, image, image, metrics)
            return report.write(means)

        page = expect_clean(write, max_growth=256 << 20)
        if page is not None:
            data = check_page(page)
            assert data["models"] == models and {r["name"] for r in data["rows"]} == {r[0] for r in rows}


@FUZZ
@given(report_inputs())
def test_fuzz_report_inputs(case):
    check_report(*case)


# ----------------------------------------------------------------------------------------------------------------------
# Regression tests: what these fuzzers found (fixed), and what they found in modules this issue could not change (open)
def test_error_messages_quoting_line_breaks_stay_one_line(tmp_path):
    """ONE_LINE_ERRORS: a DCAEError quoting an override key or a tensor name with a line break in it was two lines
    (found by the override and latent fuzzers); argparse quoted an option-like override raw (\\x1e splits a line)."""
    from dcae.config import ConfigError
    from dcae.latent_file import read_latent
    from safetensors.torch import save_file
    from test_fuzz import LatentModel

    assert str(ConfigError("override a\nb: unknown key")) == "override a\\nb: unknown key"
    path = tmp_path / "latent.safetensors"
    save_file({"x\ny": torch.zeros(1)}, str(path))
    with pytest.raises(DCAEError) as caught:
        read_latent(path, LatentModel())
    assert "\n" not in str(caught.value) and "x\\ny" in str(caught.value)
    check_main(["train", "--phase", "1", "--data", str(train_images()), "ke\ny=1", "--print-config"])
    check_main(["train", "--phase", "1", "--data", str(train_images()), "-\u00f8\x1e\x8bN=--", "--print-config"])


@pytest.mark.parametrize("size", ["6402373705728000", "65536x65536", "16x1000000", "9" * 5000])
def test_export_refuses_an_example_too_large_before_allocating_it(tmp_path, size):
    """EXPORT_EXAMPLE_SIZE: `dcae export --size 6402373705728000` tried to allocate the example (RuntimeError), and a
    5000-digit size raised int()'s ValueError; both are one line before any tensor exists."""
    with exporter_stubbed(), guarded(max_growth=1 << 30):  # the example alone would take 100 GB and more
        assert check_main(["export", str(family_checkpoint("micro", "dcae")), "-o", str(tmp_path), "--size", size]) == 2


@pytest.mark.parametrize("lines", [
    ['{"step": 1, "loss": 1' + "0" * 400 + "}"],  # an integer float() cannot hold: OverflowError
    ['{"step": 1, "loss": 1e308}', '{"step": 2, "loss": 1e308}'],  # a flat line at 1e308: 10 ** 338 for a tick
    ['{"step": "5.5", "loss": 1}'],  # int("5.5") for the last step
    ['{"step": 1, "loss": -1e308}', '{"step": 2, "loss": 1e308}'],  # a span past float's range
    ["[" * 100_000, '{"step": 1}'],  # nested deeper than the JSON decoder goes
])
def test_report_of_a_hostile_log_is_a_page_or_one_error(tmp_path, lines):
    """REPORT_NUMBERS: dcae report on a log.jsonl with numbers at float's edges or a line nested too deeply raised
    OverflowError, ValueError or RecursionError (found by the report fuzzer)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text("\n".join(lines) + "\n")
    check_report("training", ("run", "\n".join(lines).encode(), None, {}))
    check_main(["report", str(run)])


@pytest.mark.parametrize("where", ["config.json", "metadata"])
def test_a_config_nested_too_deeply_is_one_error(tmp_path, where):
    """JSON_NESTING: a config.json (or dcae_config metadata) of 100 000 '[' raised RecursionError from
    `DCAE.from_pretrained`; now `not a readable JSON config (nested too deeply)`."""
    from test_fuzz import check_config

    check_config(where, None, "micro", "[" * 100_000)
    check_config(where, None, "1.5", '{"a":' * 100_000)


@pytest.mark.parametrize("device", ["meta", "mps", "xla:0"])
def test_training_on_a_device_nothing_runs_on_is_refused(device):
    """DEVICE_NAMES: `device=meta` or `device=mps` passed runtime.resolve_device and training died on RuntimeError
    ("META device type not an accelerator", "not linked with support for mps devices"); now one line."""
    check_overrides(("train-diffusion", [f"device={device}"]))
    with pytest.raises(DCAEError, match="expected auto, cpu, cuda or cuda:N"):
        from dcae.runtime import resolve_device

        resolve_device(device)


@pytest.mark.parametrize("override", ["optim.eps=-1495048", "optim.lr=nan", "optim.betas=(1.5,0.9)",
                                      "optim.weight_decay=-1"])
def test_train_diffusion_refuses_optimizer_values_adamw_refuses(override):
    """OPTIM_VALUES: found by the 10 000-input run: `dcae train-diffusion optim.eps=-1495048` reached AdamW, whose
    ValueError ("Invalid epsilon value") was a traceback; runs.build_optimizer checks them first (`check_optim`)."""
    from dcae.runs import OptimConfig, build_optimizer, check_optim
    from dcae.config import apply_overrides

    check_overrides(("train-diffusion", [override]))
    optim = apply_overrides(OptimConfig(), [override.removeprefix("optim.")])
    with pytest.raises(DCAEError, match=f"optim.{override.split('=')[0][6:]}="):
        check_optim(optim)
    with pytest.raises(DCAEError):
        build_optimizer([torch.nn.Parameter(torch.zeros(2))], optim)


def _seed_run(tmp_path: Path, kind: str) -> Path:
    run = tmp_path / kind
    shutil.copytree(seed_runs()[kind], run)
    return run


STATE_EDITS = [  # (path in state.pt, new value): each crashed `dcae train --resume` or `train-diffusion --resume`
    (("step",), ("tensor", "float32", (3,))),  # int() of a tensor: ValueError
    (("optimizer", "param_groups", 0), ("json", "1")),  # string indices: TypeError
    (("counters",), ("json", [])),
    (("data",), ("json", {})),
    (("rng", "torch"), ("tensor", "uint8", (5,))),
    (("step",), ("json", -(10 ** 12))),  # would train 10^12 steps
    (("optimizer", "state", 1, "step"), ("delete",)),  # AdamW: KeyError 'step'
    (("optimizer", "param_groups", 0, "fused"), ("tensor", "uint8", (5,))),
    (("counters", "skipped_images"), ("delete",)),  # KeyError at the end of the run (found by the 10 000-input run)
]


@pytest.mark.parametrize("path,value", STATE_EDITS, ids=lambda v: str(v)[:40])
def test_resume_of_a_hand_edited_state_pt_is_one_error(tmp_path, path, value):
    """RUN_STATE_UNCHECKED: state.pt is checked by type (`dcae.runs.check_state`) before resume uses it; before, each
    of these ended in a TypeError/ValueError/KeyError/RuntimeError traceback."""
    for kind in ("ae", "diffusion"):
        if path[0] == "rng" and kind == "diffusion" or path[0] in ("counters", "data") and kind == "diffusion":
            continue
        run = _seed_run(tmp_path, kind)
        apply_run_ops(run, [("state", "checkpoints/step_00000002/state.pt", [(path, value)])])
        command = "train" if kind == "ae" else "train-diffusion"
        with guarded(seconds=60):
            assert check_main([command, "--resume", str(run), "--steps", "2", "progress=false"]) == 2
        shutil.rmtree(run)


@pytest.mark.parametrize("edit", [
    ("latest", "step_" + "9" * 300),  # OSError: file name too long
    ("json", "config.json", '{"steps": "x"}'),
    ("json", "checkpoints/step_00000002/train_config.json", "null"),
    ("json", "checkpoints/step_00000002/train_config.json", '{"model": {"arch": "dit", "patch_size": {}}}'),
], ids=["long-pointer", "string-steps", "null-config", "dict-patch-size"])
def test_resume_of_a_damaged_run_directory_is_one_error_or_works(tmp_path, edit):
    """RUN_STATE_UNCHECKED: a latest pointer naming a 300-digit step, a config value of the wrong type, a config that
    is not an object: one error line (or a resume from the last complete checkpoint), never a traceback."""
    for kind in ("ae", "diffusion"):
        run = _seed_run(tmp_path, kind)
        apply_run_ops(run, [edit])
        check_main(["train" if kind == "ae" else "train-diffusion", "--resume", str(run), "--steps", "2",
                    "progress=false"])
        shutil.rmtree(run)


def test_a_checkpoint_missing_its_ema_is_passed_over(tmp_path):
    """RUN_STATE_UNCHECKED: a step_N directory without ema.safetensors (deleted by hand) counted as complete, and
    train-diffusion's resume died on FileNotFoundError; now the previous complete checkpoint is the latest."""
    from dcae.runs import latest_checkpoint

    for kind in ("ae", "diffusion"):
        run = _seed_run(tmp_path, kind)
        (run / "checkpoints" / "step_00000002" / "ema.safetensors").unlink()
        assert latest_checkpoint(run).name == "step_00000001"
        assert check_main(["train" if kind == "ae" else "train-diffusion", "--resume", str(run), "--steps", "2",
                           "progress=false"]) == 0
        assert latest_checkpoint(run).name == "step_00000002"


# Found by these fuzzers in the two trainers (dcae/train.py, dcae/diffusion/*) and fixed in a later change; each was a
# strict xfail until then.


@pytest.mark.parametrize("damage", ["truncated", "metadata", "field", "model"])
def test_diffusion_resume_and_sampling_of_a_corrupt_checkpoint_is_one_error(tmp_path, damage):
    from dcae.diffusion.train import load_diffusion_checkpoint

    run = _seed_run(tmp_path, "diffusion")
    weights = run / "checkpoints" / "step_00000002" / "ema.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
        check_main(["train-diffusion", "--resume", str(run), "--steps", "2", "progress=false"])
        return
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(weights), framework="pt") as f:
        info = json.loads(f.metadata()["dcae_diffusion"])
    tensors = load_file(str(weights))
    if damage == "field":  # each field `dcae sample` reads, of the wrong type or missing
        for key, value in [("objective", ["flow"]), ("latent_shape", None), ("class_names", "ab"), ("step", True),
                           ("cache_latent_shape", [1, 2]), ("autoencoder", None)]:
            save_file(tensors, str(weights), metadata={"dcae_diffusion": json.dumps({**info, key: value})})
            with pytest.raises(DCAEError, match=f"metadata field {key}="):
                load_diffusion_checkpoint(run)
    text = {"metadata": "{not json",
            "field": json.dumps({**info, "scaling_factor": "x"}),  # what `dcae sample` would multiply by
            "model": json.dumps({**info, "model": {**info["model"], "hidden_size": 2 ** 20}})}[damage]
    save_file(tensors, str(weights), metadata={"dcae_diffusion": text})
    with pytest.raises(DCAEError, match={"metadata": "bad dcae_diffusion metadata", "field": "scaling_factor='x'",
                                         "model": "model.hidden_size=1048576"}[damage]):
        load_diffusion_checkpoint(run)
    expect_clean(lambda: load_diffusion_checkpoint(run))


@pytest.mark.parametrize("kind", ["ae", "diffusion"])
def test_resume_with_an_optimizer_group_of_another_size_is_one_error(tmp_path, kind):
    run = _seed_run(tmp_path, kind)
    apply_run_ops(run, [("state", "checkpoints/step_00000002/state.pt",  # parameter 0 and its state dropped
                         [(("optimizer", "param_groups", 0, "params", 0), ("delete",)),
                          (("optimizer", "state", 0), ("delete",))])])
    check_main(["train" if kind == "ae" else "train-diffusion", "--resume", str(run), "--steps", "2",
                "progress=false"])


@pytest.mark.parametrize("override", ["model.hidden_size=247985439478575456", "model.hidden_size=-3042",
                                      "model.hidden_size=1", "model.num_heads=0", "seed=-1"])
def test_train_diffusion_refuses_a_config_out_of_range(override):
    check_overrides(("train-diffusion", [override]))


def test_train_refuses_a_negative_discriminator_learning_rate(tmp_path):
    check_main(["train", "--phase", "3", "--init", str(nano_checkpoint()), "--data", str(train_images()), "--steps",
                "1", "--batch-size", "1", "--resolution", "32", "--run-dir", str(tmp_path / "run"),
                "data.num_workers=0", "progress=false", "phase.lpips_weight=0", "phase.gan.disc_lr=-1"])


def test_resume_of_a_diffusion_run_whose_saved_model_is_not_an_object_is_one_error(tmp_path):
    run = _seed_run(tmp_path, "diffusion")
    path = run / "checkpoints" / "step_00000002" / "train_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "model": "ResBlock"}))
    check_main(["train-diffusion", "--resume", str(run), "--steps", "2", "progress=false"])


def test_cache_index_with_a_list_as_dtype_is_one_error():
    from test_fuzz import check_cache

    index, shards = cache_seed()
    check_cache({**_json_safe(index), "dtype": [1]}, shards)


# ----------------------------------------------------------------------------------------------------------------------
def test_hardening_doc_tables_match_the_results():
    """docs/hardening.md's generated tables are what results/fuzz.json and results/soak.json render to (regenerate
    with `python scripts/fuzz.py --render` / `python scripts/soak.py --render`)."""
    from scripts import fuzz, soak

    text = fuzz.DOC.read_text()
    for script in (fuzz, soak):
        rendered = script.markdown(json.loads(((fuzz.REPO / "results") / script.RESULTS.name).read_text()))
        assert f"{script.BEGIN}\n{rendered}\n{script.END}" in text, f"run: python scripts/{script.__name__[8:]}.py --render"
