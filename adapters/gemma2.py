"""Gemma 2: Gemma with norms before and after attention and MLP (ln1/ln1_post, ln2/ln2_post), attention
and final-logit soft-capping and alternating sliding-window layers (both handled by HF's own code and
fxhook's attention capture: nothing to describe here)."""
from dataclasses import replace

from adapters.gemma import GEMMA

GEMMA2 = replace(
    GEMMA,
    architectures=("Gemma2ForCausalLM",),
    norms=replace(GEMMA.norms, ln2="pre_feedforward_layernorm", ln1_post="post_attention_layernorm",
                  ln2_post="post_feedforward_layernorm"),
)
