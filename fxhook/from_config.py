"""A model from a config alone: `HookedTransformer(cfg)` with no checkpoint.

The TransformerLens-style config picks the model that computes what it describes:
- GPT-2-like configs (LayerNorm, learned absolute positions, plain MLP, sequential blocks, full multi-head
  attention with d_model == n_heads * d_head) are built as HF's GPT2LMHeadModel, the HF class researchers
  know, which computes TransformerLens's function exactly;
- every other config in TransformerLens's space, Llama-like ones included, is built as fxhook's native
  TransformerLens model (fxhook/native/: LN / LNPre / RMS / RMSPre / no norm, standard / rotary /
  shortformer / ALiBi positions, attn_only, SoLU-LN, gated, parallel, grouped-query, local attention, q/k
  norms, attention scale, d_vocab_out), with TransformerLens's own b_in placement (after a gated MLP's
  product, where HF's Llama adds it inside), so any TransformerLens state dict loads into it.
Either model is then captured like any other, so the hooks, weight views and graph passes are the ordinary
ones. What neither can honour (soft caps, attention sinks, rotary scaling schemes, ...) is refused
with the option named.

Initialisation follows TransformerLens 3.9 (`HookedTransformer.init_weights`):
every weight matrix TransformerLens names W_* is drawn by `init_mode`, with its
fan-in / fan-out read from TransformerLens's layout of that matrix (W_Q
[heads, d_model, d_head], W_O [heads, d_head, d_model], W_in [d_model, d_mlp],
...), not from the HF parameter's; biases are zero and norm weights neutral
(one). `seed` reseeds torch's generator first, so a seed fixes the weights.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fxhook.adapter import Adapter
from fxhook.config import HookedTransformerConfig, config_from_hf
from fxhook.core.hook_names import leaf_of

INIT_MODES = ("gpt2", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "muP")

# TransformerLens act_fn -> the HF activation name computing the same function (GPT-2-like models).
_ACTIVATIONS = {name: name for name in ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu", "silu",
                                         "relu2")}
_NATIVE_ACTIVATIONS = (*_ACTIVATIONS, "solu", "solu_ln")
_REFUSED_ACTIVATIONS = {"xielu": "TransformerLens's xielu is fixed, HF's has trainable parameters"}

# TransformerLens options no model built here computes: the value that means "off". A config (a field, or
# a key of a dict / of TransformerLens's own config kept in `extra`) may carry them only at these values.
_SOFTCAP_OFF = object()
_OFF_VALUES: dict[str, Any] = {
    "clip_qkv": None, "use_logn_attn": False, "use_dynamic_ntk_rope": False, "attention_dir": "causal",
    "scale_attn_by_inverse_layer_idx": False, "post_embedding_ln": False,
    "rotary_base_local": None, "rotary_scaling_factor": 1.0, "load_in_4bit": False, "num_experts": None,
    "relative_attention_max_distance": None, "relative_attention_num_buckets": None,
    "use_normalization_before_and_after": False, "attn_scores_soft_cap": _SOFTCAP_OFF,
    "output_logits_soft_cap": _SOFTCAP_OFF, "use_NTK_by_parts_rope": False, "use_yarn_rope": False,
    "use_attention_sinks": False, "n_devices": 1,
}
# TransformerLens options that do not change a model built here (derived, or read only by features that are off).
_INERT = {
    "uses_rms_norm", "experts_per_token", "train_seq_length", "checkpoint_index", "trust_remote_code",
    "quantization_method", "decoder_start_token_id", "norm_topk_prob", "NTK_by_parts_low_freq_factor",
    "NTK_by_parts_high_freq_factor", "NTK_by_parts_factor", "NTK_original_ctx_len", "yarn_factor",
    "yarn_attention_factor", "yarn_beta_fast", "yarn_beta_slow", "yarn_original_max_position_embeddings",
    "yarn_truncate", "yarn_global_attn_only", "use_local_attn", "window_size", "attn_types", "use_attn_scale",
    "attn_scale", "use_qk_norm",
}
_NATIVE_POSITIONS = ("standard", "rotary", "shortformer", "alibi")
_NATIVE_NORMS = ("LN", "LNPre", "RMS", "RMSPre", None)


# ----------------------------------------------------------------- the config
def as_hooked_config(cfg: HookedTransformerConfig | Mapping[str, Any] | Any) -> HookedTransformerConfig:
    """fxhook's config from ours, a TransformerLens-style dict, or any config object with to_dict()."""
    if isinstance(cfg, HookedTransformerConfig):
        return cfg
    if isinstance(cfg, str):
        raise ValueError("HookedTransformer(cfg) takes a config (or a dict of one); to load a model by name "
                         "use HookedTransformer.from_pretrained(name)")
    if isinstance(cfg, Mapping):
        return HookedTransformerConfig.from_dict(cfg)
    to_dict = getattr(cfg, "to_dict", None)
    if callable(to_dict):  # e.g. TransformerLens's own HookedTransformerConfig
        return HookedTransformerConfig.from_dict(dict(to_dict()))
    raise TypeError(f"expected a HookedTransformerConfig or a dict, got {type(cfg).__name__}")


