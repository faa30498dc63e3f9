"""HookedTransformerConfig: TransformerLens field names, derived from a HF config."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import KW_ONLY, asdict, dataclass, field, fields
from typing import Any

import torch

from fxhook.adapter import Adapter

_NORM_TYPE = {"layernorm": "LN", "rmsnorm": "RMS", "rmsnorm_plus_one": "RMS", "none": None}
_POS_TYPE = {"absolute": "standard", "rotary": "rotary", "shortformer": "shortformer", "alibi": "alibi"}


@dataclass
class HookedTransformerConfig:
    """The model's shape and options: TransformerLens 3.9's fields, in its order and with its defaults
    (`HookedTransformerConfig(d_model, d_head, n_layers, n_ctx, ...)` as there), plus `extra` for what
    fxhook records beyond them (the checkpoint's revision, processing flags, unknown dict keys).

    A model loaded from Hugging Face fills the fields that describe it (window_size, soft caps, experts,
    ...) from the HF config; a model built from a config alone (`HookedTransformer(cfg)`) refuses values
    it cannot honour rather than ignoring them (fxhook/from_config.py).
    """

    d_model: int
    d_head: int
    n_layers: int
    n_ctx: int
    n_heads: int = -1  # -1: d_model // d_head
    d_mlp: int | None = None  # None: 4 * d_model
    d_vocab: int = -1
    device: str | None = None
    use_attn_result: bool = False
    use_split_qkv_input: bool = False
    default_prepend_bos: bool = True
    positional_embedding_type: str = "standard"
    n_key_value_heads: int | None = None
    attn_only: bool = False
    gated_mlp: bool = False
    uses_rms_norm: bool = False
    eps: float = 1e-5
    layer_norm_folding: bool = False
    act_fn: str | None = "relu"
    normalization_type: str | None = "LN"
    num_experts: int | None = None
    experts_per_token: int | None = None
    final_rms: bool = False
    dtype: torch.dtype = torch.float32
    model_name: str = "custom"
    use_attn_scale: bool = True
    attn_scale: float = -1.0  # -1: sqrt(d_head) when use_attn_scale
    use_hook_mlp_in: bool = False
    use_attn_in: bool = False
    use_qk_norm: bool = False
    clip_qkv: float | None = None
    use_logn_attn: bool = False
    train_seq_length: int | None = None
    use_dynamic_ntk_rope: bool = False
    use_local_attn: bool = False
    ungroup_grouped_query_attention: bool = False
    original_architecture: str | None = None
    from_checkpoint: bool = False
    checkpoint_index: int | None = None
    checkpoint_label_type: str | None = None
    checkpoint_value: int | None = None
    tokenizer_name: str | None = None
    window_size: int | None = None
    attn_types: list | None = None
    init_mode: str = "gpt2"
    n_devices: int = 1
    attention_dir: str = "causal"
    seed: int | None = None
    initializer_range: float = -1.0  # -1: resolved below as TransformerLens does
    init_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    d_vocab_out: int = -1
    parallel_attn_mlp: bool = False
    rotary_dim: int | None = None
    n_params: int | None = None
    use_hook_tokens: bool = False
    tokenizer_prepends_bos: bool | None = None
    post_embedding_ln: bool = False
    rotary_base: float = 10000.0
    rotary_base_local: float | None = None
    rotary_scaling_factor: float = 1.0
    trust_remote_code: bool = False
    rotary_adjacent_pairs: bool = False
    load_in_4bit: bool = False
    quantization_method: str | None = None
    relative_attention_max_distance: int | None = None
    relative_attention_num_buckets: int | None = None
    decoder_start_token_id: int | None = None
    tie_word_embeddings: bool = False
    use_normalization_before_and_after: bool = False
    attn_scores_soft_cap: float = -1.0
    output_logits_soft_cap: float = -1.0
    use_NTK_by_parts_rope: bool = False
    NTK_by_parts_low_freq_factor: float = 1.0
    NTK_by_parts_high_freq_factor: float = 4.0
    NTK_by_parts_factor: float = 8.0
    NTK_original_ctx_len: int = 8192
    use_yarn_rope: bool = False
    yarn_factor: float = 1.0
    yarn_attention_factor: float = 1.0
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_original_max_position_embeddings: int = 4096
    yarn_truncate: bool = True
    yarn_global_attn_only: bool = False
    use_attention_sinks: bool = False
    norm_topk_prob: bool = False
    _: KW_ONLY  # fxhook's own fields follow, keyword-only
    default_padding_side: str = "right"  # the side text batches are padded on
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_heads == -1:
            if self.d_model % self.d_head:
                raise ValueError(f"d_model ({self.d_model}) must be divisible by d_head ({self.d_head}) when "
                                 "n_heads is not given")
            self.n_heads = self.d_model // self.d_head
        if self.d_mlp is None:  # even attn_only models get one, as in TransformerLens (n_params ignores it)
            self.d_mlp = 4 * self.d_model
        if self.use_local_attn and (self.window_size is None or self.attn_types is None):
            raise ValueError("use_local_attn=True needs window_size and attn_types (\"global\"/\"local\" per layer)")
        if (self.num_experts is None) != (self.experts_per_token is None):
            raise ValueError("num_experts and experts_per_token go together: set both or neither")
        if self.default_prepend_bos not in (True, False):
            raise ValueError(f"default_prepend_bos must be True or False, got {self.default_prepend_bos!r}")
        if self.seed is not None:
            self.set_seed_everywhere(self.seed)
        if self.d_vocab_out == -1:
            self.d_vocab_out = self.d_vocab
        if self.initializer_range < 0:  # gpt2 mode: a std of 0.8 / sqrt(d_model); other modes: a gain of 1
            self.initializer_range = 0.8 / math.sqrt(self.d_model) if self.init_mode == "gpt2" else 1.0
        if self.positional_embedding_type == "rotary" and self.rotary_dim is None:
            self.rotary_dim = self.d_head
        if self.use_attn_scale and self.attn_scale == -1.0:
            self.attn_scale = math.sqrt(self.d_head)
        if self.n_params is None:  # TransformerLens's count: attention and MLP matrices, no biases or norms
            mlp = 0 if self.attn_only else self.d_model * (self.d_mlp or 0) * (2 + self.gated_mlp)
            if self.num_experts:
                mlp = (mlp + self.d_model) * self.num_experts
            self.n_params = self.n_layers * (self.d_model * self.d_head * self.n_heads * 4 + mlp)

    def is_layer_norm_activation(self) -> bool:
        """Whether the activation carries its own LayerNorm (solu_ln)."""
        return self.act_fn is not None and self.act_fn.endswith("_ln")

    def set_seed_everywhere(self, seed: int) -> None:
        """Seed torch, numpy and random (TransformerLens's config does this for `seed`)."""
        import random

        import numpy as np

        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)

    @classmethod
    def unwrap(cls, config: "HookedTransformerConfig | Mapping[str, Any] | Any") -> "HookedTransformerConfig":
        """A config from itself, a dict, or another config object with to_dict()."""
        if isinstance(config, cls):
            return config
        if isinstance(config, Mapping):
            return cls.from_dict(config)
        return cls.from_dict(dict(config.to_dict()))

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
        if values.get("n_heads") is None:
            values["n_heads"] = -1
        if values.get("act_fn") is None and not values.get("attn_only", False):
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
        uses_rms_norm=adapter.norms.kind != "layernorm",
        use_qk_norm=adapter.norms.q_norm is not None,
        use_normalization_before_and_after=adapter.norms.ln1_post is not None,
        **_described_options(hf_config, d_head),
    )


