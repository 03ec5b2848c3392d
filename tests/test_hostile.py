"""Hostile checkpoints, configs and environments: nothing lost, nobody let in.

- Checkpoints: enormous declared tensors, pickles that run code, configs with absurd sizes; a static scan for any
  code path that would execute or import what a file names.
- Training under faults: SIGKILL at random moments and resume (weights equal to an uninterrupted run), a read-only
  run directory, a hostile state.pt, a saved config that would run a shell command, values no run can use.
- Resource bounds: a latent or a checkpoint tensor larger than anything the caller accepts, a compressed tar member.

Tests that reproduced a bug stay as regression tests; docs/hardening.md describes each bug and its fix.
"""
from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_fuzz import guarded, micro_checkpoint, micro_config, one_line_dcae_error

import dcae
from dcae.cli import main
from dcae.errors import DCAEError

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
BSDS_TRAIN = DATA / "bsds500" / "train"



def run_cli(argv: list[str]) -> tuple[int, str, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def assert_one_error_line(stderr: str, command: str) -> None:
    notes = (f"dcae {command}: warning", f"dcae {command}: running on ")  # the runtime's one info line is no error
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith(notes)]
    assert len(lines) == 1 and lines[0].startswith(f"dcae {command}: error: "), stderr


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: enormous declared tensors
def raw_safetensors(header: dict, body: bytes = b"", length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + body


@pytest.mark.parametrize("case", ["huge_shape", "offsets_past_end", "header_length_2e63", "header_length_past_end",
                                  "overlapping_offsets", "shape_offset_mismatch"])
def test_enormous_declared_tensors_are_refused_from_the_header(tmp_path, case):
    """A header that declares more than the file holds is refused before any tensor memory is allocated."""
    body = b"\x00" * 64
    headers = {
        "huge_shape": {"w": {"dtype": "F32", "shape": [1 << 31, 1 << 31], "data_offsets": [0, 64]}},
        "offsets_past_end": {"w": {"dtype": "F32", "shape": [1 << 28], "data_offsets": [0, 1 << 30]}},
        "header_length_2e63": {"w": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]}},
        "header_length_past_end": {"w": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]}},
        "overlapping_offsets": {"a": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]},
                                "b": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]}},
        "shape_offset_mismatch": {"w": {"dtype": "F64", "shape": [1 << 40], "data_offsets": [0, 64]}},
    }
    length = {"header_length_2e63": 1 << 63, "header_length_past_end": 1 << 20}.get(case)
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw_safetensors(headers[case], body, length))
    with pytest.raises(DCAEError) as caught, guarded(seconds=30, max_growth=64 << 20):
        dcae.DCAE.from_pretrained(path)
    one_line_dcae_error(caught.value)


def sparse_safetensors(path: Path, tensors: dict[str, torch.Tensor], extra: dict[str, tuple[str, list[int]]],
                       metadata: dict[str, str]) -> None:
    """A valid safetensors file whose `extra` tensors are holes: large on paper, no disk and no time to write."""
    sizes = {"F32": 4, "U8": 1}
    header: dict[str, Any] = {"__metadata__": metadata}
    chunks, offset = [], 0
    for name, tensor in tensors.items():
        data = tensor.contiguous().numpy().tobytes()
        header[name] = {"dtype": {torch.float32: "F32", torch.int64: "I64", torch.uint8: "U8"}[tensor.dtype],
                        "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    for name, (dtype, shape) in extra.items():
        size = sizes[dtype] * int(torch.tensor(shape).prod())
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text + b"".join(chunks))
        handle.truncate(8 + len(text) + offset)


HUGE = ("F32", [128, 1024, 1024])  # 512 MiB on paper


