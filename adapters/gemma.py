"""Gemma: Llama's layout with (1 + w) RMSNorm, a GeGLU MLP and embeddings scaled by sqrt(d_model)."""
from dataclasses import replace

from adapters.llama import LLAMA

GEMMA = replace(LLAMA, architectures=("GemmaForCausalLM",), norms=replace(LLAMA.norms, kind="rmsnorm_plus_one"),
                scaled_embedding=True)
