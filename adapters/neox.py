"""GPT-NeoX / Pythia: LayerNorm, partial rotary, fused per-head-interleaved query_key_value,
parallel attention and MLP (each with its own norm) unless use_parallel_residual is False."""
import dataclasses

from fxhook.adapter import Adapter, Attention, FeedForward, Norms, Positions, Site
from fxhook.weights import Projection


def _for_config(hf_config) -> Adapter:
    return dataclasses.replace(NEOX, parallel_attn_mlp=bool(getattr(hf_config, "use_parallel_residual", True)),
                               for_config=None)


# q, k, v: chunks of the fused query_key_value output, laid out [heads, (q k v), d_head]. Pre-rotary q / k
# are hooked where the model has split them, on apply_rotary_pos_emb's arguments: no module outputs them alone
_QKV = dict(n_chunks=3, interleaved=True)

NEOX = Adapter(
    architectures=("GPTNeoXForCausalLM",),
    embed="gpt_neox.embed_in",
    blocks="gpt_neox.layers",
    final_norm="gpt_neox.final_layer_norm",
    unembed="lm_head",
    positions=Positions("rotary"),
    norms=Norms("layernorm", ln1="input_layernorm", ln2="post_attention_layernorm"),
    attention=Attention(
        "attention",
        rotary_fn="apply_rotary_pos_emb",
        q_proj=Projection("attention.query_key_value", chunk=0, **_QKV),
        k_proj=Projection("attention.query_key_value", chunk=1, **_QKV),
        v_proj=Projection("attention.query_key_value", chunk=2, **_QKV),
        o_proj=Projection("attention.dense"),
    ),
    feed_forward=FeedForward(
        "mlp",
        pre_site=Site("mlp.dense_h_to_4h"),
        post_site=Site("mlp.dense_4h_to_h", side="input"),
        in_proj=Projection("mlp.dense_h_to_4h"),
        out_proj=Projection("mlp.dense_4h_to_h"),
    ),
    parallel_attn_mlp=True,
    for_config=_for_config,
)
