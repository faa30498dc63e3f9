"""GPT-2: LayerNorm, learned absolute positions, fused c_attn (Conv1D), GELU MLP."""
from fxhook.adapter import Adapter, Attention, FeedForward, Norms, Positions, Site
from fxhook.weights import Projection

GPT2 = Adapter(
    architectures=("GPT2LMHeadModel",),
    embed="transformer.wte",
    blocks="transformer.h",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    positions=Positions("absolute", pos_embed="transformer.wpe"),
    norms=Norms("layernorm", ln1="ln_1", ln2="ln_2"),
    attention=Attention(
        "attn",
        q_proj=Projection("attn.c_attn", "conv1d", chunk=0, n_chunks=3),
        k_proj=Projection("attn.c_attn", "conv1d", chunk=1, n_chunks=3),
        v_proj=Projection("attn.c_attn", "conv1d", chunk=2, n_chunks=3),
        o_proj=Projection("attn.c_proj", "conv1d"),
    ),
    feed_forward=FeedForward(
        "mlp",
        pre_site=Site("mlp.c_fc"),
        post_site=Site("mlp.c_proj", side="input"),
        in_proj=Projection("mlp.c_fc", "conv1d"),
        out_proj=Projection("mlp.c_proj", "conv1d"),
    ),
)
