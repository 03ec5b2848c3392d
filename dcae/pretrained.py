"""Loading checkpoints: find the file, read it, decide which model it is, translate its layout, build the model.

This is the one module that needs both the preset registry (which published model a config-less checkpoint is, and
its scaling factor) and the layouts (`dcae.weights`); `DCAE.from_pretrained` imports it when called.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch

from dcae import presets
from dcae.autoencoder import DCAE, DCAEConfig
from dcae.errors import DCAEError
from dcae.presets import name_hint
from dcae.weights import (DCAE_WEIGHTS, DIFFUSERS_WEIGHTS, FORMATS, PICKLE_SUFFIXES, check_model_size, check_shapes,
                          config_from_diffusers, config_from_json_text, default_model_path, from_diffusers,
                          from_efficientvit, load_state_dict_strict, meta_shapes, read_json, read_pickle_checkpoint,
                          read_safetensors)


def load_pretrained(path_or_id: str | Path, *, config: DCAEConfig | None = None, allow_pickle: bool = False,
                    weights: str = "model", revision: str | None = None) -> DCAE:
    """Load a model from a file, a directory (dcae / diffusers / efficientvit / a training run) or a Hub id.

    weights: "model" or "ema" (a training run directory keeps both).
    """
    path = Path(path_or_id).expanduser()
    if not path.exists():
        if _looks_like_hub_id(str(path_or_id)):
            path = _download(str(path_or_id), revision)
        else:
            raise DCAEError(f"{path_or_id}: no such file or directory")
    hint = name_hint(str(path_or_id))
    if path.is_dir():
        return _load_directory(path, config, allow_pickle, weights, hint)
    return _load_file(path, config, allow_pickle, hint, path.parent / "config.json")


def _looks_like_hub_id(text: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text)) and not text.endswith(".safetensors")


def _download(repo_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id=repo_id, revision=revision,
                                  allow_patterns=["*.json", "*.safetensors"])
    except Exception as error:  # offline, unknown repo, gated repo, network errors: all end the same way for a user
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DCAEError(f"could not fetch {repo_id!r} from the Hugging Face Hub ({reason[:200]}); "
                        f"download it where you have a network and pass its local directory instead, "
                        f"e.g. DCAE.from_pretrained('/path/to/{repo_id.split('/')[-1]}')") from None
    return Path(local)


def _load_directory(path: Path, config: DCAEConfig | None, allow_pickle: bool, weights: str,
                    hint: str | None) -> DCAE:
    if weights not in ("model", "ema"):
        raise ValueError(f"weights must be 'model' or 'ema', got {weights!r}")
    candidates = [path / f"{weights}.safetensors"] if weights == "ema" else [path / DCAE_WEIGHTS,
                                                                             path / DIFFUSERS_WEIGHTS]
    for file in candidates:
        if file.exists():
            return _load_file(file, config, allow_pickle, hint, path / "config.json")
    if allow_pickle:
        pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            return _load_file(pickles[0], config, allow_pickle, hint, path / "config.json")
    names = ", ".join(str(c.name) for c in candidates)
    raise DCAEError(f"{path}: no checkpoint found (looked for {names})")


def _load_file(path: Path, config: DCAEConfig | None, allow_pickle: bool, hint: str | None,
               config_json: Path) -> DCAE:
    source = str(path)
    metadata: dict[str, str] = {}
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise DCAEError(f"{path}: pickle checkpoints are not loaded by default (they can run code); convert it to "
                            "safetensors, or pass allow_pickle=True / --allow-pickle to read it with "
                            "torch.load(weights_only=True)")
        state = read_pickle_checkpoint(path)
    else:
        state, metadata = read_safetensors(path)
    layout = _detect_layout(state, metadata, config_json)
    if config is None:
        config = _resolve_config(layout, metadata, config_json, state, hint, source)
    check_model_size(config, source)
    if layout == "diffusers":
        state = from_diffusers(state, config, source)
    elif layout == "efficientvit":
        state = from_efficientvit(state, config, source)
    check_shapes(state, meta_shapes(config), source)  # the model built next is no larger than the file's tensors
    model = DCAE(config)
    load_state_dict_strict(model, state, source)
    return model


def _with_measured_factor(config: DCAEConfig, config_json: Path) -> DCAEConfig:
    """A scaling factor measured after the weights were written (`dcae scaling-factor`) lives in the config.json
    beside them: it fills the metadata's None when that file describes the same model. Anything else there is
    ignored, as before: the weights' own metadata is the source of truth for the architecture."""
    if config.scaling_factor is not None or not config_json.is_file():
        return config
    try:
        beside = config_from_json_text(json.dumps(read_json(config_json)), str(config_json))
    except DCAEError:
        return config
    if dataclasses.replace(beside, name=config.name, scaling_factor=None) != config:
        return config
    return dataclasses.replace(config, scaling_factor=beside.scaling_factor)


def _detect_layout(state: dict[str, torch.Tensor], metadata: dict[str, str], config_json: Path) -> str:
    declared = metadata.get("dcae_format")
    if declared in FORMATS:
        return declared
    keys = list(state)
    if any(".op_list." in k for k in keys):
        return "efficientvit"
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "encoder.conv_in.")) for k in keys):
        return "diffusers"
    return "dcae"


def _resolve_config(layout: str, metadata: dict[str, str], config_json: Path, state: dict[str, torch.Tensor],
                    hint: str | None, source: str) -> DCAEConfig:
    """The config a checkpoint carries (metadata, config.json), else the published model its keys and shapes make."""
    if "dcae_config" in metadata:
        return _with_measured_factor(config_from_json_text(metadata["dcae_config"], source), config_json)
    if layout == "diffusers":
        if not config_json.exists():
            raise DCAEError(f"{source}: diffusers checkpoint without its config.json")
        # A published model keeps the preset's exact config and name (a structured latent, say, which diffusers'
        # config cannot say), when the hint or its scaling factor names it.
        return presets.match_published(config_from_diffusers(read_json(config_json), hint or "custom",
                                                             str(config_json)), hint)
    if config_json.exists():
        data = read_json(config_json)
        if data.get("_class_name") == "AutoencoderDC":
            return presets.match_published(config_from_diffusers(data, hint or "custom", str(config_json)), hint)
        if "encoder" in data and "decoder" in data:
            return config_from_json_text(json.dumps(data), str(config_json))
    if layout == "efficientvit":
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        return presets.infer_config(shapes, "efficientvit", hint, source)
    raise DCAEError(f"{source}: checkpoint carries no config (no safetensors metadata, no config.json beside it)")


def load_default_model() -> DCAE:
    """The small model shipped inside the package (see its MODEL_CARD.md)."""
    path = default_model_path()
    if path is None:
        raise DCAEError("this dcae install has no embedded default model; pass --model DIR (a save_pretrained "
                        "directory, a checkpoint file or a Hub id)")
    return load_pretrained(path)