def _option(cfg: HookedTransformerConfig, key: str, default: Any = None) -> Any:
    """A TransformerLens option: the config's field, else its `extra` entry (TransformerLens keys with no field)."""
    return getattr(cfg, key) if key in HookedTransformerConfig.field_names() else cfg.extra.get(key, default)


def _unsupported_options(cfg: HookedTransformerConfig) -> list[str]:
    for key in cfg.extra:
        if key not in _INERT and key not in _OFF_VALUES and key not in HookedTransformerConfig.field_names():
            raise TypeError(f"unknown config field {key!r} (not a TransformerLens HookedTransformerConfig field)")
    problems = []
    for key, off in _OFF_VALUES.items():
        value = _option(cfg, key, None if off is _SOFTCAP_OFF else off)
        is_off = (value is None or value <= 0) if off is _SOFTCAP_OFF else value == off
        if not is_off:
            problems.append(f"{key}={value!r}")
    return problems


def _attn_scale(cfg: HookedTransformerConfig) -> float:
    """What the attention scores are divided by (TransformerLens: attn_scale, sqrt(d_head) by default; 1 off)."""
    if not _option(cfg, "use_attn_scale", True):
        return 1.0
    scale = _option(cfg, "attn_scale", -1.0)
    return math.sqrt(cfg.d_head) if scale in (None, -1, -1.0) else float(scale)


def _local_attention(cfg: HookedTransformerConfig) -> tuple[list[str] | None, int | None]:
    """(attn_types, window_size) when local attention is on, else (None, None)."""
    if not _option(cfg, "use_local_attn", False):
        return None, None
    return list(_option(cfg, "attn_types")), _option(cfg, "window_size")


def _family(cfg: HookedTransformerConfig) -> str:
    """"gpt2" (built as HF's GPT-2) or "native" (fxhook's TransformerLens model); refuses what neither
    computes."""
    problems = _unsupported_options(cfg)
    act = cfg.act_fn if cfg.act_fn is not None else "relu"
    if not cfg.attn_only:
        if act in _REFUSED_ACTIVATIONS:
            problems.append(f"act_fn={act!r} ({_REFUSED_ACTIVATIONS[act]})")
        elif act not in _NATIVE_ACTIVATIONS:
            raise ValueError(f"act_fn={act!r} is not a TransformerLens activation; supported here: "
                             f"{sorted(_NATIVE_ACTIVATIONS)}")
    if cfg.positional_embedding_type not in _NATIVE_POSITIONS:
        problems.append(f"positional_embedding_type={cfg.positional_embedding_type!r} (supported: "
                        f"{_NATIVE_POSITIONS})")
    if cfg.normalization_type not in _NATIVE_NORMS:
        raise ValueError(f"normalization_type={cfg.normalization_type!r} is not one of TransformerLens's {_NATIVE_NORMS}")
    if cfg.final_rms and cfg.normalization_type not in ("RMS", "RMSPre"):
        problems.append(f"final_rms=True with normalization_type={cfg.normalization_type!r} (a final norm of "
                        "another kind than the blocks')")
    if cfg.gated_mlp and act == "solu_ln" and not cfg.attn_only:
        problems.append("gated_mlp=True with act_fn='solu_ln' (TransformerLens then ignores W_in)")
    if cfg.positional_embedding_type == "rotary" and cfg.rotary_dim is not None and \
            (cfg.rotary_dim % 2 or not 0 < cfg.rotary_dim <= cfg.d_head):
        problems.append(f"rotary_dim={cfg.rotary_dim} (must be even and at most d_head={cfg.d_head})")
    if problems:
        raise NotImplementedError("fxhook cannot build a model from this config: " + "; ".join(problems))
    if cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(f"n_heads ({cfg.n_heads}) must be a multiple of n_key_value_heads ({cfg.n_kv_heads})")
    if cfg.d_mlp is None and not cfg.attn_only:
        raise ValueError("d_mlp is required")
    gpt2_like = (cfg.normalization_type == "LN" and cfg.positional_embedding_type == "standard"
                 and not (cfg.gated_mlp or cfg.parallel_attn_mlp or cfg.attn_only or cfg.final_rms)
                 and act in _ACTIVATIONS and cfg.n_kv_heads == cfg.n_heads and cfg.d_vocab_out == cfg.d_vocab
                 and cfg.n_heads * cfg.d_head == cfg.d_model and _local_attention(cfg) == (None, None)
                 and not _option(cfg, "use_qk_norm", False) and math.isclose(_attn_scale(cfg), math.sqrt(cfg.d_head)))
    return "gpt2" if gpt2_like else "native"


