"""Mixtral: Mistral's attention with a sparse mixture-of-experts MLP (top-k routing over a softmax)."""
from dataclasses import replace

from fxhook.adapter import Experts, FeedForward

from adapters.llama import LLAMA

MIXTRAL = replace(
    LLAMA,
    architectures=("MixtralForCausalLM",),
    feed_forward=FeedForward("mlp", experts=Experts(router="gate", experts="experts")),
)
