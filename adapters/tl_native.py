"""TransformerLens's own architectures, run by fxhook's native model (fxhook/native/).

One class, TLNativeForCausalLM, covers TransformerLens's config space; `for_config` reads the norm kind,
positions, q/k norms, MLP form and block layout from the model's config. Module paths are the native
model's (fxhook/native/model.py): embed, pos_embed, blocks.L.{ln1, attn, ln2, mlp}, ln_final, unembed.
"""
from fxhook.adapter import Adapter, Attention, FeedForward, Norms, Positions, Site
from fxhook.weights import Projection

_NORM_KIND = {"LN": "layernorm", "LNPre": "layernorm", "RMS": "rmsnorm", "RMSPre": "rmsnorm", None: "none"}


def _positions(config) -> Positions:
    kind = config.positional_embedding_type
    if kind == "rotary":
        return Positions("rotary", rotary_adjacent_pairs=bool(config.rotary_adjacent_pairs))
    if kind == "alibi":  # a bias on the attention scores (fxhook's attention op): no position table
        return Positions("alibi")
    return Positions("absolute" if kind == "standard" else "shortformer", pos_embed="pos_embed")


def _feed_forward(config) -> FeedForward:
    if config.attn_only:
        return FeedForward("mlp")
    out = dict(post_site=Site("mlp.out_proj", side="input"), out_proj=Projection("mlp.out_proj"))
    if config.gated_mlp:  # b_in lives on up_proj but is added after the product, as TransformerLens does
        return FeedForward("mlp", pre_site=Site("mlp.gate_proj"), pre_linear_site=Site("mlp.up_proj"), gated=True, bias_after_gate=True,
                           in_proj=Projection("mlp.up_proj"), gate_proj=Projection("mlp.gate_proj"), **out)
    solu_ln = dict(mid_site=Site("mlp.act"), act_norm="mlp.ln") if config.act_fn == "solu_ln" else {}
    return FeedForward("mlp", pre_site=Site("mlp.in_proj"), in_proj=Projection("mlp.in_proj"), **solu_ln, **out)


def _for_config(config) -> Adapter:
    qk = dict(q_norm="attn.q_norm", k_norm="attn.k_norm", qk_kind="rmsnorm") if config.use_qk_norm else {}
    return Adapter(
        architectures=("TLNativeForCausalLM",),
        embed="embed",
        blocks="blocks",
        final_norm="ln_final",
        unembed="unembed",
        positions=_positions(config),
        norms=Norms(_NORM_KIND[config.normalization_type], ln1="ln1", ln2=None if config.attn_only else "ln2", **qk),
        attention=Attention(
            "attn",
            q_site=Site("attn.q_proj", split_heads=True),  # hook_q / hook_k before q/k norms and rotary
            k_site=Site("attn.k_proj", split_heads=True),
            q_proj=Projection("attn.q_proj"),
            k_proj=Projection("attn.k_proj"),
            v_proj=Projection("attn.v_proj"),
            o_proj=Projection("attn.o_proj"),
        ),
        feed_forward=_feed_forward(config),
        parallel_attn_mlp=bool(config.parallel_attn_mlp) and not config.attn_only,
        attn_only=bool(config.attn_only),
    )


class _Default:
    """The registered adapter's shape (a GPT-2-like native model); each model gets `for_config`'s."""

    positional_embedding_type, rotary_adjacent_pairs, attn_only, gated_mlp = "standard", False, False, False
    act_fn, use_qk_norm, normalization_type, parallel_attn_mlp = "relu", False, "LN", False


TL_NATIVE = Adapter(**{**_for_config(_Default).__dict__, "for_config": _for_config})
