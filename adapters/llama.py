"""Llama family (Llama, Mistral, Qwen2, SmolLM2): RMSNorm, rotary, gated SiLU MLP."""
from fxhook.adapter import Adapter, Site
from fxhook.weights import Projection

LLAMA = Adapter(
    architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
    embed="model.embed_tokens",
    blocks="model.layers",
    final_norm="model.norm",
    unembed="lm_head",
    ln1="input_layernorm",
    attn="self_attn",
    ln2="post_attention_layernorm",
    mlp="mlp",
    norm_kind="rmsnorm",
    positional="rotary",
    q_site=Site("self_attn.q_proj", split_heads=True),
    k_site=Site("self_attn.k_proj", split_heads=True),
    mlp_pre=Site("mlp.gate_proj"),
    mlp_pre_linear=Site("mlp.up_proj"),
    mlp_post=Site("mlp.down_proj", side="input"),
    gated_mlp=True,
    q_proj=Projection("self_attn.q_proj"),
    k_proj=Projection("self_attn.k_proj"),
    v_proj=Projection("self_attn.v_proj"),
    o_proj=Projection("self_attn.o_proj"),
    mlp_in=Projection("mlp.up_proj"),
    mlp_gate=Projection("mlp.gate_proj"),
    mlp_out=Projection("mlp.down_proj"),
)