def _described_options(hf_config, d_head: int) -> dict[str, Any]:
    """TransformerLens fields that describe a HF model's options (sliding windows, soft caps, experts)."""
    options: dict[str, Any] = {}
    n_layers = int(hf_config.num_hidden_layers)
    window = getattr(hf_config, "sliding_window", None)
    layer_types = getattr(hf_config, "layer_types", None)
    if window and layer_types:
        attn_types = ["local" if "sliding" in str(kind) else "global" for kind in layer_types]
    elif window and getattr(hf_config, "use_sliding_window", True) is not False:
        attn_types = ["local"] * n_layers
    else:
        attn_types = None
    if attn_types is not None and "local" in attn_types:
        options.update(use_local_attn=True, window_size=int(window), attn_types=attn_types)
    for ours, theirs in (("attn_scores_soft_cap", "attn_logit_softcapping"),
                         ("output_logits_soft_cap", "final_logit_softcapping")):
        if getattr(hf_config, theirs, None):
            options[ours] = float(getattr(hf_config, theirs))
    experts = _first(hf_config, "num_local_experts", "num_experts")
    if experts:
        options.update(num_experts=int(experts), experts_per_token=int(_first(hf_config, "num_experts_per_tok")),
                       norm_topk_prob=bool(getattr(hf_config, "norm_topk_prob", True)))
    scalar = getattr(hf_config, "query_pre_attn_scalar", None)
    if scalar:
        options["attn_scale"] = math.sqrt(float(scalar))
    return options
