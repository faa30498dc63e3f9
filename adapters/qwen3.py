"""Qwen3: Llama's layout with an RMSNorm on each head's q and k (before rotary): attn.q_norm / attn.k_norm."""
from dataclasses import replace

from adapters.llama import LLAMA

QWEN3 = replace(LLAMA, architectures=("Qwen3ForCausalLM",),
                norms=replace(LLAMA.norms, q_norm="self_attn.q_norm", k_norm="self_attn.k_norm"))
