"""OLMo 2: post-norm blocks (the attention and MLP outputs are normalised before the residual add; hooked
as ln1 / ln2, TransformerLens's names) and RMSNorms over all heads' q and k (attn.q_norm / attn.k_norm)."""
from dataclasses import replace

from adapters.llama import LLAMA

OLMO2 = replace(
    LLAMA,
    architectures=("Olmo2ForCausalLM",),
    norms=replace(LLAMA.norms, ln1="post_attention_layernorm", ln2="post_feedforward_layernorm", post_norm=True,
                  q_norm="self_attn.q_norm", k_norm="self_attn.k_norm"),
)