# ------------------------------------------------------------ the HF model
def hf_model_from_config(cfg: HookedTransformerConfig | Mapping[str, Any]) -> nn.Module:
    """The model (fp32, CPU, eval mode, its own initialisation) computing `cfg`'s architecture.

    GPT-2 for GPT-2-like configs, fxhook's native TransformerLens model (fxhook/native/) for the rest;
    dropout is off: TransformerLens has none.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = as_hooked_config(cfg)
    if _family(cfg) == "native":
        return native_model_from_config(cfg)
    config = GPT2Config(
        n_layer=cfg.n_layers, n_embd=cfg.d_model, n_head=cfg.n_heads, n_inner=cfg.d_mlp,
        n_positions=cfg.n_ctx, vocab_size=cfg.d_vocab, activation_function=_ACTIVATIONS[cfg.act_fn or "relu"],
        layer_norm_epsilon=cfg.eps, tie_word_embeddings=cfg.tie_word_embeddings,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)  # no tokenizer behind it
    return GPT2LMHeadModel(config).eval()


def native_model_from_config(cfg: HookedTransformerConfig) -> nn.Module:
    """fxhook's native TransformerLens model for `cfg` (fp32, CPU, eval mode)."""
    from fxhook.native import TLNativeConfig, TLNativeForCausalLM

    attn_types, window_size = _local_attention(cfg)
    config = TLNativeConfig(
        n_layers=cfg.n_layers, d_model=cfg.d_model, n_ctx=cfg.n_ctx, d_head=cfg.d_head, n_heads=cfg.n_heads,
        d_vocab=cfg.d_vocab, d_vocab_out=cfg.d_vocab_out, d_mlp=cfg.d_mlp, n_key_value_heads=cfg.n_key_value_heads,
        act_fn=cfg.act_fn or "relu", eps=cfg.eps, normalization_type=cfg.normalization_type,
        positional_embedding_type=cfg.positional_embedding_type, rotary_dim=cfg.rotary_dim,
        rotary_base=float(cfg.rotary_base), rotary_adjacent_pairs=cfg.rotary_adjacent_pairs,
        gated_mlp=cfg.gated_mlp, parallel_attn_mlp=cfg.parallel_attn_mlp, attn_only=cfg.attn_only,
        attn_types=attn_types, window_size=window_size, use_qk_norm=bool(_option(cfg, "use_qk_norm", False)),
        attn_scale=_attn_scale(cfg), final_rms=cfg.final_rms, tie_word_embeddings=cfg.tie_word_embeddings)
    return TLNativeForCausalLM(config).eval()


# ---------------------------------------------------------- initialisation
def _fans(shape: torch.Size) -> tuple[int, int]:
    """Fan-in and fan-out of a weight in TransformerLens's layout ([in, out], or [heads, in, out-per-head])."""
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) == 3:
        return shape[1], shape[0] * shape[2]
    raise ValueError(f"no fan-in / fan-out for a weight of shape {tuple(shape)}")


def init_scale(name: str, shape: torch.Size, mode: str, initializer_range: float) -> tuple[str, float]:
    """("normal", std) or ("uniform", bound) for the TransformerLens weight `name` (e.g. "blocks.0.attn.W_O").

    gpt2: N(0, initializer_range). xavier: gain * sqrt(2 / (fan_in + fan_out)) as a std (normal) or
    gain * sqrt(6 / (fan_in + fan_out)) as a bound (uniform). kaiming (fan_in, ReLU gain sqrt(2)):
    gain * sqrt(2 / fan_in) as a std, gain * sqrt(6 / fan_in) as a bound. The gain is initializer_range.
    muP (normal): embeddings (W_E, W_pos) std 1, the unembedding W_U std 1 / fan_in, every other
    matrix std 1 / sqrt(fan_in).
    """
    fan_in, fan_out = _fans(shape)
    leaf = leaf_of(name)
    if mode == "gpt2":
        return "normal", initializer_range
    if mode == "xavier_normal":
        return "normal", initializer_range * math.sqrt(2.0 / (fan_in + fan_out))
    if mode == "xavier_uniform":
        return "uniform", initializer_range * math.sqrt(6.0 / (fan_in + fan_out))
    if mode == "kaiming_normal":
        return "normal", initializer_range * math.sqrt(2.0 / fan_in)
    if mode == "kaiming_uniform":
        return "uniform", initializer_range * math.sqrt(6.0 / fan_in)
    if mode == "muP":
        if leaf in ("W_E", "W_pos"):
            return "normal", 1.0
        if leaf == "W_U":
            return "normal", 1.0 / fan_in
        return "normal", 1.0 / math.sqrt(fan_in)
    raise ValueError(f"init_mode must be one of {INIT_MODES}, got {mode!r}")


