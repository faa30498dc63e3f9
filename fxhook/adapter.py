"""The schema of an architecture adapter: where things live in a HF module tree.

An adapter is data. Paths are dotted module paths; block-relative paths are
resolved inside each block. Generic code in `fxhook/` reads only this schema,
so supporting a new family means writing one `Adapter` in `adapters/`.

An `Adapter` holds the model-level paths and four parts, each a small frozen
dataclass: `Positions`, `Norms`, `Attention` and `FeedForward`. It checks itself
when built (`__post_init__`), so an inconsistent adapter fails where it is
written rather than as a wrong hook deep inside a capture.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, get_args

from torch import nn

from fxhook.weights import Projection


def get_module(root: nn.Module, path: str) -> nn.Module:
    """The module at adapter path `path` under `root`, or a clear error naming the path."""
    try:
        return root.get_submodule(path)
    except AttributeError as e:
        raise ValueError(f"adapter path {path!r} not found in {type(root).__name__}: {e}") from None


# "none": no normalisation (TransformerLens's normalization_type=None): the norm modules are identities, unhooked
NormKind = Literal["layernorm", "rmsnorm", "rmsnorm_plus_one", "none"]
# "shortformer": a learned position table added to the query and key inputs only, not to the residual stream
# "alibi": a per-head bias on the attention scores, no position table (fxhook's native TransformerLens model)
PositionalKind = Literal["absolute", "rotary", "shortformer", "alibi"]


@dataclass(frozen=True)
class Site:
    """A tensor at a module boundary: the output of `module`, or its first input."""

    module: str
    side: Literal["output", "input"] = "output"
    split_heads: bool = False  # the tensor is [b, p, heads * d_head]: mark as [b, p, heads, d_head]


@dataclass(frozen=True)
class Experts:
    """A mixture-of-experts MLP (block-relative paths), routed top-k over a softmax of router logits."""

    router: str  # linear layer, weight [n_experts, d_model]
    experts: str  # experts module holding fused 3D weights
    gate_up: str = "gate_up_proj"  # parameter [n_experts, 2 * d_mlp, d_model]: gate rows, then up rows
    down: str = "down_proj"  # parameter [n_experts, d_model, d_mlp]
    normalise_top_k: bool = True  # the top-k routing weights are renormalised to sum to 1


@dataclass(frozen=True)
class Positions:
    """How token positions enter the model: a learned table added to the embedding, or rotary in attention."""

    kind: PositionalKind
    pos_embed: str | None = None  # the learned position table (model-level path); absolute positions only
    pos_embed_offset: int = 0  # rows of the table before position 0 (OPT: 2)
    # rotary on adjacent pairs (GPT-J) rather than on halves (TransformerLens's rotary_adjacent_pairs)
    rotary_adjacent_pairs: bool = False

    @property
    def rotary(self) -> bool:
        return self.kind == "rotary"


@dataclass(frozen=True)
class Norms:
    """The norms' formula and where they sit in each block (block-relative paths)."""

    kind: NormKind  # also the final norm's
    ln1: str
    ln2: str | None  # None: the MLP reads ln1's output too (GPT-J, Phi); it is hooked as ln2 of resid_pre
    # norms on the attention / MLP output before the residual add, beside ln1/ln2 (Gemma 2): hooked as
    # TransformerLens's ln1_post / ln2_post; hook_attn_out / hook_mlp_out are their outputs
    ln1_post: str | None = None
    ln2_post: str | None = None
    # post-norm blocks (OLMo 2): ln1 / ln2 normalise the attention / MLP output, nothing normalises
    # their input; hooked as ln1 / ln2 (TransformerLens's naming); fold_ln does not apply
    post_norm: bool = False
    # q/k norms (Qwen3 per head, OLMo 2 over all heads): hooked as attn.q_norm / attn.k_norm
    q_norm: str | None = None
    k_norm: str | None = None
    qk_kind: NormKind | None = None  # the q/k norms' formula when it is not `kind` (TransformerLens: always RMS)
    eps_attr: tuple[str, ...] = ("eps", "variance_epsilon")  # where a norm module keeps its epsilon

    @property
    def neutral_weight(self) -> float:
        """The norm weight that leaves the normalised input unchanged."""
        return 0.0 if self.kind == "rmsnorm_plus_one" else 1.0


