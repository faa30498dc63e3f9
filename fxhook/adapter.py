"""The schema of an architecture adapter: where things live in a HF module tree.

An adapter is data. Paths are dotted module paths; block-relative paths are
resolved inside each block. Generic code in `fxhook/` reads only this schema,
so supporting a new family means writing one `Adapter` in `adapters/`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from torch import nn

from fxhook.weights import Projection


def get_module(root: nn.Module, path: str) -> nn.Module:
    """The module at adapter path `path` under `root`, or a clear error naming the path."""
    try:
        return root.get_submodule(path)
    except AttributeError as e:
        raise ValueError(f"adapter path {path!r} not found in {type(root).__name__}: {e}") from None

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
class Experts:
    """A mixture-of-experts MLP (block-relative paths), routed top-k over a softmax of router logits."""

    router: str  # linear layer, weight [n_experts, d_model]
    experts: str  # experts module holding fused 3D weights
    gate_up: str = "gate_up_proj"  # parameter [n_experts, 2 * d_mlp, d_model]: gate rows, then up rows
    down: str = "down_proj"  # parameter [n_experts, d_model, d_mlp]
    normalise_top_k: bool = True  # the top-k routing weights are renormalised to sum to 1


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
    # norms on the attention / MLP output before the residual add, beside ln1/ln2 (Gemma 2): hooked as
    # TransformerLens's ln1_post / ln2_post; hook_attn_out / hook_mlp_out are their outputs
    ln1_post: str | None = None
    ln2_post: str | None = None
    # post-norm blocks (OLMo 2): ln1 / ln2 normalise the attention / MLP output, nothing normalises
    # their input; hooked as ln1 / ln2 (TransformerLens's naming); fold_ln does not apply
    post_norm: bool = False
    # q/k norms (block-relative; Qwen3 per head, OLMo 2 over all heads): hooked as attn.q_norm / attn.k_norm
    q_norm: str | None = None
    k_norm: str | None = None
    # the token embedding is multiplied by sqrt(d_model) (Gemma): hook_embed is the scaled embedding, as in
    # TransformerLens (whose W_E has the scale folded in), marked where it enters block 0 (transformers 5
    # scales inside the embedding module, earlier versions in the model's forward: right for both)
    scaled_embedding: bool = False
    # a mixture-of-experts MLP (Mixtral): routing hooks mlp.hook_expert_weights / hook_expert_indices
    experts: Experts | None = None
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

    @property
    def attn_out_module(self) -> str:
        """The module whose output is hook_attn_out: what the attention adds to the residual stream."""
        return self.ln1_post or (self.ln1 if self.post_norm else self.attn)

    @property
    def mlp_out_module(self) -> str:
        """The module whose output is hook_mlp_out."""
        return self.ln2_post or (self.ln2 if self.post_norm else self.mlp)

    @property
    def mlp_in_module(self) -> str | None:
        """The module whose input is hook_resid_mid (None when the MLP reads resid_pre)."""
        return self.mlp if self.post_norm else self.ln2
