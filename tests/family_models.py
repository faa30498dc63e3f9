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

from models import VOCAB, ModelSpec, build_hf_model, model_specs, randomise_biases, randomise_norms, \
    stratum_fields
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


# Attention biases of the families whose HF config cannot switch them (spec.bias takes effect in Gemma,
# Gemma 2, Qwen3 and OLMo 2): always (Qwen2's q/k/v) or never (Mistral, Mixtral), and their specs say so.
FIXED_BIAS = {"mistral": False, "qwen2": True, "mixtral": False}


def _specials(family: str, stratum: str, d_head: int) -> dict:
    """The family's own options in a coverage stratum, all away from their defaults: windows shorter than
    the batches (6+ positions), both soft-caps on, Gemma 2's query scale off d_head (2x in A, 1/2 in B),
    Mixtral routing each token to 2 of 4 (A) or 3 (B) experts."""
    a = stratum == "A"
    if family == "gemma2":
        return dict(window=3 if a else 2, attn_softcap=1.0 if a else 0.3, logit_softcap=2.0 if a else 0.5,
                    query_scale=2 * d_head if a else d_head // 2)
    if family == "mistral":
        return dict(window=3 if a else 2)
    if family == "mixtral":
        return dict(n_experts=4 if a else 3, top_k=2)
    return {}


@st.composite
def family_specs(draw, family: str, stratum: str = "free") -> FamilySpec:
    """A random spec of `family`; in stratum "A" or "B" (models.stratum_fields plus _specials) with the
    coverage fields fixed and the rest drawn."""
    if stratum != "free":
        fixed = stratum_fields(family, stratum)
        fixed.pop("variant")
        if family in FIXED_BIAS:
            fixed["bias"] = FIXED_BIAS[family]
        d_head = draw(st.sampled_from([4, 8] if fixed["n_heads"] == 4 else [8, 16]))  # d_model 16 or 32
        return FamilySpec(family=family, d_head=d_head, d_mlp=draw(st.sampled_from([16, 40])),
                          seed=draw(st.integers(0, 2**16)), **fixed, **_specials(family, stratum, d_head))
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
        d_mlp=draw(st.sampled_from([16, 40])), bias=FIXED_BIAS.get(family, draw(st.booleans())),
        tied=draw(st.booleans()), seed=draw(st.integers(0, 2**16)), **extra)



# the families `models.model_specs` does not draw by default (it draws gpt2, llama, mistral, qwen2)
OTHER_FAMILIES = ("gpt_neox", "gptj", "opt", "phi", "gemma", "gemma2", "qwen3", "olmo2", "mixtral")


def specs_of(family: str) -> st.SearchStrategy:
    """Random specs of any family: `family_specs` for this module's families, `model_specs` for the others."""
    return family_specs(family) if family in FAMILIES else model_specs(families=(family,))


def build_any_model(spec: ModelSpec) -> torch.nn.Module:
    """The random HF model of a spec from `specs_of`."""
    return build_family_model(spec) if isinstance(spec, FamilySpec) else build_hf_model(spec)