@dataclass(frozen=True)
class Attention:
    """The attention module and, block-relative, its pre-rotary q/k sites and its projections."""

    path: str
    # pre-rotary q/k of the model; None: marked inside attention (where HF's attention receives them)
    q_site: Site | None = None
    k_site: Site | None = None
    # or, where no module outputs q and k alone (a fused q/k/v projection, GPT-NeoX): the function HF calls
    # with the pre-rotary (q, k) [b, heads, p, d_head] first, a global of the attention's Python module
    rotary_fn: str | None = None
    # projections, for weight views and per-head rewrites
    q_proj: Projection | None = None
    k_proj: Projection | None = None
    v_proj: Projection | None = None
    o_proj: Projection | None = None


@dataclass(frozen=True)
class FeedForward:
    """The MLP (TransformerLens's `mlp`): its module, hook sites and projections, block-relative."""

    path: str
    pre_site: Site | None = None  # mlp.hook_pre: the gate (gated) or the in projection's output
    pre_linear_site: Site | None = None  # mlp.hook_pre_linear: the linear branch of a gated MLP
    post_site: Site | None = None  # mlp.hook_post: the out projection's input
    gated: bool = False
    # a gated MLP's b_in (in_proj's bias) is added after act(gate) * up, as TransformerLens does (the native
    # model), rather than inside the product (HF's up projection bias)
    bias_after_gate: bool = False
    # TransformerLens's W_in (the linear / up branch), W_gate, W_out
    in_proj: Projection | None = None
    gate_proj: Projection | None = None
    out_proj: Projection | None = None
    # a mixture-of-experts MLP (Mixtral): routing hooks mlp.hook_expert_weights / hook_expert_indices
    experts: Experts | None = None
    # a LayerNorm after the activation (TransformerLens's SoLU-LN): mid_site is the activation's output
    # (mlp.hook_mid), act_norm the norm module (hooked as mlp.ln; weights mlp.ln.w / mlp.ln.b, folded into W_out)
    mid_site: Site | None = None
    act_norm: str | None = None


def _alias(group: str, attr: str) -> property:
    """A read-only flat name for `group.attr`, kept for callers written before the parts existed."""
    return property(lambda self: getattr(getattr(self, group), attr), doc=f"Read-only alias of `{group}.{attr}`.")


@dataclass(frozen=True)
class Adapter:
    """Per-family knowledge. Top-level paths are relative to the HF causal-LM object."""

    architectures: tuple[str, ...]
    embed: str
    blocks: str
    final_norm: str
    unembed: str
    positions: Positions
    norms: Norms
    attention: Attention
    feed_forward: FeedForward
    # attention and MLP both read resid_pre and write resid_post (GPT-J, NeoX, Phi): no hook_resid_mid
    parallel_attn_mlp: bool = False
    # the token embedding is multiplied by sqrt(d_model) (Gemma): hook_embed is the scaled embedding, as in
    # TransformerLens (whose W_E has the scale folded in), marked where it enters block 0 (transformers 5
    # scales inside the embedding module, earlier versions in the model's forward: right for both)
    scaled_embedding: bool = False
    # blocks with no MLP (TransformerLens's attn_only): no ln2, hook_resid_mid, hook_mlp_in or hook_mlp_out
    attn_only: bool = False
    # (hf_config) -> the adapter for that config (e.g. NeoX's use_parallel_residual); raises
    # NotImplementedError for configs the family's adapter cannot run
    for_config: Callable[[Any], "Adapter"] | None = None

    def __post_init__(self) -> None:
        found = adapter_problems(self)
        if found:
            archs = self.architectures
            name = ", ".join(archs) if isinstance(archs, tuple) and archs and all(
                isinstance(n, str) for n in archs) else repr(archs)
            raise ValueError(f"inconsistent adapter for {name}: " + "; ".join(found))

    def specialised(self, hf_config) -> "Adapter":
        """This adapter as it applies to `hf_config` (itself unless `for_config` says otherwise)."""
        return self if self.for_config is None else self.for_config(hf_config)

    @property
    def neutral_norm_weight(self) -> float:
        """The norm weight that leaves the normalised input unchanged."""
        return self.norms.neutral_weight

    @property
    def rotary(self) -> bool:
        return self.positions.rotary

    @property
    def attn_out_module(self) -> str:
        """The module whose output is hook_attn_out: what the attention adds to the residual stream."""
        n = self.norms
        return n.ln1_post or (n.ln1 if n.post_norm else self.attention.path)

    @property
    def mlp_out_module(self) -> str:
        """The module whose output is hook_mlp_out."""
        n = self.norms
        return n.ln2_post or (n.ln2 if n.post_norm else self.feed_forward.path)

    @property
    def mlp_in_module(self) -> str | None:
        """The module whose input is hook_resid_mid (None when the MLP reads resid_pre)."""
        return self.feed_forward.path if self.norms.post_norm else self.norms.ln2

    # ---- compatibility: flat names of the parts, read-only, for callers not yet switched to the parts
    # (fxhook/analysis/resid.py reads norm_kind; tests/test_infer_adapter.py compares the others).
    norm_kind = _alias("norms", "kind")
    ln1 = _alias("norms", "ln1")
    ln2 = _alias("norms", "ln2")
    positional = _alias("positions", "kind")
    pos_embed = _alias("positions", "pos_embed")
    attn = _alias("attention", "path")
    q_site = _alias("attention", "q_site")
    k_site = _alias("attention", "k_site")
    q_proj = _alias("attention", "q_proj")
    k_proj = _alias("attention", "k_proj")
    v_proj = _alias("attention", "v_proj")
    o_proj = _alias("attention", "o_proj")
    mlp = _alias("feed_forward", "path")
    gated_mlp = _alias("feed_forward", "gated")
    mlp_pre = _alias("feed_forward", "pre_site")
    mlp_pre_linear = _alias("feed_forward", "pre_linear_site")
    mlp_post = _alias("feed_forward", "post_site")
    mlp_in = _alias("feed_forward", "in_proj")
    mlp_gate = _alias("feed_forward", "gate_proj")
    mlp_out = _alias("feed_forward", "out_proj")


