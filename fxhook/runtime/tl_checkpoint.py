"""Checkpoints saved by TransformerLens itself, read from a local folder into fxhook's native model.

TransformerLens's own models (NeelNanda's attn-only, SoLU and GELU toy models, ...) are not HF models: their
repository holds a `config.json` of TransformerLens fields (Neel's spelling: `normalization` for
`normalization_type`, `shortformer_pos` for shortformer positions, plus training settings) and state dicts
saved with `torch.save` (`model_final.pth`, `checkpoints/..._<tokens>.pth`). A folder holding such a config
and one `*final.pth` loads with `HookedTransformer.from_pretrained(folder)`: the config builds the native
model (`HookedTransformer(cfg)`, fxhook/native/), the state dict goes through `load_and_process_state_dict`
with the processing flags asked for. Nothing is downloaded; the tokenizer is the folder's own, else
`tokenizer_name`'s from the local HF cache, else none (with a warning).
"""
from __future__ import annotations

import glob
import json
import os
import warnings
from typing import Any

import torch

CONFIG_FILE = "config.json"
STATE_DICT_SUFFIX = "final.pth"
# Neel's config.json keys TransformerLens reads (convert_neel_model_config), besides its own field names
_NEEL_KEYS = ("d_model", "n_layers", "d_mlp", "d_head", "n_heads", "n_ctx", "d_vocab", "act_fn", "attn_only",
              "final_rms", "tokenizer_name")
_UNREADABLE_ARCHITECTURES = {"neel-solu-old": "the old SoLU layout (TransformerLens converts its weights first)",
                             "mingpt": "minGPT's layout (TransformerLens converts its weights first)"}


def _read_config(folder: str) -> dict[str, Any] | None:
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError:
            return None
    return raw if isinstance(raw, dict) else None


def is_tl_checkpoint(path: str) -> bool:
    """Whether `path` is a folder holding a TransformerLens checkpoint (a config of TransformerLens fields,
    not a HF config, and a `*final.pth` state dict)."""
    if not os.path.isdir(path):
        return False
    raw = _read_config(path)
    return (raw is not None and "model_type" not in raw and {"d_model", "n_layers"} <= set(raw)
            and bool(glob.glob(os.path.join(path, "**", "*" + STATE_DICT_SUFFIX), recursive=True)))


def cached_tl_checkpoint(name: str, cache_dir: str | os.PathLike | None = None) -> str | None:
    """The local HF-cache snapshot folder of the TransformerLens checkpoint an official name stands for
    ("attn-only-2l" -> NeelNanda/Attn_Only_2L512W_C4_Code's snapshot), or None when `name` is no such
    name. Only the local cache is read (nothing is downloaded); a name whose snapshot is not there, or
    lacks the config and state dict, is refused with what to do."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from fxhook.runtime.model_names import is_transformer_lens_native, official_repository

    repository = official_repository(name) or name
    if os.path.exists(name) or not is_transformer_lens_native(repository):
        return None
    try:
        folder = snapshot_download(repository, cache_dir=cache_dir, local_files_only=True)
    except LocalEntryNotFoundError as error:
        raise OSError(f"{name!r} is TransformerLens's checkpoint {repository}, which is not in the local HF cache"
                      f"{f' at {cache_dir}' if cache_dir else ''}. fxhook reads such checkpoints from the cache or a "
                      f"folder and downloads nothing: fetch the repository's config.json and model_final.pth "
                      f"(e.g. `huggingface-cli download {repository} config.json model_final.pth`), or pass a "
                      f"folder holding them") from error
    if not is_tl_checkpoint(folder):
        raise OSError(f"the cached snapshot of {repository} ({folder}) lacks TransformerLens's config.json or a "
                      f"*{STATE_DICT_SUFFIX} state dict; download them again")
    return folder


def tl_config_from_json(raw: dict[str, Any]) -> dict[str, Any]:
    """A HookedTransformerConfig dict from a TransformerLens checkpoint's config.json.

    TransformerLens field names are taken as they are; Neel's spellings are translated (`normalization`,
    `shortformer_pos`); training settings (lr, batch_size, ...) are not model fields and are left out."""
    from fxhook.config import HookedTransformerConfig

    fields = set(HookedTransformerConfig.field_names())
    cfg = {k: v for k, v in raw.items() if k in fields and k not in ("device", "dtype", "n_params")}
    for key in _NEEL_KEYS:
        if key in raw:
            cfg[key] = raw[key]
    if "normalization" in raw:
        cfg["normalization_type"] = raw["normalization"]
    if "shortformer_pos" in raw:
        cfg["positional_embedding_type"] = "shortformer" if raw["shortformer_pos"] else "standard"
    architecture = raw.get("architecture", raw.get("original_architecture"))
    if architecture in _UNREADABLE_ARCHITECTURES:
        raise NotImplementedError(f"this TransformerLens checkpoint has {_UNREADABLE_ARCHITECTURES[architecture]}, "
                                  "which fxhook does not read")
    return cfg


def _state_dict_file(folder: str) -> str:
    found = sorted(glob.glob(os.path.join(folder, "**", "*" + STATE_DICT_SUFFIX), recursive=True))
    if len(found) != 1:
        raise ValueError(f"{folder!r} holds {len(found)} files ending in {STATE_DICT_SUFFIX!r} ({found}): "
                         "keep exactly one (the state dict to load)")
    return found[0]


def _tokenizer(folder: str, tokenizer_name: str | None):
    from transformers import AutoTokenizer

    if any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return AutoTokenizer.from_pretrained(folder)
    if tokenizer_name:
        try:
            return AutoTokenizer.from_pretrained(tokenizer_name)
        except OSError as error:
            warnings.warn(f"no tokenizer: {tokenizer_name!r} (the checkpoint's tokenizer_name) could not be loaded "
                          f"({error.__class__.__name__}); the model takes token ids only. Pass tokenizer= to "
                          "give it one", stacklevel=3)
    return None


def load_tl_checkpoint(cls, folder: str, processing: dict[str, bool], *, dtype: torch.dtype | None,
                       device: str | torch.device | None, tokenizer=None, default_prepend_bos: bool | None = None,
                       default_padding_side: str | None = None):
    """`cls` (HookedTransformer) from the TransformerLens checkpoint in `folder`, its weights processed as
    `processing` says (fold_ln=..., ...), in `dtype` (default float32) on `device` (default: CUDA if there)."""
    cfg = tl_config_from_json(_read_config(folder) or {})
    cfg["dtype"] = dtype or torch.float32
    if device is not None:
        cfg["device"] = str(device)
    cfg["default_prepend_bos"] = True if default_prepend_bos is None else bool(default_prepend_bos)
    cfg["init_weights"] = False  # every weight comes from the state dict
    state_dict = torch.load(_state_dict_file(folder), map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{_state_dict_file(folder)!r} is not a state dict (a dict of tensors)")
    if tokenizer is None:
        tokenizer = _tokenizer(folder, cfg.get("tokenizer_name"))
    model = cls(cfg, tokenizer=tokenizer, default_padding_side=default_padding_side)
    model.cfg.model_name = os.path.basename(os.path.normpath(folder))
    param = next(model.hf_model.parameters())
    model.load_and_process_state_dict({k: v.to(param.dtype) for k, v in state_dict.items()}, **processing)
    return model
