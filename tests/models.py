"""Small random HF models for tests: GPT-2 and Llama-family configs as hypothesis strategies.

Norm weights and biases are randomised (HF initialises them to 1 and 0, which
hides folding and hook-placement bugs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import Phase, strategies as st
from families import FAMILY_BUILDERS, MHA_ONLY
from support import note_family
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, \
    MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 97


@dataclass(frozen=True)
class ModelSpec:
    family: str  # "gpt2" | "llama" | "mistral" | "qwen2"
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    bias: bool
    tied: bool
    seed: int
    variant: int = 0  # family-specific options (tests/families.py: parallel or not, rotary fraction)

    @property
    def d_model(self) -> int:
        return self.n_heads * self.d_head


def randomise_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    for name, module in model.named_modules():
        if "norm" in type(module).__name__.lower():
            with torch.no_grad():
                w = getattr(module, "weight", None)
                if w is not None:
                    w.copy_(1.0 + 0.3 * torch.randn(w.shape, generator=generator))
                b = getattr(module, "bias", None)
                if b is not None:
                    b.copy_(0.2 * torch.randn(b.shape, generator=generator))


def randomise_biases(model: torch.nn.Module, seed: int, keep_zero: tuple[str, ...] = ()) -> None:
    """HF initialises linear biases to 0, which hides bias bugs: make them random
    (except in modules whose name ends with one of `keep_zero`)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if "norm" in type(module).__name__.lower():
                continue  # randomise_norms covers norms
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.nn.Parameter):
                if name.endswith(keep_zero) and keep_zero:
                    bias.zero_()
                else:
                    bias.copy_(0.1 * torch.randn(bias.shape, generator=g))


# Each new config costs a ~1.5 s capture, and shrinking a failure re-captures hundreds of models
# (over 5 minutes per failing property on 2 cores): properties over model configs report their
# failing example unshrunk (it is printed in full and small anyway).
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)


def build_hf_model(spec: ModelSpec, n_ctx: int = 64, tl_compatible: bool = False) -> torch.nn.Module:
    """A random HF model for `spec`, norms and biases randomised.

    tl_compatible: keep gate/up MLP biases zero (TransformerLens's gated MLP cannot represent them).
    """
    note_family(spec.family)
    torch.manual_seed(spec.seed)
    if spec.family in FAMILY_BUILDERS:
        model = FAMILY_BUILDERS[spec.family](spec, n_ctx, VOCAB)
    elif spec.family == "gpt2":
        config = GPT2Config(n_layer=spec.n_layers, n_embd=spec.d_model, n_head=spec.n_heads,
                            n_inner=spec.d_mlp, vocab_size=VOCAB, n_positions=n_ctx,
                            tie_word_embeddings=spec.tied, bos_token_id=0, eos_token_id=0,
                            activation_function="gelu_new")
        model = GPT2LMHeadModel(config)
    else:
        cls_config, cls_model = {"llama": (LlamaConfig, LlamaForCausalLM),
                                 "mistral": (MistralConfig, MistralForCausalLM),
                                 "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[spec.family]
        kwargs = dict(num_hidden_layers=spec.n_layers, hidden_size=spec.d_model,
                      num_attention_heads=spec.n_heads, num_key_value_heads=spec.n_kv_heads,
                      head_dim=spec.d_head, intermediate_size=spec.d_mlp, vocab_size=VOCAB,
                      max_position_embeddings=n_ctx, tie_word_embeddings=spec.tied,
                      bos_token_id=0, eos_token_id=1, pad_token_id=None, rms_norm_eps=1e-5)
        if spec.family == "llama":
            kwargs.update(attention_bias=spec.bias, mlp_bias=spec.bias)
        config = cls_config(**kwargs)
        model = cls_model(config)
    randomise_norms(model, torch.Generator().manual_seed(spec.seed + 1))
    randomise_biases(model, spec.seed + 2, keep_zero=("gate_proj", "up_proj") if tl_compatible else ())
    return model.eval()


@st.composite
def model_specs(draw, families=("gpt2", "llama", "mistral", "qwen2")) -> ModelSpec:
    family = draw(st.sampled_from(families))
    note_family(family)
    n_heads = draw(st.sampled_from([1, 2, 4, 6]))
    if family in ("gpt2", *MHA_ONLY):
        n_kv = n_heads
    else:  # MHA, GQA and MQA
        n_kv = draw(st.sampled_from([d for d in (1, 2, 3, n_heads) if n_heads % d == 0]))
    d_head = draw(st.sampled_from([4, 8, 16]))
    return ModelSpec(
        family=family,
        n_layers=draw(st.integers(1, 4)),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        d_head=d_head,
        d_mlp=draw(st.sampled_from([16, 40, 64])),
        bias=draw(st.booleans()),
        tied=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
        variant=draw(st.integers(0, 5)) if family in FAMILY_BUILDERS else 0,
    )


@st.composite
def token_batches(draw, max_batch: int = 3, max_len: int = 12, allow_left_padding: bool = True):
    """(tokens [b, p], attention_mask [b, p]) with optional left padding."""
    batch = draw(st.integers(1, max_batch))
    length = draw(st.integers(2, max_len))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(tokens)
    if allow_left_padding:
        for row in range(batch):
            pad = draw(st.integers(0, length - 1))
            mask[row, :pad] = 0
            tokens[row, :pad] = 1
    return tokens, mask


def positions_for(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)
