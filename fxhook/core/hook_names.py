"""The hook-name schema: every hook kind fxhook knows, and the only place names are built or parsed.

A hook name is TransformerLens's: a model-level key ("hook_embed", "ln_final.hook_scale") or a
block-level key under "blocks.L." ("blocks.3.attn.hook_pattern"). Each kind is one row of `KINDS`:
its key, axes, meaning, TransformerLens short name (`get_act_name`), the config flag that gates it,
and its role (what the analysis and the attention lowering need to know about it).

Code elsewhere asks this module for names (`block_hook`, `model_hook`, `norm_hook`) and for their
parts (`parse`, `layer_of`), never formats or splits a name itself (tests/test_layers.py checks).
Weight names ("blocks.3.attn.W_Q") share the "blocks.L." prefix and are built here too.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Scope = Literal["model", "block"]
Role = Literal["tokens", "residual", "embedding", "norm", "head", "pattern", "neuron", "routing", "unembed"]

BLOCKS = "blocks"
_BLOCK_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class HookKind:
    """One kind of hook point. `key` is the name within its scope ("attn.hook_q" in every block)."""

    key: str
    scope: Scope
    axes: str
    meaning: str
    role: Role
    short: str | None = None  # TransformerLens's short name for get_act_name ("q", "resid_pre")
    flag: str | None = None  # the cfg flag that must be on for the hook to exist (None: always there)

    @property
    def generic_name(self) -> str:
        """"blocks.L.attn.hook_q" / "hook_embed": the name with the block index as L."""
        return f"{BLOCKS}.L.{self.key}" if self.scope == "block" else self.key


def _k(key: str, axes: str, meaning: str, role: Role, short: str | None = None, flag: str | None = None,
       scope: Scope = "block") -> HookKind:
    return HookKind(key, scope, axes, meaning, role, short, flag)


# norm hooks: a norm's prefix ("ln1", "attn.q_norm", "ln_final") followed by one of these
NORM_LEAVES = ("hook_scale", "hook_normalized")
_NORM_AXES = {"hook_scale": "batch pos 1", "hook_normalized": "batch pos d_model"}

KINDS: tuple[HookKind, ...] = (
    _k("hook_tokens", "batch pos", "input token ids, read by the embedding (a hook may replace them)", "tokens",
       flag="use_hook_tokens", scope="model"),
    _k("hook_embed", "batch pos d_model", "token embedding", "embedding", "embed", scope="model"),
    _k("hook_pos_embed", "batch pos d_model", "learned position embedding", "embedding", "pos_embed",
       scope="model"),
    _k("hook_resid_pre", "batch pos d_model", "residual stream entering the block", "residual", "resid_pre"),
    _k("ln1.hook_scale", "batch pos 1", "norm scale before attention: sqrt(var+eps); RMS: sqrt(mean x^2+eps)",
       "norm"),
    _k("ln1.hook_normalized", "batch pos d_model", "normalised input to attention (before the norm's weight)",
       "norm"),
    _k("hook_attn_in", "batch pos head d_model", "attention input, one copy per head", "head", "attn_in",
       "use_attn_in"),
    _k("hook_q_input", "batch pos head d_model", "query input, one copy per head", "head", "q_input",
       "use_split_qkv_input"),
    _k("hook_k_input", "batch pos head d_model", "key input, one copy per head", "head", "k_input",
       "use_split_qkv_input"),
    _k("hook_v_input", "batch pos head d_model", "value input, one copy per head", "head", "v_input",
       "use_split_qkv_input"),
    _k("attn.hook_q", "batch pos head d_head", "queries (before rotary)", "head", "q"),
    _k("attn.hook_k", "batch pos kv_head d_head", "keys (before rotary; key/value heads under GQA)", "head", "k"),
    _k("attn.hook_v", "batch pos kv_head d_head", "values (key/value heads under GQA)", "head", "v"),
    _k("attn.hook_rot_q", "batch pos head d_head", "queries after rotary position embedding", "head", "rot_q"),
    _k("attn.hook_rot_k", "batch pos kv_head d_head", "keys after rotary position embedding", "head", "rot_k"),
    _k("attn.q_norm.hook_scale", "batch pos ...", "scale of the query norm (per head; OLMo 2: all heads)", "norm"),
    _k("attn.q_norm.hook_normalized", "batch pos ...", "normalised queries", "norm"),
    _k("attn.k_norm.hook_scale", "batch pos ...", "scale of the key norm (per head; OLMo 2: all heads)", "norm"),
    _k("attn.k_norm.hook_normalized", "batch pos ...", "normalised keys", "norm"),
    _k("attn.hook_attn_scores", "batch head query_pos key_pos", "scaled attention scores, -inf where masked",
       "pattern", "attn_scores"),
    _k("attn.hook_pattern", "batch head query_pos key_pos", "attention pattern (softmax of the scores)",
       "pattern", "pattern"),
    _k("attn.hook_z", "batch pos head d_head", "attention-weighted values, before the output projection", "head",
       "z"),
    _k("attn.hook_result", "batch pos head d_model", "each head's output to the residual stream", "head",
       "result", "use_attn_result"),
    _k("ln1_post.hook_scale", "batch pos 1", "scale of the norm after attention (Gemma 2)", "norm"),
    _k("ln1_post.hook_normalized", "batch pos d_model", "attention output, normalised (Gemma 2)", "norm"),
    _k("hook_attn_out", "batch pos d_model", "attention output added to the residual stream", "residual",
       "attn_out"),
    _k("hook_resid_mid", "batch pos d_model", "residual stream between attention and MLP", "residual",
       "resid_mid"),
    _k("ln2.hook_scale", "batch pos 1", "norm scale before the MLP", "norm"),
    _k("ln2.hook_normalized", "batch pos d_model", "normalised input to the MLP (before the norm's weight)",
       "norm"),
    _k("hook_mlp_in", "batch pos d_model", "MLP input", "residual", "mlp_in", "use_hook_mlp_in"),
    _k("mlp.hook_pre", "batch pos d_mlp", "MLP pre-activation (the gate branch when gated)", "neuron", "pre"),
    _k("mlp.hook_pre_linear", "batch pos d_mlp", "linear (up) branch of a gated MLP", "neuron", "pre_linear"),
    _k("mlp.hook_mid", "batch pos d_mlp", "SoLU's output, before its LayerNorm (act_fn solu_ln)", "neuron"),
    _k("mlp.ln.hook_scale", "batch pos 1", "scale of SoLU-LN's LayerNorm", "norm"),
    _k("mlp.ln.hook_normalized", "batch pos d_mlp", "SoLU's output, normalised (before the norm's weight)", "norm"),
    _k("mlp.hook_post", "batch pos d_mlp", "MLP neuron activations (times the linear branch when gated)",
       "neuron", "post"),
    _k("mlp.hook_expert_weights", "batch pos n_experts", "router softmax over all experts, before top-k",
       "routing"),
    _k("mlp.hook_expert_indices", "batch pos k", "the experts each token is routed to", "routing"),
    _k("ln2_post.hook_scale", "batch pos 1", "scale of the norm after the MLP (Gemma 2)", "norm"),
    _k("ln2_post.hook_normalized", "batch pos d_model", "MLP output, normalised (Gemma 2)", "norm"),
    _k("hook_mlp_out", "batch pos d_model", "MLP output added to the residual stream", "residual", "mlp_out"),
    _k("hook_resid_post", "batch pos d_model", "residual stream leaving the block", "residual", "resid_post"),
    _k("ln_final.hook_scale", "batch pos 1", "final norm scale", "norm", scope="model"),
    _k("ln_final.hook_normalized", "batch pos d_model", "normalised final residual stream, read by the unembedding",
       "norm", scope="model"),
    _k("unembed.hook_in", "batch pos d_model", "the unembedding's input (the final norm's output)", "unembed",
       scope="model"),
    _k("unembed.hook_out", "batch pos d_vocab_out", "the unembedding's output: logits, before any soft cap",
       "unembed", scope="model"),
)

BY_GENERIC_NAME: dict[str, HookKind] = {k.generic_name: k for k in KINDS}
_BY_KEY: dict[tuple[Scope, str], HookKind] = {(k.scope, k.key): k for k in KINDS}


class UnknownHookKind(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


# ------------------------------------------------------------------ building names
def block_prefix(layer: int) -> str:
    """"blocks.3." : the prefix of block `layer`'s hooks and weights."""
    return f"{BLOCKS}.{int(layer)}."


