"""GPT-J: LayerNorm, rotary on adjacent pairs of the first rotary_dim dimensions, one norm
read by both the attention and the MLP, which run in parallel; the unembedding has a bias."""
from fxhook.adapter import Adapter, Attention, FeedForward, Norms, Positions, Site
from fxhook.weights import Projection

GPTJ = Adapter(
    architectures=("GPTJForCausalLM",),
    embed="transformer.wte",
    blocks="transformer.h",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    positions=Positions("rotary", rotary_adjacent_pairs=True),
    # ln2=None: the MLP reads ln_1's output, hooked as ln2, as TransformerLens does
    norms=Norms("layernorm", ln1="ln_1", ln2=None),
    attention=Attention(
        "attn",
        q_site=Site("attn.q_proj", split_heads=True),
        k_site=Site("attn.k_proj", split_heads=True),
        q_proj=Projection("attn.q_proj"),
        k_proj=Projection("attn.k_proj"),
        v_proj=Projection("attn.v_proj"),
        o_proj=Projection("attn.out_proj"),
    ),
    feed_forward=FeedForward(
        "mlp",
        pre_site=Site("mlp.fc_in"),
        post_site=Site("mlp.fc_out", side="input"),
        in_proj=Projection("mlp.fc_in"),
        out_proj=Projection("mlp.fc_out"),
    ),
    parallel_attn_mlp=True,
)
