"""The native model's HF-style config: TransformerLens's field names, plus what HF code reads."""
from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

NORMALIZATIONS = ("LN", "LNPre", "RMS", "RMSPre", None)
POSITIONS = ("standard", "rotary", "shortformer", "alibi")
ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "silu", "solu", "solu_ln", "relu2")


class TLNativeConfig(PretrainedConfig):
    """A TransformerLens architecture. `attn_types` ("global" / "local" per layer) with `window_size` give
    local attention; `attn_scale` is what the scores are divided by (1 when use_attn_scale is off)."""

    model_type = "fxhook_tl_native"

    def __init__(self, n_layers: int = 1, d_model: int = 16, n_ctx: int = 16, d_head: int = 4, n_heads: int = 4,
                 d_vocab: int = 50, d_vocab_out: int | None = None, d_mlp: int | None = 64,
                 n_key_value_heads: int | None = None, act_fn: str = "relu", eps: float = 1e-5,
                 normalization_type: str | None = "LN", positional_embedding_type: str = "standard",
                 rotary_dim: int | None = None, rotary_base: float = 10000.0, rotary_adjacent_pairs: bool = False,
                 gated_mlp: bool = False, parallel_attn_mlp: bool = False, attn_only: bool = False,
                 attn_types: list[str] | None = None, window_size: int | None = None, use_qk_norm: bool = False,
                 attn_scale: float = 2.0, final_rms: bool = False, **kwargs: Any):
        self.n_layers, self.d_model, self.n_ctx, self.d_head, self.n_heads = n_layers, d_model, n_ctx, d_head, n_heads
        self.d_vocab = d_vocab
        self.d_vocab_out = d_vocab if d_vocab_out in (None, -1) else d_vocab_out
        self.d_mlp, self.n_key_value_heads, self.act_fn, self.eps = d_mlp, n_key_value_heads, act_fn, eps
        self.normalization_type, self.positional_embedding_type = normalization_type, positional_embedding_type
        self.rotary_dim = rotary_dim if rotary_dim is not None else d_head
        self.rotary_base, self.rotary_adjacent_pairs = rotary_base, rotary_adjacent_pairs
        self.gated_mlp, self.parallel_attn_mlp, self.attn_only = gated_mlp, parallel_attn_mlp, attn_only
        self.attn_types = list(attn_types) if attn_types is not None else None
        self.window_size, self.use_qk_norm, self.attn_scale, self.final_rms = window_size, use_qk_norm, attn_scale, final_rms
        # what HF-side code reads (fxhook's generic config reader, the KV cache)
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = d_model, n_layers, n_heads
        self.head_dim, self.vocab_size, self.max_position_embeddings = d_head, d_vocab, n_ctx
        self.num_key_value_heads = n_key_value_heads or n_heads
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        self._check()

    def _check(self) -> None:
        problems = []
        if self.normalization_type not in NORMALIZATIONS:
            problems.append(f"normalization_type={self.normalization_type!r} (expected one of {NORMALIZATIONS})")
        if self.positional_embedding_type not in POSITIONS:
            problems.append(f"positional_embedding_type={self.positional_embedding_type!r} (expected one of {POSITIONS})")
        if self.act_fn not in ACTIVATIONS and not self.attn_only:
            problems.append(f"act_fn={self.act_fn!r} (expected one of {ACTIVATIONS})")
        if self.n_heads % (self.n_key_value_heads or self.n_heads):
            problems.append(f"n_heads={self.n_heads} is not a multiple of n_key_value_heads={self.n_key_value_heads}")
        if self.positional_embedding_type == "rotary" and (self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.d_head):
            problems.append(f"rotary_dim={self.rotary_dim} must be even and in (0, d_head={self.d_head}]")
        if self.attn_types is not None:
            if len(self.attn_types) != self.n_layers or set(self.attn_types) - {"global", "local"}:
                problems.append(f"attn_types={self.attn_types} must give 'global' or 'local' for each of {self.n_layers} layers")
            elif "local" in self.attn_types and not (isinstance(self.window_size, int) and self.window_size > 0):
                problems.append(f"local attention needs a positive integer window_size, got {self.window_size!r}")
        if not self.attn_only and self.d_mlp is None:
            problems.append("d_mlp is required unless attn_only")
        if self.tie_word_embeddings and self.d_vocab_out != self.d_vocab:
            problems.append(f"tie_word_embeddings with d_vocab_out={self.d_vocab_out} != d_vocab={self.d_vocab}")
        if self.gated_mlp and self.act_fn == "solu_ln":
            problems.append("a gated MLP with act_fn='solu_ln' (TransformerLens then ignores W_in)")
        if problems:
            raise ValueError("invalid native TransformerLens config: " + "; ".join(problems))

    @property
    def n_kv_heads(self) -> int:
        return self.n_key_value_heads or self.n_heads

    def window_of(self, layer: int) -> int | None:
        """The sliding window of `layer` (None: global attention)."""
        local = self.attn_types is not None and self.attn_types[layer] == "local"
        return self.window_size if local else None