def block_name(layer: int, key: str) -> str:
    """A name inside block `layer` ("attn.hook_q" -> "blocks.3.attn.hook_q"; weights: "attn.W_Q")."""
    return block_prefix(layer) + key


def block_hook(layer: int, key: str) -> str:
    """The hook `key` of block `layer`; `key` must be a block hook kind of the schema."""
    if ("block", key) not in _BY_KEY:
        raise UnknownHookKind(f"{key!r} is not a block hook kind of fxhook's schema (fxhook/core/hook_names.py)")
    return block_name(layer, key)


def model_hook(key: str) -> str:
    """A model-level hook ("hook_embed", "ln_final.hook_scale"), checked against the schema."""
    if ("model", key) not in _BY_KEY:
        raise UnknownHookKind(f"{key!r} is not a model-level hook kind of fxhook's schema")
    return key


def norm_prefix(layer: int | None, norm: str) -> str:
    """The hook prefix of a norm: ("ln1", 3) -> "blocks.3.ln1."; (None, "ln_final") -> "ln_final."."""
    return norm + "." if layer is None else block_name(layer, norm + ".")


def norm_hook(prefix: str, leaf: str) -> str:
    """A norm's hook under its prefix (from `norm_prefix`): leaf "hook_scale" or "hook_normalized"."""
    if leaf not in NORM_LEAVES:
        raise UnknownHookKind(f"a norm hook is one of {NORM_LEAVES}, not {leaf!r}")
    return prefix + leaf


