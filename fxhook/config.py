"""HookedTransformerConfig: TransformerLens field names, derived from a HF config."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from fxhook.adapter import Adapter

_NORM_TYPE = {"layernorm": "LN", "rmsnorm": "RMS", "rmsnorm_plus_one": "RMS"}
_POS_TYPE = {"absolute": "standard", "rotary": "rotary"}


@dataclass
class HookedTransformerConfig:
    """The model's shape and options, under the names TransformerLens uses."""

    n_layers: int
    d_model: int
    n_ctx: int
    d_head: int
    n_heads: int
    d_vocab: int
    d_mlp: int | None = None
    n_key_value_heads: int | None = None
    act_fn: str | None = None
    eps: float = 1e-5
    normalization_type: str | None = "LN"
    positional_embedding_type: str = "standard"
    rotary_dim: int | None = None
    rotary_base: float = 10000.0
    rotary_adjacent_pairs: bool = False
    gated_mlp: bool = False
    final_rms: bool = False
    original_architecture: str | None = None
    model_name: str = "custom"
    tokenizer_name: str | None = None
    d_vocab_out: int = -1
    tie_word_embeddings: bool = False
    parallel_attn_mlp: bool = False
    attn_only: bool = False
    default_prepend_bos: bool = True
    default_padding_side: str = "right"
    tokenizer_prepends_bos: bool | None = None
    device: str | None = None
    dtype: torch.dtype = torch.float32
    n_params: int | None = None
    checkpoint_value: int | None = None
    checkpoint_label_type: str | None = None
    from_checkpoint: bool = False
    # flag-gated hooks (TransformerLens names)
    use_attn_result: bool = False
    use_split_qkv_input: bool = False
    use_hook_mlp_in: bool = False
    use_attn_in: bool = False
    ungroup_grouped_query_attention: bool = False
    # weight processing state
    layer_norm_folding: bool = False
    # initialisation of a model built from this config alone (TransformerLens's fields and meanings)
    init_mode: str = "gpt2"
    seed: int | None = None
    initializer_range: float = -1.0  # -1: not set, resolved below as TransformerLens does
    init_weights: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.d_vocab_out == -1:
            self.d_vocab_out = self.d_vocab
        if self.initializer_range < 0:  # gpt2 mode: a std of 0.8 / sqrt(d_model); other modes: a gain of 1
            self.initializer_range = 0.8 / math.sqrt(self.d_model) if self.init_mode == "gpt2" else 1.0
        if self.positional_embedding_type == "rotary" and self.rotary_dim is None:
            self.rotary_dim = self.d_head

    @property
    def n_kv_heads(self) -> int:
        return self.n_key_value_heads or self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def from_dict(cls, config_dict: Mapping[str, Any]) -> "HookedTransformerConfig":
        """A config from a TransformerLens-style dict (`HookedTransformer(cfg_dict)`).

        TransformerLens's defaults fill what it lets a dict leave out: n_heads = d_model // d_head,
        d_mlp = 4 * d_model (unless attn_only), act_fn = "relu". d_vocab is required (no tokenizer is
        fetched by name). Keys with no field here (other TransformerLens options) are kept in `extra`;
        fxhook.from_config refuses the ones whose non-default values it cannot honour.
        """
        values = dict(config_dict)
        extra = dict(values.pop("extra", None) or {})
        known = cls.field_names()
        for key in [k for k in values if k not in known]:
            extra[key] = values.pop(key)
        missing = [k for k in ("n_layers", "d_model", "n_ctx", "d_head") if values.get(k) is None]
        if values.get("d_vocab") in (None, -1):
            missing.append("d_vocab")
        if missing:
            raise ValueError(f"the config needs {missing} (TransformerLens's required fields; d_vocab is "
                             "required too, since no tokenizer is fetched to infer it)")
        if values.get("n_heads") in (None, -1):
            if values["d_model"] % values["d_head"]:
                raise ValueError(f"d_model ({values['d_model']}) must be divisible by d_head ({values['d_head']}) "
                                 "when n_heads is not given")
            values["n_heads"] = values["d_model"] // values["d_head"]
        if values.get("d_mlp") is None and not values.get("attn_only", False):
            values["d_mlp"] = 4 * values["d_model"]
        if values.get("act_fn") is None:
            values["act_fn"] = "relu"
        if isinstance(values.get("dtype"), str):
            name = values["dtype"].removeprefix("torch.")
            name = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(name, name)
            values["dtype"] = getattr(torch, name)
        return cls(**values, extra=extra)


def _first(hf_config, *names: str, default=None):
    for name in names:
        value = getattr(hf_config, name, None)
        if value is not None:
            return value
    return default


def _rope_theta(hf_config) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(_first(hf_config, "rope_theta", default=10000.0))


def _rotary_dim(hf_config, d_head: int) -> int:
    """Partial rotary (NeoX rotary_pct, Phi partial_rotary_factor, GPT-J rotary_dim); d_head when full."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    factor = params.get("partial_rotary_factor") if isinstance(params, dict) else None
    factor = factor if factor is not None else _first(hf_config, "partial_rotary_factor", "rotary_pct")
    if factor is not None:
        return int(d_head * float(factor))
    return int(_first(hf_config, "rotary_dim", default=d_head))


def config_from_hf(hf_config, adapter: Adapter, model_name: str = "custom") -> HookedTransformerConfig:
    """Read the TransformerLens fields from a HF config (HF's attribute_map covers name variants)."""
    d_model = int(hf_config.hidden_size)
    n_heads = int(hf_config.num_attention_heads)
    d_head = int(_first(hf_config, "head_dim", default=d_model // n_heads))
    n_kv = int(_first(hf_config, "num_key_value_heads", default=n_heads))
    d_mlp = _first(hf_config, "intermediate_size", "n_inner", "ffn_dim")
    architectures = getattr(hf_config, "architectures", None) or []
    return HookedTransformerConfig(
        n_layers=int(hf_config.num_hidden_layers),
        d_model=d_model,
        n_ctx=int(_first(hf_config, "max_position_embeddings", "n_positions", default=2048)),
        d_head=d_head,
        n_heads=n_heads,
        d_vocab=int(hf_config.vocab_size),
        d_mlp=int(d_mlp) if d_mlp is not None else 4 * d_model,
        n_key_value_heads=n_kv if n_kv != n_heads else None,
        act_fn=_first(hf_config, "hidden_act", "activation_function", "hidden_activation"),
        eps=float(_first(hf_config, "rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", default=1e-5)),
        normalization_type=_NORM_TYPE[adapter.norms.kind],
        positional_embedding_type=_POS_TYPE[adapter.positions.kind],
        rotary_base=_rope_theta(hf_config) if adapter.rotary else 10000.0,
        rotary_dim=_rotary_dim(hf_config, d_head) if adapter.rotary else None,
        rotary_adjacent_pairs=adapter.positions.rotary_adjacent_pairs,
        parallel_attn_mlp=adapter.parallel_attn_mlp,
        gated_mlp=adapter.feed_forward.gated,
        final_rms=adapter.norms.kind != "layernorm",
        original_architecture=architectures[0] if architectures else None,
        model_name=model_name,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        dtype=getattr(hf_config, "dtype", None) or torch.float32,
    )
