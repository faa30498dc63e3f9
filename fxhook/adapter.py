"""The schema of an architecture adapter: where things live in a HF module tree.

An adapter is data. Paths are dotted module paths; block-relative paths are
resolved inside each block. Generic code in `fxhook/` reads only this schema,
so supporting a new family means writing one `Adapter` in `adapters/`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from fxhook.weights import Projection

NormKind = Literal["layernorm", "rmsnorm", "rmsnorm_plus_one"]
PositionalKind = Literal["absolute", "rotary"]


@dataclass(frozen=True)
class Site:
    """A tensor at a module boundary: the output of `module`, or its first input."""

    module: str
    side: Literal["output", "input"] = "output"
    split_heads: bool = False  # the tensor is [b, p, heads * d_head]: mark as [b, p, heads, d_head]
    # a slice of a fused output (GPT-NeoX's query_key_value): chunk `chunk` of `n_chunks`, laid out
    # [n_chunks, heads, d_head] along the last axis, or [heads, n_chunks, d_head] when interleaved
    chunk: int = 0
    n_chunks: int = 1
    interleaved: bool = False


@dataclass(frozen=True)
class Adapter:
    """Per-family knowledge. Every path is relative to the HF causal-LM object."""

    architectures: tuple[str, ...]
    embed: str
    blocks: str
    final_norm: str
    unembed: str
    # inside each block
    ln1: str
    attn: str
    ln2: str | None  # None: the MLP reads ln1's output too (GPT-J, Phi); it is hooked as ln2 of resid_pre
    mlp: str
    norm_kind: NormKind
    positional: PositionalKind
    pos_embed: str | None = None
    # pre-rotary q/k/v of rotary models (block-relative); None: marked inside attention
    q_site: Site | None = None
    k_site: Site | None = None
    # MLP (block-relative)
    mlp_pre: Site | None = None
    mlp_pre_linear: Site | None = None
    mlp_post: Site | None = None
    gated_mlp: bool = False
    # attention projections (block-relative), for weight views and per-head rewrites
    q_proj: Projection | None = None
    k_proj: Projection | None = None
    v_proj: Projection | None = None
    o_proj: Projection | None = None
    # MLP projections (block-relative): TransformerLens's W_in (the linear/up branch), W_gate, W_out
    mlp_in: Projection | None = None
    mlp_gate: Projection | None = None
    mlp_out: Projection | None = None
    # how to read the norm's epsilon from the module
    norm_eps_attr: tuple[str, ...] = ("eps", "variance_epsilon")
    # attention and MLP both read resid_pre and write resid_post (GPT-J, NeoX, Phi): no hook_resid_mid
    parallel_attn_mlp: bool = False
    # learned positions: rows of the position table before position 0 (OPT: 2)
    pos_embed_offset: int = 0
    # rotary on adjacent pairs (GPT-J) rather than on halves (TransformerLens's rotary_adjacent_pairs)
    rotary_adjacent_pairs: bool = False
    # (hf_config) -> the adapter for that config (e.g. NeoX's use_parallel_residual); raises
    # NotImplementedError for configs the family's adapter cannot run
    for_config: Callable[[Any], "Adapter"] | None = None
    extra: dict = field(default_factory=dict)

    def specialised(self, hf_config) -> "Adapter":
        """This adapter as it applies to `hf_config` (itself unless `for_config` says otherwise)."""
        return self if self.for_config is None else self.for_config(hf_config)

    @property
    def neutral_norm_weight(self) -> float:
        """The norm weight that leaves the normalised input unchanged."""
        return 0.0 if self.norm_kind == "rmsnorm_plus_one" else 1.0

    @property
    def rotary(self) -> bool:
        return self.positional == "rotary"