# ------------------------------------------------------------------ reading names
def parse(name: str) -> tuple[int | None, str]:
    """(layer, key): "blocks.3.attn.hook_q" -> (3, "attn.hook_q"); "hook_embed" -> (None, "hook_embed")."""
    match = _BLOCK_NAME.match(name)
    if match is None:
        return None, name
    return int(match.group(1)), match.group(2)


def layer_of(name: str) -> int | None:
    """The block index of a hook or weight name, None for a model-level one."""
    return parse(name)[0]


def key_of(name: str) -> str:
    """The name within its scope: "blocks.3.attn.hook_q" -> "attn.hook_q"."""
    return parse(name)[1]


def leaf_of(name: str) -> str:
    """The last part of a name: "blocks.3.attn.hook_q" -> "hook_q" (weights: "W_Q")."""
    return name.rsplit(".", 1)[-1]


def generic_name(name: str) -> str:
    """"blocks.12.attn.hook_q" -> "blocks.L.attn.hook_q" (model-level names unchanged)."""
    layer, key = parse(name)
    return key if layer is None else f"{BLOCKS}.L.{key}"


def kind_of(name: str) -> HookKind | None:
    """The schema row of a hook name, or None for a name the schema does not know."""
    layer, key = parse(name)
    return _BY_KEY.get(("model" if layer is None else "block", key))


def is_pattern_hook(name: str) -> bool:
    """Scores or pattern: what only an explicit (eager) attention computation can expose."""
    kind = kind_of(name)
    return kind is not None and kind.role == "pattern"


def is_residual_site(name: str) -> bool:
    """Marked at one use of a residual value but standing for the value itself (every use reads the hook)."""
    return key_of(name) == "hook_resid_mid"


def after_blocks(name: str) -> bool:
    """A hook on the final norm or the unembedding: computed from the last block's residual, position by
    position (what a graph that unembeds the last position only sees one position of)."""
    kind = kind_of(name)
    return kind is not None and kind.scope == "model" and kind.role in ("norm", "unembed")


def position_axis(name: str) -> int | None:
    """The axis of a hook's activation that runs over positions (query positions for a pattern), counted
    from the batch axis at 0; None for a name the schema does not know."""
    kind = kind_of(name)
    if kind is None:
        return None
    axes = kind.axes.split()
    return axes.index("query_pos") if "query_pos" in axes else axes.index("pos")


def describe(name: str) -> tuple[str, str]:
    """(axes, meaning) of a hook point; ("", "") for one the schema does not know."""
    kind = kind_of(name)
    return ("", "") if kind is None else (kind.axes, kind.meaning)


# ------------------------------------------------------------------ TransformerLens short names
_SHORT: dict[str, HookKind] = {k.short: k for k in KINDS if k.short is not None}
_ALIASES = {"scores": "attn_scores", "attn": "pattern", "attn_logits": "attn_scores", "key": "k",
            "query": "q", "value": "v", "mlp_pre": "pre", "mlp_post": "post"}
_NORM_SHORT = {"scale": "hook_scale", "normalized": "hook_normalized"}
_NORM_LAYER_TYPES = {"a": "ln1", "m": "ln2", "attn": "ln1", "mlp": "ln2", "ln1": "ln1", "ln2": "ln2"}
_SHORT_WITH_LAYER = re.compile(r"([a-z_]+?)(\d+)([a-z]+\d?)?$")  # "pattern3", "resid_pre0", "scale4ln1"
SHORT_NAMES = tuple(sorted([*_SHORT, *_ALIASES, *_NORM_SHORT]))


def get_act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """Expand a short activation name to its full hook name, as TransformerLens does.

    get_act_name("pattern", 3) == "blocks.3.attn.hook_pattern";
    get_act_name("scale", 2, "ln1") == "blocks.2.ln1.hook_scale";
    get_act_name("scale") == "ln_final.hook_scale". Full names pass through.
    """
    if "." in name or name.startswith("hook_"):
        return name
    model_level = name in _SHORT and _SHORT[name].scope == "model"
    if layer is None and not model_level and name not in _NORM_SHORT:
        match = _SHORT_WITH_LAYER.match(name)
        if match:
            name, layer, layer_type = match.group(1), int(match.group(2)), match.group(3) or layer_type
    name = _ALIASES.get(name, name)
    if name in _NORM_SHORT:
        if layer is None:
            return norm_hook(norm_prefix(None, "ln_final"), _NORM_SHORT[name])
        norm = _NORM_LAYER_TYPES.get(layer_type or "")
        if norm is None:
            raise ValueError(f"get_act_name({name!r}, {layer}) needs layer_type 'ln1' or 'ln2'")
        return norm_hook(norm_prefix(layer, norm), _NORM_SHORT[name])
    if name not in _SHORT:
        raise KeyError(f"unknown activation short name {name!r}; known: {list(SHORT_NAMES)}")
    kind = _SHORT[name]
    if kind.scope == "model":
        return kind.key
    if layer is None:
        raise ValueError(f"get_act_name({name!r}) needs a layer index")
    return block_name(layer, kind.key)
