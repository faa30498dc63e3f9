"""Phi (phi-1, phi-1.5, phi-2): LayerNorm, partial rotary, one norm read by both the attention
and the MLP, which run in parallel; attention output projection `dense`; unembedding bias."""
from fxhook.adapter import Adapter, Attention, FeedForward, Norms, Positions, Site
from fxhook.weights import Projection


def _for_config(hf_config) -> Adapter:
    if getattr(hf_config, "qk_layernorm", False):
        raise NotImplementedError(
            "Phi with qk_layernorm=True normalises q and k per head, which the Phi adapter does not hook; "
            "add q/k norm sites to adapters/phi.py to support it")
    return PHI


PHI = Adapter(
    architectures=("PhiForCausalLM",),
    embed="model.embed_tokens",
    blocks="model.layers",
    final_norm="model.final_layernorm",
    unembed="lm_head",
    positions=Positions("rotary"),
    # ln2=None: the MLP reads input_layernorm's output, hooked as ln2, as TransformerLens does
    norms=Norms("layernorm", ln1="input_layernorm", ln2=None),
    attention=Attention(
        "self_attn",
        q_site=Site("self_attn.q_proj", split_heads=True),
        k_site=Site("self_attn.k_proj", split_heads=True),
        q_proj=Projection("self_attn.q_proj"),
        k_proj=Projection("self_attn.k_proj"),
        v_proj=Projection("self_attn.v_proj"),
        o_proj=Projection("self_attn.dense"),
    ),
    feed_forward=FeedForward(
        "mlp",
        pre_site=Site("mlp.fc1"),
        post_site=Site("mlp.fc2", side="input"),
        in_proj=Projection("mlp.fc1"),
        out_proj=Projection("mlp.fc2"),
    ),
    parallel_attn_mlp=True,
    for_config=_for_config,
)
