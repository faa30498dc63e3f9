"""Phi (phi-1, phi-1.5, phi-2): LayerNorm, partial rotary, one norm read by both the attention
and the MLP, which run in parallel; attention output projection `dense`; unembedding bias."""
from fxhook.adapter import Adapter, Site
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
    ln1="input_layernorm",
    attn="self_attn",
    ln2=None,  # the MLP reads input_layernorm's output: hooked as ln2, as TransformerLens does
    mlp="mlp",
    norm_kind="layernorm",
    positional="rotary",
    parallel_attn_mlp=True,
    q_site=Site("self_attn.q_proj", split_heads=True),
    k_site=Site("self_attn.k_proj", split_heads=True),
    mlp_pre=Site("mlp.fc1"),
    mlp_post=Site("mlp.fc2", side="input"),
    q_proj=Projection("self_attn.q_proj"),
    k_proj=Projection("self_attn.k_proj"),
    v_proj=Projection("self_attn.v_proj"),
    o_proj=Projection("self_attn.dense"),
    mlp_in=Projection("mlp.fc1"),
    mlp_out=Projection("mlp.fc2"),
    for_config=_for_config,
)
