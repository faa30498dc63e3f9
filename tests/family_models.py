"""Small random HF models for the norm-variant and MoE families: Gemma, Gemma 2, Qwen3, OLMo 2, Mixtral,
Mistral with a sliding window short enough to matter, and Qwen2 (its q/k/v biases always on).

Norm weights and biases are randomised as in tests/models.py. Gemma 2's soft-caps are small enough to
bite on these tiny models (scores and logits of order 1) and its window short enough that prompts run
past it; tests check that each of these changes the output, so a dropped cap or window cannot pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from hypothesis import strategies as st

from models import VOCAB, ModelSpec, randomise_biases, randomise_norms
from support import note_family

FAMILIES = ("gemma", "gemma2", "qwen3", "olmo2", "mixtral", "mistral", "qwen2")
_CLASSES = {
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}
POST_NORM = ("olmo2",)
QK_NORM = ("qwen3", "olmo2")


@dataclass(frozen=True)
class FamilySpec(ModelSpec):
    window: int | None = None  # sliding window (Gemma 2's sliding layers, Mistral's every layer)
    attn_softcap: float | None = None  # Gemma 2
    logit_softcap: float | None = None  # Gemma 2
    query_scale: int | None = None  # Gemma 2's query_pre_attn_scalar
    n_experts: int = 4  # Mixtral
    top_k: int = 2  # Mixtral


def build_family_model(spec: FamilySpec, n_ctx: int = 64) -> torch.nn.Module:
    """A random HF model for `spec`, norms and biases randomised."""
    note_family(spec.family)
    torch.manual_seed(spec.seed)
    config_name, model_name = _CLASSES[spec.family]
    kwargs = dict(num_hidden_layers=spec.n_layers, hidden_size=spec.d_model, num_attention_heads=spec.n_heads,
                  num_key_value_heads=spec.n_kv_heads, head_dim=spec.d_head, intermediate_size=spec.d_mlp,
                  vocab_size=VOCAB, max_position_embeddings=n_ctx, tie_word_embeddings=spec.tied,
                  bos_token_id=0, eos_token_id=1, pad_token_id=None, rms_norm_eps=1e-5)
    if spec.family in ("gemma", "gemma2", "qwen3", "olmo2"):
        kwargs["attention_bias"] = spec.bias
    if spec.family == "gemma2":
        kwargs.update(sliding_window=spec.window, attn_logit_softcapping=spec.attn_softcap,
                      final_logit_softcapping=spec.logit_softcap, query_pre_attn_scalar=spec.query_scale)
    if spec.family == "mistral":
        kwargs["sliding_window"] = spec.window
    if spec.family == "mixtral":
        kwargs.update(num_local_experts=spec.n_experts, num_experts_per_tok=spec.top_k, sliding_window=None,
                      router_jitter_noise=0.0)
    config = getattr(transformers, config_name)(**kwargs)
    model = getattr(transformers, model_name)(config)
    randomise_norms(model, torch.Generator().manual_seed(spec.seed + 1))
    randomise_biases(model, spec.seed + 2)
    if spec.family == "gemma2":  # attention scores of order 1, so the attention soft-cap bites
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(30.0)
    return model.eval()


@st.composite
def family_specs(draw, family: str) -> FamilySpec:
    n_heads = draw(st.sampled_from([1, 2, 4]))
    n_kv = draw(st.sampled_from([d for d in (1, 2, n_heads) if n_heads % d == 0]))
    d_head = draw(st.sampled_from([4, 8, 16]))
    extra = {}
    if family in ("gemma2", "mistral"):
        extra["window"] = draw(st.integers(2, 4))
    if family == "gemma2":
        extra.update(attn_softcap=draw(st.sampled_from([0.3, 1.0])), logit_softcap=draw(st.sampled_from([0.5, 2.0])),
                     query_scale=draw(st.sampled_from([d_head, 2 * d_head])))
    if family == "mixtral":
        extra["n_experts"] = draw(st.integers(2, 5))
        extra["top_k"] = draw(st.integers(1, min(2, extra["n_experts"])))
    return FamilySpec(
        family=family, n_layers=draw(st.integers(1, 3)), n_heads=n_heads, n_kv_heads=n_kv, d_head=d_head,
        d_mlp=draw(st.sampled_from([16, 40])), bias=family != "mixtral" and draw(st.booleans()),
        tied=draw(st.booleans()), seed=draw(st.integers(0, 2**16)), **extra)
