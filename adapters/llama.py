"""Llama family (Llama, Mistral, Qwen2, SmolLM2): RMSNorm, rotary, gated SiLU MLP."""
from fxhook.adapter import Adapter, Attention, FeedForward, Norms, Positions, Site
from fxhook.weights import Projection

LLAMA = Adapter(
    architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
    embed="model.embed_tokens",
    blocks="model.layers",
    final_norm="model.norm",
    unembed="lm_head",
    positions=Positions("rotary"),
    norms=Norms("rmsnorm", ln1="input_layernorm", ln2="post_attention_layernorm"),
    attention=Attention(
        "self_attn",
        q_site=Site("self_attn.q_proj", split_heads=True),
        k_site=Site("self_attn.k_proj", split_heads=True),
        q_proj=Projection("self_attn.q_proj"),
        k_proj=Projection("self_attn.k_proj"),
        v_proj=Projection("self_attn.v_proj"),
        o_proj=Projection("self_attn.o_proj"),
    ),
    feed_forward=FeedForward(
        "mlp",
        pre_site=Site("mlp.gate_proj"),
        pre_linear_site=Site("mlp.up_proj"),
        post_site=Site("mlp.down_proj", side="input"),
        gated=True,
        in_proj=Projection("mlp.up_proj"),
        gate_proj=Projection("mlp.gate_proj"),
        out_proj=Projection("mlp.down_proj"),
    ),
)
