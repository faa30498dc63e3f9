"""A model from a config alone: `HookedTransformer(cfg)` with no checkpoint.

The TransformerLens-style config picks the HF architecture that computes the
same function (LayerNorm + learned absolute positions: GPT-2; RMSNorm + rotary
+ gated MLP: Llama). That HF model is then captured like any other, so the
hooks, weight views and graph passes are the ordinary ones.

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

# TransformerLens act_fn -> the HF activation name computing the same function.
_ACTIVATIONS = {name: name for name in ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu", "silu",
                                         "relu2")}
_NO_HF_ACTIVATION = {
    "solu": "SoLU (x * softmax(x)) has no HF activation",
    "solu_ln": "SoLU with its extra LayerNorm has no HF counterpart",
    "xielu": "TransformerLens's xielu is fixed, HF's has trainable parameters",
}

# TransformerLens options that HookedTransformerConfig has no field for: the value that means "off".
# A config may carry them (from a dict, or TransformerLens's own config) only at these values.
_SOFTCAP_OFF = object()
_OFF_VALUES: dict[str, Any] = {
    "use_attn_scale": True, "use_qk_norm": False, "clip_qkv": None, "use_logn_attn": False,
    "use_dynamic_ntk_rope": False, "use_local_attn": False, "attention_dir": "causal",
    "scale_attn_by_inverse_layer_idx": False, "use_hook_tokens": False, "post_embedding_ln": False,
    "rotary_base_local": None, "rotary_scaling_factor": 1.0, "rotary_adjacent_pairs": False,
    "load_in_4bit": False, "num_experts": None, "relative_attention_max_distance": None,
    "relative_attention_num_buckets": None, "use_normalization_before_and_after": False,
    "attn_scores_soft_cap": _SOFTCAP_OFF, "output_logits_soft_cap": _SOFTCAP_OFF,
    "use_NTK_by_parts_rope": False, "use_yarn_rope": False, "use_attention_sinks": False, "n_devices": 1,
}
# TransformerLens options that do not change a model built here (derived, or read only by features that are off).
_INERT = {
    "attn_scale", "uses_rms_norm", "experts_per_token", "train_seq_length", "checkpoint_index", "window_size",
    "attn_types", "trust_remote_code", "quantization_method", "decoder_start_token_id", "norm_topk_prob",
    "NTK_by_parts_low_freq_factor", "NTK_by_parts_high_freq_factor", "NTK_by_parts_factor",
    "NTK_original_ctx_len", "yarn_factor", "yarn_attention_factor", "yarn_beta_fast", "yarn_beta_slow",
    "yarn_original_max_position_embeddings", "yarn_truncate", "yarn_global_attn_only",
}


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


def _unsupported_options(cfg: HookedTransformerConfig) -> list[str]:
    problems = []
    for key, value in cfg.extra.items():
        if key in _INERT:
            continue
        if key not in _OFF_VALUES:
            raise TypeError(f"unknown config field {key!r} (not a TransformerLens HookedTransformerConfig field)")
        off = _OFF_VALUES[key]
        is_off = (value is None or value <= 0) if off is _SOFTCAP_OFF else value == off
        if not is_off:
            problems.append(f"{key}={value!r}")
    scale = cfg.extra.get("attn_scale", -1.0)
    if cfg.extra.get("use_attn_scale", True) and scale not in (-1, -1.0) and \
            not math.isclose(scale, math.sqrt(cfg.d_head)):
        problems.append(f"attn_scale={scale!r} (only sqrt(d_head))")
    return problems


def _family(cfg: HookedTransformerConfig) -> str:
    """"gpt2" or "llama": the HF architecture computing what `cfg` describes; refuses everything else."""
    problems = _unsupported_options(cfg)
    if cfg.attn_only:
        problems.append("attn_only=True (no HF causal LM without MLPs)")
    if cfg.parallel_attn_mlp:
        problems.append("parallel_attn_mlp=True")
    if cfg.rotary_adjacent_pairs:
        problems.append("rotary_adjacent_pairs=True")
    if cfg.d_vocab_out != cfg.d_vocab:
        problems.append(f"d_vocab_out={cfg.d_vocab_out} != d_vocab={cfg.d_vocab}")
    act = cfg.act_fn if cfg.act_fn is not None else "relu"
    if act in _NO_HF_ACTIVATION:
        problems.append(f"act_fn={act!r} ({_NO_HF_ACTIVATION[act]})")
    elif act not in _ACTIVATIONS:
        raise ValueError(f"act_fn={act!r} is not a TransformerLens activation; supported here: {sorted(_ACTIVATIONS)}")

    shape = (cfg.normalization_type, cfg.positional_embedding_type, bool(cfg.gated_mlp))
    family = {("LN", "standard", False): "gpt2", ("RMS", "rotary", True): "llama"}.get(shape)
    if family is None:
        problems.append(f"normalization_type={shape[0]!r} with positional_embedding_type={shape[1]!r} and "
                        f"gated_mlp={shape[2]} (supported: 'LN' + 'standard' + ungated MLP, built as GPT-2; "
                        "'RMS' + 'rotary' + gated MLP, built as Llama)")
    elif family == "gpt2":
        if cfg.final_rms:
            problems.append("final_rms=True with LayerNorm blocks")
        if cfg.n_kv_heads != cfg.n_heads:
            problems.append(f"n_key_value_heads={cfg.n_key_value_heads} with absolute positions (GPT-2 has no "
                            "grouped-query attention)")
    else:
        if cfg.rotary_dim not in (None, cfg.d_head):
            problems.append(f"rotary_dim={cfg.rotary_dim} != d_head={cfg.d_head} (partial rotary)")
    if problems:
        raise NotImplementedError("fxhook cannot build a model from this config: " + "; ".join(problems))

    if family == "gpt2" and cfg.n_heads * cfg.d_head != cfg.d_model:
        raise ValueError(f"GPT-2-style models need d_model == n_heads * d_head, got d_model={cfg.d_model}, "
                         f"n_heads={cfg.n_heads}, d_head={cfg.d_head}")
    if family == "llama" and cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(f"n_heads ({cfg.n_heads}) must be a multiple of n_key_value_heads ({cfg.n_kv_heads})")
    if cfg.d_mlp is None:
        raise ValueError("d_mlp is required")
    return family


# ------------------------------------------------------------ the HF model
def hf_model_from_config(cfg: HookedTransformerConfig | Mapping[str, Any], *, bias: bool = True) -> nn.Module:
    """The HF causal LM (fp32, CPU, eval mode, HF's own initialisation) with `cfg`'s architecture.

    GPT-2 for LayerNorm + absolute positions, Llama for RMSNorm + rotary + gated MLP. `bias` (Llama only):
    give attention and MLP projections biases, as TransformerLens's components have (b_Q, b_K, b_V,
    b_O, b_in, b_out; HF's gated MLP adds a gate bias). Dropout is off: TransformerLens has none.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    cfg = as_hooked_config(cfg)
    family = _family(cfg)
    act = _ACTIVATIONS[cfg.act_fn if cfg.act_fn is not None else "relu"]
    special = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)  # no tokenizer behind it
    if family == "gpt2":
        config = GPT2Config(
            n_layer=cfg.n_layers, n_embd=cfg.d_model, n_head=cfg.n_heads, n_inner=cfg.d_mlp,
            n_positions=cfg.n_ctx, vocab_size=cfg.d_vocab, activation_function=act,
            layer_norm_epsilon=cfg.eps, tie_word_embeddings=cfg.tie_word_embeddings,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **special)
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(
            hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.d_head, intermediate_size=cfg.d_mlp,
            max_position_embeddings=cfg.n_ctx, vocab_size=cfg.d_vocab, hidden_act=act, rms_norm_eps=cfg.eps,
            rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rotary_base)},
            tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=bias, mlp_bias=bias,
            attention_dropout=0.0, **special)
        model = LlamaForCausalLM(config)
    return model.eval()


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
    derived = _check_round_trip(cfg, hf_model, adapter)
    cfg.final_rms = derived.final_rms
    cfg.original_architecture = derived.original_architecture or type(hf_model).__name__
    if adapter.rotary:
        cfg.rotary_dim = cfg.d_head
    if cfg.n_params is None:  # TransformerLens's count: attention and MLP matrices
        cfg.n_params = cfg.n_layers * (4 * cfg.d_model * cfg.d_head * cfg.n_heads
                                       + cfg.d_model * cfg.d_mlp * (3 if cfg.gated_mlp else 2))
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    hf_model.to(device=device, dtype=cfg.dtype)
    param = next(hf_model.parameters())
    cfg.device, cfg.dtype = str(param.device), param.dtype
    return cfg, hf_model, adapter
