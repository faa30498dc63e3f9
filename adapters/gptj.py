"""GPT-J: LayerNorm, rotary on adjacent pairs of the first rotary_dim dimensions, one norm
read by both the attention and the MLP, which run in parallel; the unembedding has a bias."""
from fxhook.adapter import Adapter, Site
from fxhook.weights import Projection

GPTJ = Adapter(
    architectures=("GPTJForCausalLM",),
    embed="transformer.wte",
    blocks="transformer.h",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    ln1="ln_1",
    attn="attn",
    ln2=None,  # the MLP reads ln_1's output: hooked as ln2, as TransformerLens does
    mlp="mlp",
    norm_kind="layernorm",
    positional="rotary",
    parallel_attn_mlp=True,
    rotary_adjacent_pairs=True,
    q_site=Site("attn.q_proj", split_heads=True),
    k_site=Site("attn.k_proj", split_heads=True),
    mlp_pre=Site("mlp.fc_in"),
    mlp_post=Site("mlp.fc_out", side="input"),
    q_proj=Projection("attn.q_proj"),
    k_proj=Projection("attn.k_proj"),
    v_proj=Projection("attn.v_proj"),
    o_proj=Projection("attn.out_proj"),
    mlp_in=Projection("mlp.fc_in"),
    mlp_out=Projection("mlp.fc_out"),
)
