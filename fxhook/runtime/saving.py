"""Saving a HookedTransformer to a folder and loading it back, and fingerprints of a model.

`model.save_pretrained(folder)` writes what `from_pretrained(folder)` needs to rebuild the same model
without processing its weights again:

- ``config.json``: the HF config (``tie_word_embeddings`` as the weights now are: processing unties);
- ``model.safetensors``: every parameter of the (processed) HF model, including biases that
  processing created where the HF class has none (loading adds them back before reading);
- ``fxhook.json``: the processing flags the weights went through and fxhook's config;
- the tokenizer's files, when the model has a tokenizer.

Processed weights cannot be "unprocessed" (centring the unembedding drops information), so a folder
holding processed weights loads only with the flags it was saved with; any other request, and in
particular `from_pretrained_no_processing(folder)`, is refused with an error naming those flags.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

FXHOOK_FILE = "fxhook.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
PROCESSING_KEY = "processing"  # cfg.extra[PROCESSING_KEY]: the flags the weights went through
# fields of fxhook's config that weight processing changes (processing/__init__.py), restored on load
_PROCESSED_CFG_FIELDS = ("layer_norm_folding", "normalization_type")


# --------------------------------------------------------------------------- fingerprints
def config_hash(cfg) -> str:
    """sha256 of fxhook's config, leaving out where the model runs (device) and what it is called (a folder's
    path), so that the same model on a GPU and on a CPU, or moved to another folder, has the same hash."""
    values = {k: v for k, v in cfg.to_dict().items() if k not in ("device", "model_name", "tokenizer_name")}
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def weights_hash(model: nn.Module, samples: int = 256) -> str:
    """sha256 of every parameter's name, shape, dtype and `samples` evenly strided values: tells two
    checkpoints of one architecture apart in one cheap pass, the same on any device."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        sample = flat[::step][:samples].to("cpu", torch.float64)
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- processing flags
def record_processing(cfg, flags: Mapping[str, bool]) -> None:
    """Note in cfg.extra the processing flags the weights have now gone through (earlier ones stay on)."""
    before = dict(cfg.extra.get(PROCESSING_KEY) or {})
    merged = {name: bool(before.get(name, False) or value) for name, value in flags.items()}
    cfg.extra = {**cfg.extra, PROCESSING_KEY: merged}  # a new dict: all_or_nothing restores the old one


def processing_of(cfg) -> dict[str, bool]:
    return dict(cfg.extra.get(PROCESSING_KEY) or {})


# --------------------------------------------------------------------------- save
def save_model(model, folder: str | os.PathLike) -> Path:
    """Write `model` (a HookedTransformer) to `folder` (created if needed); see the module docstring."""
    from safetensors.torch import save_model as save_safetensors

    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"save_pretrained needs a folder, but {str(folder)!r} is a file")
    folder.mkdir(parents=True, exist_ok=True)
    hf_model = model.hf_model
    hf_model.config.save_pretrained(folder)
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    save_safetensors(hf_model, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / WEIGHTS_FILE)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(folder)
    cfg = {k: v for k, v in model.cfg.to_dict().items() if k != "device"}
    info = {"format_version": FORMAT_VERSION, "processing": processing_of(model.cfg),
            "hf_class": type(hf_model).__name__, "config_hash": config_hash(model.cfg), "cfg": cfg}
    tmp = folder / (FXHOOK_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=1, sort_keys=True, default=str))
    os.replace(tmp, folder / FXHOOK_FILE)
    return folder


# --------------------------------------------------------------------------- load
def saved_info(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """The fxhook.json of a folder written by save_pretrained, else None."""
    if path is None:
        return None
    file = Path(os.fspath(path)).expanduser() / FXHOOK_FILE
    if not file.is_file():
        return None
    info = json.loads(file.read_text())
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file} has format version {info.get('format_version')!r}; this fxhook reads version "
                         f"{FORMAT_VERSION}: save the model again with this version")
    return info


def processing_to_apply(info: Mapping[str, Any], requested: Mapping[str, bool], name: str) -> dict[str, bool]:
    """The processing still to do on a saved folder's weights: the request itself when they were saved
    unprocessed, nothing when they were saved processed with exactly the requested flags, else an error."""
    saved = {k: bool(v) for k, v in (info.get("processing") or {}).items()}
    if not any(saved.values()):
        return dict(requested)
    wanted = {k: bool(v) for k, v in requested.items()}
    if {k: saved.get(k, False) for k in wanted} == wanted:
        return {}
    on = ", ".join(f"{k}={v}" for k, v in saved.items()) or "none"
    if not any(wanted.values()):
        raise ValueError(f"{name} holds weights already processed ({on}), which cannot be undone: load it with "
                         f"HookedTransformer.from_pretrained({name}) (from_pretrained_no_processing needs "
                         f"unprocessed weights: save the model before processing it)")
    raise ValueError(f"{name} holds weights processed with {on}, but the call asks for "
                     f"{', '.join(f'{k}={v}' for k, v in wanted.items())}: processed weights cannot be "
                     f"re-processed differently; pass the saved flags (or save an unprocessed model)")


def restore_processed_cfg(cfg, info: Mapping[str, Any]) -> None:
    """Put back the config fields processing had set, and the record of the flags."""
    saved_cfg = info.get("cfg") or {}
    for field in _PROCESSED_CFG_FIELDS:
        if field in saved_cfg:
            setattr(cfg, field, saved_cfg[field])
    record_processing(cfg, info.get("processing") or {})


def load_saved_hf(folder: str | os.PathLike, dtype: torch.dtype) -> nn.Module:
    """The HF model of a folder written by save_pretrained, with the biases processing created."""
    from safetensors import safe_open
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(os.fspath(folder)).expanduser()
    config = AutoConfig.from_pretrained(folder)
    hf_model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    weights = folder / WEIGHTS_FILE
    with safe_open(str(weights), framework="pt") as f:
        saved_shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    present = set(hf_model.state_dict())
    for key in sorted(set(saved_shapes) - present):
        module_path, _, leaf = key.rpartition(".")
        module = hf_model.get_submodule(module_path) if module_path else hf_model
        if leaf != "bias" or getattr(module, "bias", "absent") is not None:
            raise ValueError(f"{weights} holds {key}, which the {type(hf_model).__name__} built from its config "
                             f"has no place for: the folder was not written by this fxhook's save_pretrained")
        module.bias = nn.Parameter(torch.zeros(saved_shapes[key], dtype=dtype))
    load_model(hf_model, str(weights), strict=True)
    return hf_model.eval()
