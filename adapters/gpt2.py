"""GPT-2: LayerNorm, learned absolute positions, fused c_attn (Conv1D), GELU MLP."""
from fxhook.adapter import Adapter, Site

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
)
