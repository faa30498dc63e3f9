"""Small random HF models for tests: GPT-2 and Llama-family configs as hypothesis strategies.

Norm weights and biases are randomised (HF initialises them to 1 and 0, which
hides folding and hook-placement bugs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import Phase, settings, strategies as st
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


# Attention q/k/v biases of the families whose HF config cannot switch them (spec.bias takes effect in
# Llama, GPT-NeoX and OPT): always (True) or never (False), and their specs say so.
FIXED_BIAS = {"gpt2": True, "mistral": False, "qwen2": True, "gptj": False, "phi": True}

# Coverage strata: every family property runs once per stratum (tests/test_coverage.py checks what they
# cover). "A" and "B" fix what the CI examples must cover (2+ layers, GQA and MQA, biases on and off,
# tied and untied, the family's options at non-default values) and draw the rest; "free" draws
# everything (1 layer, MHA, ...) and runs under the thorough profile only, where examples abound.
_THOROUGH = settings.default.max_examples > settings.get_profile("ci").max_examples
STRATA = ("A", "B", "free") if _THOROUGH else ("A", "B")


def stratum_fields(family: str, stratum: str) -> dict:
    """The fields a stratum fixes for `family`: A is 2 layers of GQA (4 query heads on 2 kv heads), biased and
    tied; B is 2 layers of MQA (2 heads on 1), unbiased and untied; the variant picks (tests/families.py)
    a sequential NeoX block with half-rotary (A) and a parallel one with quarter-rotary (B)."""
    gqa = family not in ("gpt2", *MHA_ONLY)  # the others have num_key_value_heads
    fields = {"A": dict(n_layers=2, n_heads=4, n_kv_heads=2 if gqa else 4, bias=True, tied=True, variant=1),
              "B": dict(n_layers=2, n_heads=2, n_kv_heads=1 if gqa else 2, bias=False, tied=False, variant=2)}[stratum]
    if family in FIXED_BIAS:
        fields["bias"] = FIXED_BIAS[family]
    return fields


@st.composite
def model_specs(draw, families=("gpt2", "llama", "mistral", "qwen2"), stratum: str = "free") -> ModelSpec:
    """A random spec of one of `families`; in stratum "A" or "B" (stratum_fields) with those fields fixed."""
    family = draw(st.sampled_from(families))
    note_family(family)
    if stratum != "free":
        fixed = stratum_fields(family, stratum)
        d_head = draw(st.sampled_from([4, 8] if fixed["n_heads"] == 4 else [8, 16]))  # d_model 16 or 32
        return ModelSpec(family=family, d_head=d_head, d_mlp=draw(st.sampled_from([16, 40])),
                         seed=draw(st.integers(0, 2**16)), **fixed)
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
        bias=FIXED_BIAS.get(family, draw(st.booleans())),
        tied=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
        variant=draw(st.integers(0, 5)) if family in FAMILY_BUILDERS else 0,
    )


def stratum_example(family: str, stratum: str, seed: int = 0) -> ModelSpec:
    """A concrete spec of the stratum (for explicit hypothesis @examples)."""
    fixed = stratum_fields(family, stratum)
    return ModelSpec(family=family, d_head=8, d_mlp=40 if stratum == "A" else 16, seed=seed, **fixed)


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


@st.composite
def left_padded_batches(draw, max_batch: int = 3, max_len: int = 10):
    """(tokens [b, p], attention_mask [b, p]) of 2+ rows and 6+ positions: row 0 unpadded, every other row
    left-padded by 1 to p - 2 (so even the smallest draw has padding, and a sequence longer than 5)."""
    batch = draw(st.integers(2, max_batch))
    length = draw(st.integers(6, max_len))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    tokens = torch.randint(2, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(tokens)
    for row in range(1, batch):
        pad = draw(st.integers(1, length - 2))
        mask[row, :pad] = 0
        tokens[row, :pad] = 1
    return tokens, mask


def left_padded_example(seed: int = 0, batch: int = 2, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """A concrete left-padded batch (for explicit hypothesis @examples): row 0 full, the others padded by 3."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(tokens)
    mask[1:, :3] = 0
    tokens[1:, :3] = 1
    return tokens, mask


def positions_for(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)