def test_checkpoint_with_an_unexpected_huge_tensor_is_refused_before_reading_it(tmp_path):
    """The micro model's weights plus a 512 MiB tensor it does not have: a key error, without reading 512 MiB.

    Holds because safetensors maps tensors from the file lazily and the key check runs before load_state_dict."""
    source = micro_checkpoint("dcae") / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(source), "pt") as handle:
        metadata = handle.metadata()
    sparse_safetensors(tmp_path / "model.safetensors", load_file(str(source)), {"junk": HUGE}, metadata)
    with pytest.raises(DCAEError, match="unexpected"), guarded(seconds=60, max_growth=128 << 20):
        dcae.DCAE.from_pretrained(tmp_path / "model.safetensors")
def test_small_checkpoint_whose_config_describes_a_big_model_is_refused_before_building_it(tmp_path):
    """The micro weights (135 kB) with `dcae_config: "{}"` in the metadata (the 323M-parameter default config):
    the names and shapes differ, which the meta device tells without allocating the big model (found by the fuzzer)."""
    tensors = load_file(str(micro_checkpoint("dcae") / "model.safetensors"))
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt", "dcae_config": "{}"})
    with pytest.raises(DCAEError, match="does not match"), guarded(seconds=60, max_growth=256 << 20):
        dcae.DCAE.from_pretrained(tmp_path / "model.safetensors")