# ------------------------------------------------------------------ validation
NORM_KINDS: tuple[str, ...] = get_args(NormKind)
POSITIONAL_KINDS: tuple[str, ...] = get_args(PositionalKind)
_PARTS = {"positions": Positions, "norms": Norms, "attention": Attention, "feed_forward": FeedForward}


def _part_problems(name: str, part: Site | Projection) -> list[str]:
    """A projection slices a fused output sensibly; a site marks a module's output, or its input unsplit."""
    if isinstance(part, Site):
        if part.side not in ("output", "input"):
            return [f"{name} has side={part.side!r} (expected 'output' or 'input')"]
        return [f"{name} marks a module's input, which is not split into heads"] if (
            part.side == "input" and part.split_heads) else []
    out = []
    if part.n_chunks < 1 or not 0 <= part.chunk < part.n_chunks:
        out.append(f"{name} takes chunk {part.chunk} of n_chunks={part.n_chunks}")
    if part.interleaved and part.n_chunks == 1:
        out.append(f"{name} is interleaved but not fused (n_chunks=1)")
    return out


def _given_together(names: dict[str, Any]) -> bool:
    return len({value is None for value in names.values()}) <= 1


def adapter_problems(a: Adapter) -> list[str]:
    """What is inconsistent in `a`, one sentence each (empty when it is a valid adapter).

    Only rules every family adapter and every inferred adapter obey: each names a combination the
    generic capture, weight views or passes would get silently wrong.
    """
    if not (isinstance(a.architectures, tuple) and a.architectures and
            all(isinstance(n, str) and n for n in a.architectures)):
        return ["architectures must be a non-empty tuple of class names"]
    wrong_types = [f"{name} must be a {cls.__name__}, got {type(getattr(a, name)).__name__}"
                   for name, cls in _PARTS.items() if not isinstance(getattr(a, name), cls)]
    if wrong_types:
        return wrong_types
    pos, norms, attn, ff = a.positions, a.norms, a.attention, a.feed_forward
    out = [f"path {name} is empty" for name, path in (("embed", a.embed), ("blocks", a.blocks),
                                                      ("final_norm", a.final_norm), ("unembed", a.unembed),
                                                      ("attention.path", attn.path), ("feed_forward.path", ff.path),
                                                      ("norms.ln1", norms.ln1)) if not path]
    # positions
    if pos.kind not in POSITIONAL_KINDS:
        out.append(f"positions.kind is {pos.kind!r} (expected one of {POSITIONAL_KINDS})")
    elif pos.kind in ("rotary", "alibi") and pos.pos_embed is not None:
        out.append(f"{pos.kind} positions take no learned position table, but pos_embed={pos.pos_embed!r}")
    elif pos.kind not in ("rotary", "alibi") and pos.pos_embed is None:
        out.append(f"{pos.kind} positions need pos_embed (the learned position table)")
    if pos.pos_embed_offset < 0 or (pos.pos_embed_offset and pos.pos_embed is None):
        out.append(f"pos_embed_offset={pos.pos_embed_offset} needs a position table and must be >= 0")
    if pos.rotary_adjacent_pairs and not pos.rotary:
        out.append("rotary_adjacent_pairs is set but positions are not rotary")
    # norms
    if norms.qk_kind is not None and (norms.qk_kind not in NORM_KINDS or norms.q_norm is None):
        out.append(f"norms.qk_kind={norms.qk_kind!r} needs q/k norms and one of {NORM_KINDS}")
    if (ff.mid_site is None) != (ff.act_norm is None):
        out.append("mid_site and act_norm (SoLU-LN's hook_mid and its LayerNorm) are given together or not at all")
    if norms.kind not in NORM_KINDS:
        out.append(f"norms.kind is {norms.kind!r} (expected one of {NORM_KINDS})")
    if not norms.eps_attr:
        out.append("norms.eps_attr is empty: no attribute to read a norm's epsilon from")
    if a.attn_only and (norms.ln2 is not None or a.parallel_attn_mlp or ff.in_proj is not None):
        out.append("attn_only blocks have no ln2, MLP projections or parallel MLP")
    if norms.ln2 is None and not a.parallel_attn_mlp and not a.attn_only:
        out.append("ln2=None (the MLP reads ln1's output) needs parallel_attn_mlp=True: a sequential MLP "
                   "reads resid_mid through a norm of its own")
    if norms.post_norm and norms.ln2 is None:
        out.append("post_norm blocks need ln2 (the norm of the MLP output)")
    if norms.post_norm and (norms.ln1_post or norms.ln2_post):
        out.append("post_norm blocks normalise outputs with ln1/ln2: ln1_post/ln2_post would normalise twice")
    if not _given_together({"q_norm": norms.q_norm, "k_norm": norms.k_norm}):
        out.append("q_norm and k_norm are given together or not at all")
    # attention
    if not _given_together({"q_site": attn.q_site, "k_site": attn.k_site}):
        out.append("q_site and k_site are given together or not at all (else one of hook_q / hook_k is "
                   "marked twice or never)")
    if attn.rotary_fn is not None and (attn.q_site is not None or not pos.rotary):
        out.append("rotary_fn marks pre-rotary q / k on a rotary model with no q_site / k_site (else they are "
                   "marked twice, or nothing applies rotary)")
    projections = {f"{x}_proj": getattr(attn, f"{x}_proj") for x in "qkvo"}
    if not _given_together(projections):
        missing = sorted(k for k, v in projections.items() if v is None)
        out.append(f"attention projections are given all four or none (missing {missing})")
    # MLP
    if ff.gated:
        if ff.in_proj is not None and ff.gate_proj is None:
            out.append("a gated MLP with projections needs gate_proj (TransformerLens's W_gate)")
        if ff.pre_site is not None and ff.pre_linear_site is None:
            out.append("a gated MLP with hook sites needs pre_linear_site (mlp.hook_pre_linear)")
    elif ff.gate_proj is not None or ff.pre_linear_site is not None:
        out.append("gate_proj / pre_linear_site are given but the MLP is not gated (gated=False)")
    if not _given_together({"in_proj": ff.in_proj, "out_proj": ff.out_proj}):
        out.append("MLP in_proj and out_proj are given together or not at all")
    if ff.experts is not None:
        dense = [n for n in ("pre_site", "pre_linear_site", "post_site", "in_proj", "gate_proj", "out_proj")
                 if getattr(ff, n) is not None]
        if dense or ff.gated:
            out.append(f"a mixture-of-experts MLP has no dense MLP sites or projections, got "
                       f"{dense + (['gated'] if ff.gated else [])}")
    # sites and fused slices
    sliced = {f"attention.{n}": getattr(attn, n) for n in ("q_site", "k_site", *projections)}
    sliced |= {f"feed_forward.{n}": getattr(ff, n) for n in ("pre_site", "pre_linear_site", "post_site", "in_proj",
                                                            "gate_proj", "out_proj")}
    for name, part in sliced.items():
        if part is not None:
            out.extend(_part_problems(name, part))
    if a.for_config is not None and not callable(a.for_config):
        out.append("for_config must be callable (hf_config -> Adapter)")
    return out
