"""GPT-2: LayerNorm, learned absolute positions, fused c_attn (Conv1D), GELU MLP."""
from fxhook.adapter import Adapter, Site
from fxhook.weights import Projection

GPT2 = Adapter(
    architectures=("GPT2LMHeadModel",),
    embed="transformer.wte",
    pos_embed="transformer.wpe",
    blocks="transformer.h",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    ln1="ln_1",
    attn="attn",
    ln2="ln_2",
    mlp="mlp",
    norm_kind="layernorm",
    positional="absolute",
    mlp_pre=Site("mlp.c_fc"),
    mlp_post=Site("mlp.c_proj", side="input"),
    q_proj=Projection("attn.c_attn", "conv1d", chunk=0, n_chunks=3),
    k_proj=Projection("attn.c_attn", "conv1d", chunk=1, n_chunks=3),
    v_proj=Projection("attn.c_attn", "conv1d", chunk=2, n_chunks=3),
    o_proj=Projection("attn.c_proj", "conv1d"),
    mlp_in=Projection("mlp.c_fc", "conv1d"),
    mlp_out=Projection("mlp.c_proj", "conv1d"),
)