def init_weights(hf_model: nn.Module, cfg: HookedTransformerConfig, adapter: Adapter | None = None) -> None:
    """Initialise `hf_model` in place as TransformerLens initialises a HookedTransformer built from `cfg`."""
    from adapters import find_adapter
    from fxhook.processing.weight_dict import live_weights

    cfg = as_hooked_config(cfg)
    adapter = adapter or find_adapter(hf_model)
    if cfg.init_mode not in INIT_MODES:
        raise ValueError(f"init_mode must be one of {INIT_MODES}, got {cfg.init_mode!r}")
    initializer_range = cfg.initializer_range
    if initializer_range < 0:
        initializer_range = 0.8 / math.sqrt(cfg.d_model) if cfg.init_mode == "gpt2" else 1.0
    neutral = adapter.neutral_norm_weight
    tied = hf_model.get_submodule(adapter.unembed).weight is hf_model.get_submodule(adapter.embed).weight

    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    touched: set[int] = set()
    with torch.no_grad():
        for name, tensor in live_weights(hf_model, adapter, cfg).items():
            leaf = leaf_of(name)
            touched.add(tensor.untyped_storage().data_ptr())
            if leaf.startswith("W_"):
                if leaf == "W_U" and tied:
                    continue  # one matrix, drawn as W_E
                kind, scale = init_scale(name, tensor.shape, cfg.init_mode, initializer_range)
                if kind == "normal":
                    tensor.normal_(0.0, scale)
                else:
                    tensor.uniform_(-scale, scale)
            elif leaf == "w":
                tensor.fill_(neutral)
            else:  # every bias, norm biases included
                tensor.zero_()
    untouched = [n for n, p in hf_model.named_parameters() if p.untyped_storage().data_ptr() not in touched]
    if untouched:
        warnings.warn(f"init_weights: parameters with no TransformerLens counterpart keep HF's initialisation: "
                      f"{untouched}", stacklevel=2)


# ------------------------------------------------------------------- all of it
def _check_round_trip(cfg: HookedTransformerConfig, hf_model: nn.Module, adapter: Adapter) -> HookedTransformerConfig:
    derived = config_from_hf(hf_model.config, adapter)
    for name in ("n_layers", "d_model", "n_ctx", "d_head", "n_heads", "n_kv_heads", "d_vocab", "d_mlp", "act_fn",
                 "eps", "normalization_type", "positional_embedding_type", "gated_mlp", "tie_word_embeddings"):
        ours, theirs = getattr(cfg, name), getattr(derived, name)
        if ours != theirs and not (name == "act_fn" and ours is None and theirs == "relu"):
            raise RuntimeError(f"fxhook built a {type(hf_model).__name__} whose {name} is {theirs!r}, "
                               f"but the config says {ours!r}")
    if adapter.rotary and not math.isclose(cfg.rotary_base, derived.rotary_base):
        raise RuntimeError(f"rotary_base {derived.rotary_base} != {cfg.rotary_base}")
    return derived


def build_from_config(cfg: HookedTransformerConfig | Mapping[str, Any]
                      ) -> tuple[HookedTransformerConfig, nn.Module, Adapter]:
    """(config, initialised HF model, adapter) for `HookedTransformer(cfg)` with no checkpoint.

    The model is initialised on the CPU in fp32 (so a seed gives the same weights on every device),
    then moved to cfg.device (default: CUDA when available, as TransformerLens does) and cfg.dtype.
    The config is completed in place: act_fn, final_rms, original_architecture, n_params, device.
    """
    from adapters import find_adapter

    cfg = as_hooked_config(cfg)
    hf_model = hf_model_from_config(cfg)
    adapter = find_adapter(hf_model)
    if cfg.act_fn is None:
        cfg.act_fn = "relu"  # TransformerLens's default
    if cfg.init_weights:
        init_weights(hf_model, cfg, adapter)
    if type(hf_model).__name__ == "TLNativeForCausalLM":  # built from these very fields: nothing to read back
        cfg.original_architecture = type(hf_model).__name__
    else:
        derived = _check_round_trip(cfg, hf_model, adapter)
        cfg.final_rms = derived.final_rms
        cfg.original_architecture = derived.original_architecture or type(hf_model).__name__
    if cfg.n_params is None:  # TransformerLens's count: attention and MLP matrices
        mlp = 0 if cfg.attn_only else cfg.d_model * cfg.d_mlp * (3 if cfg.gated_mlp else 2)
        cfg.n_params = cfg.n_layers * (4 * cfg.d_model * cfg.d_head * cfg.n_heads + mlp)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    hf_model.to(device=device, dtype=cfg.dtype)
    param = next(hf_model.parameters())
    cfg.device, cfg.dtype = str(param.device), param.dtype
    return cfg, hf_model, adapter