def test_decode_refuses_an_oversized_latent_before_reading_it(tmp_path):
    """A latent that decodes to 8192x8192x(4^2) pixels: over --max-pixels, refused from its header."""
    from dcae.latent_file import autoencoder_config_hash as config_hash

    model = dcae.DCAE.from_pretrained(micro_checkpoint("dcae"))
    meta = {"format": "dcae-latent/1", "config_hash": config_hash(model), "spatial_factor": "4", "latent_channels": "4"}
    sparse_safetensors(tmp_path / "big.safetensors", {}, {"latent": ("F32", [4, 4096, 8192])}, meta)
    with guarded(seconds=60, max_growth=128 << 20):
        code, _, stderr = run_cli(["decode", str(tmp_path / "big.safetensors"), "-o", str(tmp_path / "out"),
                                   "--model", str(micro_checkpoint("dcae")), "--max-pixels", str(1 << 24)])
    assert code == 1 and "over the limit" in stderr, stderr
    assert_one_error_line(stderr, "decode")


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: pickles
class _RunsCode:
    """Unpickling this calls os.system: the canonical hostile pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def hostile_pickle(path: Path, marker: Path) -> Path:
    torch.save({"encoder.project_in.conv.weight": torch.zeros(1), "payload": _RunsCode(marker)}, path)
    return path


@pytest.mark.parametrize("name", ["model.pt", "model.bin", "model.ckpt", "model.pth", "model.pkl"])
def test_pickle_checkpoints_are_refused_and_never_run_code(tmp_path, name):
    marker = tmp_path / "PWNED"
    path = hostile_pickle(tmp_path / name, marker)
    with pytest.raises(DCAEError, match="pickle checkpoints are not loaded by default"):
        dcae.DCAE.from_pretrained(path)
    with pytest.raises(DCAEError, match="refused or unreadable pickle"):
        dcae.DCAE.from_pretrained(path, allow_pickle=True)  # weights_only=True: os.system is not an allowed global
    with pytest.raises(DCAEError, match="no checkpoint found"):
        dcae.DCAE.from_pretrained(tmp_path)  # a directory holding only a pickle
    with pytest.raises(DCAEError, match="refused or unreadable pickle"):
        dcae.DCAE.from_pretrained(tmp_path, allow_pickle=True)
    assert not marker.exists()


def test_a_pickle_named_safetensors_is_not_unpickled(tmp_path):
    marker = tmp_path / "PWNED"
    hostile_pickle(tmp_path / "model.safetensors", marker)
    (tmp_path / "config.json").write_text(json.dumps(micro_config().to_dict()))
    with pytest.raises(DCAEError, match="not a readable safetensors file"):
        dcae.DCAE.from_pretrained(tmp_path)
    assert not marker.exists()


def test_a_plain_pickle_state_dict_loads_when_allowed(tmp_path):
    """The positive control: allow_pickle reads a tensors-only state dict (with its config.json)."""
    model = dcae.DCAE.from_pretrained(micro_checkpoint("dcae"))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(json.dumps(micro_config().to_dict()))
    loaded = dcae.DCAE.from_pretrained(tmp_path / "model.pt", allow_pickle=True)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------------------------------------------------
# Configs with absurd values: refused before a single weight is allocated
def _absurd(path: tuple, value: Any) -> dict:
    config = micro_config().to_dict()
    target = config
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return config


ABSURD_CONFIGS = {
    "negative_width": _absurd(("encoder", "width_list"), [8, -16, 16]),
    "billion_channels": _absurd(("encoder", "width_list"), [8, 10 ** 9, 16]),
    "billion_latent_channels": _absurd(("latent_channels",), 10 ** 9),
    "negative_latent_channels": _absurd(("latent_channels",), -4),
    "zero_head_dim": _absurd(("attention_head_dim",), 0),
    "huge_depth": _absurd(("decoder", "depth_list"), [0, 10 ** 6, 1]),
    "string_channels": _absurd(("latent_channels",), "4"),
    "string_widths": _absurd(("decoder", "width_list"), "abc"),
    "float_depth": _absurd(("encoder", "depth_list"), [0, 1.5, 1]),
    "nan_scaling": _absurd(("scaling_factor",), float("nan")),
    "string_scaling": _absurd(("scaling_factor",), "abc"),
    "forty_stages": _absurd(("encoder", "width_list"), [8] * 40),
}
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the hang alarm inside a gc callback
@pytest.mark.parametrize("name", sorted(ABSURD_CONFIGS))
def test_absurd_configs_are_rejected_before_building(tmp_path, name):
    """Each absurd config in the checkpoint metadata: a one-line DCAEError in milliseconds (10 s counts as a hang),
    no allocation."""
    tensors = load_file(str(micro_checkpoint("dcae") / "model.safetensors"))
    save_file(tensors, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt", "dcae_config": json.dumps(ABSURD_CONFIGS[name])})
    with pytest.raises(DCAEError) as caught, guarded(seconds=10, max_growth=64 << 20):
        dcae.DCAE.from_pretrained(tmp_path / "model.safetensors")
    one_line_dcae_error(caught.value)
@pytest.mark.parametrize("name", ["negative_width", "billion_channels", "zero_head_dim", "string_channels",
                                  "nan_scaling", "huge_depth"])
def test_config_from_dict_validates_ranges(name):
    """DCAEConfig.from_dict itself refuses (ValueError) what no model can be built from."""
    with pytest.raises((ValueError, DCAEError)), guarded(seconds=10, max_growth=64 << 20):
        dcae.DCAEConfig.from_dict(ABSURD_CONFIGS[name])
@pytest.mark.parametrize("key,value", [("latent_channels", 10 ** 9), ("encoder_block_out_channels", [8, 10 ** 9, 16]),
                                       ("decoder_layers_per_block", "abc"), ("attention_head_dim", 0),
                                       ("in_channels", -3)])
def test_diffusers_config_json_with_wrong_values(tmp_path, key, value):
    from dcae.weights import diffusers_config

    weights = micro_checkpoint("diffusers") / "diffusion_pytorch_model.safetensors"
    save_file(load_file(str(weights)), str(tmp_path / weights.name), metadata={"format": "pt"})  # as diffusers writes
    config = {**diffusers_config(micro_config()), key: value}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(DCAEError) as caught, guarded(seconds=30, max_growth=64 << 20):
        dcae.DCAE.from_pretrained(tmp_path)
    one_line_dcae_error(caught.value)


def test_the_micro_config_itself_loads(tmp_path):
    """Control for the tests above: the unmodified configs in the same files load."""
    from dcae.weights import diffusers_config

    tensors = load_file(str(micro_checkpoint("dcae") / "model.safetensors"))
    save_file(tensors, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt", "dcae_config": json.dumps(micro_config().to_dict())})
    assert isinstance(dcae.DCAE.from_pretrained(tmp_path / "model.safetensors"), dcae.DCAE)
    weights = micro_checkpoint("diffusers") / "diffusion_pytorch_model.safetensors"
    (tmp_path / "diffusers").mkdir()
    save_file(load_file(str(weights)), str(tmp_path / "diffusers" / weights.name), metadata={"format": "pt"})
    (tmp_path / "diffusers" / "config.json").write_text(json.dumps(diffusers_config(micro_config())))
    assert dcae.DCAE.from_pretrained(tmp_path / "diffusers").config.encoder.width_list == (8, 16, 16)


# ----------------------------------------------------------------------------------------------------------------------
# No trust_remote_code-like paths: a static scan of the package
COMMAND_TABLES = ("dcae/cli.py", "dcae/commands/bench.py")  # import_module over a constant {name: module} table


def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            out.append((ast.unparse(node.func), node))
    return out


def _keyword(call: ast.Call, name: str) -> Any:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else ast.unparse(kw.value)
    return None


def test_no_code_runs_from_files_or_configs():
    """Every torch.load has weights_only=True, np.load allow_pickle=False; no eval/exec/pickle.load/yaml.load/
    os.system/shell=True/trust_remote_code; importlib only in the CLI's fixed command table; any Unpickler
    subclass restricts find_class."""
    problems = []
    for path in sorted((ROOT / "dcae").rglob("*.py")):
        source = path.read_text()
        tree = ast.parse(source)
        where = path.relative_to(ROOT)
        if "trust_remote_code" in source:
            problems.append(f"{where}: mentions trust_remote_code")
        for name, call in _calls(tree):
            line = f"{where}:{call.lineno}: {name}"
            if name == "torch.load" and _keyword(call, "weights_only") is not True:
                problems.append(f"{line} without weights_only=True")
            if name in ("np.load", "numpy.load") and _keyword(call, "allow_pickle") is not False:
                problems.append(f"{line} without allow_pickle=False")
            if name in ("eval", "exec", "compile", "__import__", "pickle.load", "pickle.loads", "marshal.loads",
                        "yaml.load", "yaml.unsafe_load", "os.system", "os.popen", "dill.load", "cloudpickle.load"):
                problems.append(line)
            if name.startswith("subprocess.") and _keyword(call, "shell") not in (None, False):
                problems.append(f"{line} with shell=True")
            if name in ("importlib.import_module", "import_module") and where.as_posix() not in COMMAND_TABLES:
                problems.append(f"{line} outside the CLI command tables")
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any("Unpickler" in ast.unparse(b) for b in node.bases):
                if not any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body):
                    problems.append(f"{where}:{node.lineno}: Unpickler subclass without a restricted find_class")
    assert not problems, "\n".join(problems)


def test_cli_imports_only_its_own_command_modules():
    """The two tables importlib reads are constants naming dcae modules; an unknown command is refused."""
    from dcae.cli import COMMANDS
    from dcae.commands.bench import TARGETS

    modules = [module for module, _ in [*COMMANDS.values(), *TARGETS.values()]]
    assert all(m.startswith("dcae.") and m.replace(".", "").replace("_", "").isalnum() for m in modules), modules
    code, _, stderr = run_cli(["os.system"])
    assert code == 2 and "unknown command" in stderr


# ----------------------------------------------------------------------------------------------------------------------
# Training with the micro model: a one-step run to attack
def small_data(root: Path, count: int = 3) -> Path:
    """A few BSDS500 training images copied (not linked) into the test's own folder."""
    if not BSDS_TRAIN.is_dir():
        pytest.skip(f"shared data not found at {BSDS_TRAIN}")
    folder = root / "data"
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(BSDS_TRAIN.glob("*.jpg"))[:count]:
        shutil.copy(path, folder / path.name)
    return folder


