"""Sample text to run a model on, through the `datasets` library, offline-first.

TransformerLens's `load_sample_training_dataset` / `sample_datapoint`, with the source made
explicit so they work with no network: a local path (a folder written by `save_to_disk`, a folder
of data files, or one .json/.jsonl/.csv/.parquet/.txt/.arrow file), an in-memory `Dataset` /
`DatasetDict`, or a list of strings. A hub name (or none, meaning the architecture's default
sample dataset, as TransformerLens) is downloaded only when the hub is reachable.

    dataset = load_sample_training_dataset(model, "my_texts.jsonl")   # also sets model.dataset
    text = sample_datapoint(model, seed=0)
    tokens = sample_datapoint(model, tokenize=True)                   # [1, pos], cut to n_ctx
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Sequence

import torch

# TransformerLens's choice of sample dataset per architecture (10k-20k texts each, on the hub)
DEFAULT_DATASETS = {
    "GPT2LMHeadModel": "stas/openwebtext-10k",
    "GPTNeoForCausalLM": "NeelNanda/pile-10k",
    "GPTNeoXForCausalLM": "NeelNanda/pile-10k",
    "GPTJForCausalLM": "NeelNanda/pile-10k",
    "OPTForCausalLM": "NeelNanda/pile-10k",
}
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _pick_split(loaded, split: str):
    import datasets

    if isinstance(loaded, (datasets.DatasetDict, dict)):
        if split not in loaded:
            raise ValueError(f"the dataset has splits {sorted(loaded)}, not {split!r}: pass split=")
        return loaded[split]
    return loaded


def _from_path(path: Path, split: str, **kwargs):
    import datasets

    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or \
                (path / "state.json").exists():
            return _pick_split(datasets.load_from_disk(str(path)), split)
        return _pick_split(datasets.load_dataset(str(path), split=split, **kwargs), split)
    suffix = path.suffix.lower()
    if suffix == ".arrow":
        return datasets.Dataset.from_file(str(path))
    if suffix not in _FILE_BUILDERS:
        raise ValueError(f"cannot read {path.name}: give a folder or a {', '.join(sorted(_FILE_BUILDERS))} or "
                         ".arrow file")
    return datasets.load_dataset(_FILE_BUILDERS[suffix], data_files=str(path), split=split, **kwargs)


def load_sample_training_dataset(model=None, source: Any = None, *, split: str = "train",
                                 text_column: str = "text", **kwargs):
    """A `datasets.Dataset` of texts (a `text_column` column); also stored as `model.dataset`.

    source: a local path, a Dataset / DatasetDict, a list of strings, a hub name, or None for the
    model's architecture's default (hub only). kwargs go to `datasets.load_dataset`.
    """
    import datasets

    if source is None:
        arch = getattr(getattr(model, "cfg", None), "original_architecture", None) or \
            type(getattr(model, "hf_model", None)).__name__
        if arch not in DEFAULT_DATASETS:
            raise ValueError(f"no default sample dataset for {arch or 'this model'}: pass source= (a local path, "
                             "a datasets.Dataset or a list of strings)")
        source = DEFAULT_DATASETS[arch]
    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        dataset = _pick_split(source, split)
    elif isinstance(source, Sequence) and not isinstance(source, str):
        if not all(isinstance(t, str) for t in source):
            raise TypeError("a list source must hold strings (the texts)")
        dataset = datasets.Dataset.from_dict({text_column: list(source)})
    elif isinstance(source, (str, os.PathLike)) and Path(source).expanduser().exists():
        dataset = _from_path(Path(source).expanduser(), split, **kwargs)
    elif isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        looks_local = name.startswith((".", "/", "~")) or Path(name).suffix.lower() in (*_FILE_BUILDERS, ".arrow")
        if looks_local or _offline():
            where = "there is no such local file or folder" if looks_local else \
                "it is not a local path and the hub is off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
            raise FileNotFoundError(f"cannot load {name!r}: {where}. Pass a local path (a save_to_disk folder, a "
                                    ".jsonl/.csv/.parquet/.txt file), a datasets.Dataset, or a list of strings")
        dataset = datasets.load_dataset(name, split=split, **kwargs)
    else:
        raise TypeError(f"source must be a path, a datasets.Dataset, a list of strings or a hub name, got "
                        f"{type(source).__name__}")
    if text_column not in dataset.column_names:
        raise ValueError(f"the dataset has no {text_column!r} column (it has {dataset.column_names}): pass "
                         "text_column=")
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    if text_column != "text":  # sample_datapoint reads "text", as TransformerLens
        dataset = dataset.select_columns([text_column]).rename_column(text_column, "text")
    if model is not None:
        model.dataset = dataset
    return dataset


def sample_datapoint(model, tokenize: bool = False, prepend_bos: bool | None = None,
                     padding_side: str | None = None, *, dataset=None, seed: int | None = None
                     ) -> str | torch.Tensor:
    """One random text of `dataset` (default: `model.dataset`, loaded with the architecture's
    default when missing), or its tokens [1, pos] cut to the model's context when tokenize."""
    dataset = dataset if dataset is not None else getattr(model, "dataset", None)
    if dataset is None:
        dataset = load_sample_training_dataset(model)
    index = random.Random(seed).randrange(len(dataset)) if seed is not None else random.randrange(len(dataset))
    text = dataset[index]["text"]
    if not tokenize:
        return text
    return model.to_tokens(text, prepend_bos=prepend_bos, padding_side=padding_side, truncate=True)


class DatasetMixin:
    """`model.load_sample_training_dataset(source=...)` and `model.sample_datapoint()`, as TransformerLens."""

    dataset = None

    def load_sample_training_dataset(self, *, source: Any = None, **kwargs):
        return load_sample_training_dataset(self, source, **kwargs)

    def sample_datapoint(self, tokenize: bool = False, prepend_bos: bool | None = None,
                         padding_side: str | None = None, **kwargs) -> str | torch.Tensor:
        return sample_datapoint(self, tokenize, prepend_bos, padding_side, **kwargs)
