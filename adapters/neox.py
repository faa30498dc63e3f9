"""GPT-NeoX / Pythia: LayerNorm, partial rotary, fused per-head-interleaved query_key_value,
parallel attention and MLP (each with its own norm) unless use_parallel_residual is False."""
import dataclasses

from fxhook.adapter import Adapter, Site
from fxhook.weights import Projection


def _for_config(hf_config) -> Adapter:
    return dataclasses.replace(NEOX, parallel_attn_mlp=bool(getattr(hf_config, "use_parallel_residual", True)),
                               for_config=None)


NEOX = Adapter(
    architectures=("GPTNeoXForCausalLM",),
    embed="gpt_neox.embed_in",
    blocks="gpt_neox.layers",
    final_norm="gpt_neox.final_layer_norm",
    unembed="lm_head",
    ln1="input_layernorm",
    attn="attention",
    ln2="post_attention_layernorm",
    mlp="mlp",
    norm_kind="layernorm",
    positional="rotary",
    parallel_attn_mlp=True,
    # pre-rotary q and k: chunks of the fused output, laid out [heads, (q k v), d_head]
    q_site=Site("attention.query_key_value", chunk=0, n_chunks=3, interleaved=True),
    k_site=Site("attention.query_key_value", chunk=1, n_chunks=3, interleaved=True),
    mlp_pre=Site("mlp.dense_h_to_4h"),
    mlp_post=Site("mlp.dense_4h_to_h", side="input"),
    q_proj=Projection("attention.query_key_value", chunk=0, n_chunks=3, interleaved=True),
    k_proj=Projection("attention.query_key_value", chunk=1, n_chunks=3, interleaved=True),
    v_proj=Projection("attention.query_key_value", chunk=2, n_chunks=3, interleaved=True),
    o_proj=Projection("attention.dense"),
    mlp_in=Projection("mlp.dense_h_to_4h"),
    mlp_out=Projection("mlp.dense_4h_to_h"),
    for_config=_for_config,
)