def micro_train_args(run_dir: Path, data: Path, steps: int = 1) -> list[str]:
    return ["train", "--phase", "1", "--init", str(micro_checkpoint("dcae")), "--data", str(data), "--steps",
            str(steps), "--batch-size", "1", "--resolution", "32", "--seed", "0", "--run-dir", str(run_dir),
            "data.num_workers=0", "progress=false", "phase.lpips_weight=0", "ckpt_every=1", "log_every=1"]


@pytest.fixture
def micro_run(tmp_path) -> Path:
    """A finished one-step run of the micro model: config.json, log.jsonl, checkpoints/step_00000001."""
    run_dir = tmp_path / "run"
    code, _, stderr = run_cli(micro_train_args(run_dir, small_data(tmp_path)))
    assert code == 0, stderr
    return run_dir


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    from dcae.runs import latest_checkpoint

    latest = latest_checkpoint(run_dir)
    return {p.name: p.read_bytes() for p in latest.iterdir() if p.is_file()} | {"name": latest.name.encode()}


def _privileges_dropped() -> list[str]:
    """A command prefix under which root cannot write through permissions (setpriv drops CAP_DAC_OVERRIDE)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("needs a root feature: running as root without setpriv, a read-only directory would still be writable")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"]
def test_read_only_run_dir_gives_one_error_line_and_keeps_the_checkpoint(micro_run):
    before = _snapshot(micro_run)
    paths = [micro_run, *micro_run.rglob("*")]
    modes = {p: p.stat().st_mode for p in paths}
    for p in paths:
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        result = subprocess.run([*_privileges_dropped(), sys.executable, "-m", "dcae.cli", "train", "--resume",
                                 str(micro_run), "--steps", "2"], cwd=ROOT, capture_output=True, text=True,
                                timeout=300)
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    assert _snapshot(micro_run) == before  # nothing lost
    assert result.returncode not in (0, 1) and "Traceback" not in result.stderr, result.stderr
    assert_one_error_line(result.stderr, "train")


def run_on_full_disk(tmp_path: Path, script: str, size_kb: int = 1024) -> str:
    """Run shell `script` with $FULL a fresh tmpfs of `size_kb` KB (a user+mount namespace: no root needed).

    The script fills the tmpfs itself (`fill`: a filler file takes what is left) after copying in what it needs;
    the namespace, and the tmpfs with it, ends with the script, so the script reports what it saw on stdout.
    """
    unshare = shutil.which("unshare")
    full = tmp_path / "full"
    full.mkdir()
    probe = subprocess.run([unshare or "unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {full}"],
                           capture_output=True, text=True) if unshare else None
    if probe is None or probe.returncode != 0:
        pytest.skip("needs a root feature: no user namespaces here, cannot mount a small tmpfs to fill")
    prelude = (f"set -u; FULL={full}; mount -t tmpfs -o size={size_kb}k tmpfs $FULL; "
               "fill() { dd if=/dev/zero of=$FULL/filler bs=4k 2>/dev/null; true; }; ")
    result = subprocess.run([unshare, "-rm", "sh", "-c", prelude + script], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    return result.stdout + result.stderr


def test_full_disk_gives_one_error_line_and_keeps_the_checkpoint(micro_run, tmp_path):
    """The next checkpoint cannot be written: one error line, exit 2, the previous checkpoint intact and loadable."""
    before = _snapshot(micro_run)
    check = ("import json, sys; sys.path.insert(0, 'tests'); from test_hostile import _snapshot; import dcae; "
             "run = sys.argv[1]; dcae.DCAE.from_pretrained(run); "
             "print(json.dumps({k: v.hex() for k, v in _snapshot(__import__('pathlib').Path(run)).items()}))")
    output = run_on_full_disk(tmp_path, f"""
        cp -a {micro_run} $FULL/run && fill
        {sys.executable} -m dcae.cli train --resume $FULL/run --steps 3 2> {tmp_path}/stderr
        echo "status=$?"
        ls -A $FULL/run/checkpoints | sed 's/^/entry=/'
        {sys.executable} -c "{check}" $FULL/run""")
    stderr = (tmp_path / "stderr").read_text()
    assert "status=2" in output, output + stderr
    assert_one_error_line(stderr, "train")
    assert "cannot write checkpoint step_00000002: No space left on device" in stderr
    assert "the previous checkpoint is kept" in stderr
    assert sorted(line[6:] for line in output.splitlines() if line.startswith("entry=")) == \
        ["latest", "step_00000001"]  # no temp directory left behind
    snapshot = json.loads(output.strip().splitlines()[-1])
    assert {k: bytes.fromhex(v) for k, v in snapshot.items()} == before


def test_full_disk_while_writing_images_loses_nothing(tmp_path):
    """Reconstructions onto a full disk: one error line per image, no partial or temporary file, exit status 1."""
    from PIL import Image

    images = tmp_path / "in"
    images.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((64, 96, 3), 128, np.uint8)).save(images / name)
    model = tmp_path / "model"
    dcae.create_model("dc-ae-tiny-f32c32").save_pretrained(model)
    output = run_on_full_disk(tmp_path, f"""
        mkdir $FULL/out && fill
        {sys.executable} -m dcae.cli reconstruct {images} -o $FULL/out --model {model} 2> {tmp_path}/stderr
        echo "status=$?"
        ls -A $FULL/out | sed 's/^/entry=/'""", size_kb=64)
    stderr = (tmp_path / "stderr").read_text()
    assert "status=1" in output, output + stderr
    lines = [line for line in stderr.splitlines() if line.strip() and not ("warning" in line or "running on" in line)]
    assert len(lines) == 2 and all("cannot write: No space left on device" in line for line in lines), stderr
    assert "entry=" not in output  # neither a partial output nor a temporary file


def test_full_disk_while_caching_latents_loses_nothing(tmp_path):
    """`dcae cache-latents` onto a full disk: one error line, exit 2, no temporary file left behind."""
    from PIL import Image

    (tmp_path / "data" / "x").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((40, 36, 3), 60 * i, np.uint8)).save(tmp_path / "data" / "x" / f"{i}.png")
    output = run_on_full_disk(tmp_path, f"""
        mkdir $FULL/cache && fill
        {sys.executable} -m dcae.cli cache-latents --model dc-ae-tiny-f32c32 --data {tmp_path / 'data'} \
            -o $FULL/cache --resolution 32 --device cpu 2> {tmp_path}/stderr
        echo "status=$?"
        ls -A $FULL/cache | sed 's/^/entry=/'""", size_kb=64)
    stderr = (tmp_path / "stderr").read_text()
    assert "status=2" in output, output + stderr
    [line] = [line for line in stderr.splitlines() if "error" in line]  # the rest: a warning and the progress bar
    assert line.startswith("dcae cache-latents: error: ") and "Traceback" not in stderr
    assert "index.json: cannot write: No space left on device" in line
    assert "entry=" not in output


def test_hostile_state_pt_never_runs_code(micro_run):
    from dcae.runs import latest_checkpoint

    marker = micro_run / "PWNED"
    torch.save({"step": 1, "payload": _RunsCode(marker)}, latest_checkpoint(micro_run) / "state.pt")
    with contextlib.suppress(Exception):
        run_cli(["train", "--resume", str(micro_run), "--steps", "2"])
    assert not marker.exists()
def test_hostile_state_pt_is_a_one_line_error(micro_run):
    from dcae.runs import latest_checkpoint

    torch.save({"step": 1, "payload": _RunsCode(micro_run / "PWNED")}, latest_checkpoint(micro_run) / "state.pt")
    code, _, stderr = run_cli(["train", "--resume", str(micro_run), "--steps", "2"])
    assert code == 2
    assert_one_error_line(stderr, "train")
def test_resume_does_not_run_a_pipe_command_from_a_saved_config(micro_run):
    """config.json is data: a `pipe:` data path saved in it must not run on --resume (it may when typed as --data)."""
    marker = micro_run / "PWNED"
    config = json.loads((micro_run / "config.json").read_text())
    config["data"]["path"] = f"pipe:touch {marker}; cat /dev/null"
    (micro_run / "config.json").write_text(json.dumps(config))
    code, _, stderr = run_cli(["train", "--resume", str(micro_run), "--steps", "2"])
    assert not marker.exists(), "the saved config ran a shell command"
    assert code == 2
    assert_one_error_line(stderr, "train")


def test_resume_with_a_truncated_latest_pointer_and_a_torn_checkpoint(micro_run):
    """A `latest` pointer naming a missing step and a half-written step dir: resume uses the last complete one."""
    from dcae.runs import latest_checkpoint, load_state

    root = micro_run / "checkpoints"
    (root / "latest").write_text("step_00000099\n")
    torn = root / "step_00000005"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"\x00" * 10)  # no state.pt: not complete
    assert latest_checkpoint(micro_run).name == "step_00000001"
    code, _, stderr = run_cli(["train", "--resume", str(micro_run), "--steps", "2"])
    assert code == 0, stderr
    assert load_state(latest_checkpoint(micro_run))["step"] == 2


# ----------------------------------------------------------------------------------------------------------------------
# Training values no run can use: refused before the run starts
@pytest.mark.parametrize("override", ["seed=-5", "data.num_workers=-1", "phase.resolution=100000", "ema_decay=nan",
                                      "ema_decay=2", "optim.lr=-1", "optim.lr=nan", "data.prefetch_factor=0",
                                      "optim.betas=(1.5,0.9)", "optim.eps=0", "data.max_retries=0"])
def test_train_config_ranges(override):
    from dcae.train import TrainConfig, apply_overrides, check_config

    config = apply_overrides(TrainConfig(), ["data.num_workers=2", override])
    with pytest.raises(DCAEError):
        check_config(config)


def test_resolution_not_a_multiple_of_the_spatial_factor(tmp_path):
    """A 30 px crop for an f4 model: one error line before the first step, not a ValueError traceback."""
    args = micro_train_args(tmp_path / "run", small_data(tmp_path, 2))
    args[args.index("--resolution") + 1] = "30"
    code, _, stderr = run_cli(args)
    assert code == 2 and "Traceback" not in stderr
    assert_one_error_line(stderr, "train")


# ----------------------------------------------------------------------------------------------------------------------
# Tar shards: member size bound
def test_compressed_tar_member_does_not_inflate_without_bound(tmp_path):
    """A 300 MiB member of zeros, gzip-compressed to ~300 KiB: skipped from its declared size, not read."""
    from dcae.data import DataConfig, TrainStream

    size = 300 << 20
    header = tarfile.TarInfo("000.jpg")
    header.size = size
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)  # gzip framing
    parts = [compressor.compress(header.tobuf(format=tarfile.GNU_FORMAT))]
    zeros = bytes(1 << 20)
    for _ in range(size >> 20):
        parts.append(compressor.compress(zeros))
    parts.append(compressor.compress(bytes(1024)))  # end-of-archive blocks
    parts.append(compressor.flush())
    shard = tmp_path / "bomb.tar"
    shard.write_bytes(b"".join(parts))
    with pytest.raises(DCAEError, match="no usable images"), guarded(seconds=120, max_growth=128 << 20):
        stream = TrainStream(DataConfig(path=str(shard), num_workers=0), resolution=32, batch_size=1, seed=0)
        try:
            next(stream)
        finally:
            stream.close()


# ----------------------------------------------------------------------------------------------------------------------
# SIGKILL at random moments, resume, compare with an uninterrupted run
def train_command(run_dir: Path, data: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "dcae.cli", "train", "--preset", "dc-ae-tiny-f32c32", "--phase", "1", "--data",
            str(data), "--steps", str(steps), "--batch-size", "2", "--resolution", "32", "--seed", "0", "--run-dir",
            str(run_dir), "data.num_workers=0", "progress=false", "phase.lpips_weight=0", "ckpt_every=1",
            "log_every=1", "optim.warmup_steps=2", "ema_decay=0.9"]


def _env() -> dict[str, str]:
    # One thread: the same float summation order in every process, so resumed runs can match bit for bit.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _max_diff(a: Path, b: Path) -> float:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    return max((x[k].double() - y[k].double()).abs().max().item() for k in x if x[k].numel())


def kill_resume_cycles(root: Path, kills: int, steps: int, seed: int, log=print) -> dict[str, Any]:
    """Train `steps` steps straight, then again with `kills` SIGKILLs at random moments (mid-step, mid-checkpoint,
    at start-up), resuming after each; returns what happened and the final max weight differences."""
    from dcae.runs import CHECKPOINT_SLEEP_ENV, latest_checkpoint, load_state

    rng = random.Random(seed)
    data = small_data(root, 4)
    straight = root / "straight"
    subprocess.run(train_command(straight, data, steps), cwd=ROOT, env=_env(), check=True, capture_output=True,
                   timeout=1200)
    run_dir, events = root / "killed", []
    for cycle in range(kills):
        latest = latest_checkpoint(run_dir)
        command = train_command(run_dir, data, steps)
        if latest is not None:
            command = [sys.executable, "-m", "dcae.cli", "train", "--resume", str(run_dir), "--steps", str(steps)]
        moment = rng.choice(["startup", "mid-step", "mid-checkpoint"])
        env = _env() | ({CHECKPOINT_SLEEP_ENV: "1"} if moment == "mid-checkpoint" else {})
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        start_step = 0 if latest is None else int(load_state(latest)["step"])
        deadline = time.monotonic() + 600
        try:
            if moment == "startup":
                time.sleep(rng.uniform(0.0, 2.0))
            else:
                target = start_step + rng.randint(1, max(1, (steps - start_step) // 2))
                pending = run_dir / "checkpoints" / f".tmp_step_{target:08d}"
                done = run_dir / "checkpoints" / f"step_{target:08d}" / "state.pt"
                while process.poll() is None and time.monotonic() < deadline:
                    if moment == "mid-checkpoint" and (pending / "state.pt").exists():
                        break
                    if moment == "mid-step" and done.exists():
                        time.sleep(rng.uniform(0.0, 0.5))  # somewhere inside the next step
                        break
                    time.sleep(0.02)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
            process.wait()
            stderr = process.stderr.read().decode(errors="replace")
            process.stderr.close()
        latest = latest_checkpoint(run_dir)
        if latest is not None:  # whatever was interrupted, the newest complete checkpoint loads
            dcae.DCAE.from_pretrained(run_dir)
            dcae.DCAE.from_pretrained(latest)
        step = None if latest is None else int(load_state(latest)["step"])
        events.append({"cycle": cycle + 1, "moment": moment, "returncode": process.returncode,
                       "checkpoint_step_after": step})
        log(f"kill {cycle + 1}/{kills}: {moment}, exit {process.returncode}, latest checkpoint step {step}")
        if process.returncode == 0:
            log("  (the run finished before the kill landed)")
        elif process.returncode != -signal.SIGKILL:
            raise AssertionError(f"training failed on its own (exit {process.returncode}):\n{stderr[-2000:]}")
    command = ([sys.executable, "-m", "dcae.cli", "train", "--resume", str(run_dir), "--steps", str(steps)]
               if latest_checkpoint(run_dir) is not None else train_command(run_dir, data, steps))
    if latest_checkpoint(run_dir) is None or int(load_state(latest_checkpoint(run_dir))["step"]) < steps:
        subprocess.run(command, cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=1200)
    final = latest_checkpoint(run_dir)
    dcae.DCAE.from_pretrained(run_dir)
    return {"kills": kills, "steps": steps, "events": events, "final_step": int(load_state(final)["step"]),
            "max_abs_diff_model": _max_diff(straight / "model.safetensors", run_dir / "model.safetensors"),
            "max_abs_diff_ema": _max_diff(straight / "ema.safetensors", run_dir / "ema.safetensors")}


@pytest.mark.slow
def test_sigkill_three_times_then_resume_matches_an_uninterrupted_run(tmp_path):
    result = kill_resume_cycles(tmp_path, kills=3, steps=8, seed=1)
    assert result["final_step"] == 8
    assert result["max_abs_diff_model"] <= 1e-6 and result["max_abs_diff_ema"] <= 1e-6, result
