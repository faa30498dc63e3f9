"""Mixtral: Mistral's attention with a sparse mixture-of-experts MLP (top-k routing over a softmax)."""
from dataclasses import replace

from fxhook.adapter import Experts

from adapters.llama import LLAMA

MIXTRAL = replace(
    LLAMA,
    architectures=("MixtralForCausalLM",),
    mlp_pre=None, mlp_pre_linear=None, mlp_post=None, mlp_in=None, mlp_gate=None, mlp_out=None,
    gated_mlp=False,
    experts=Experts(router="gate", experts="experts"),
)
