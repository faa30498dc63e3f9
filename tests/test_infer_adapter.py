"""Adapter inference: a decoder class written here (not in transformers, not in adapters/) with the
common layout is wrapped with no adapter code and equals its own forward; unusual layouts get an
error that names what was not found and where to add an adapter.

`TinyDecoderForCausalLM` is a small HF-style model (PreTrainedModel, transformers' attention
registry and causal mask). Its config picks a style: "llama" (RMSNorm, rotary, gated SiLU MLP,
sequential blocks) or "gptj" (LayerNorm, learned positions, GELU MLP, one norm read by parallel
attention and MLP); and, for the refusals, "fused_qkv", "post_norm", "no_layer_idx" and
"swapped_gate" (the activation on the projection named up_proj).
"""
from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from fxhook import HookedTransformer
from fxhook.infer_adapter import CannotInferAdapter, InferredAdapterWarning
from models import NO_SHRINK, positions_for, token_batches
from profiles import examples

VOCAB = 97


class TinyConfig(PreTrainedConfig):
    model_type = "tiny_decoder_for_fxhook_tests"

    def __init__(self, style: str = "llama", vocab_size: int = VOCAB, hidden_size: int = 32, num_hidden_layers: int = 2,
                 num_attention_heads: int = 4, num_key_value_heads: int = 2, intermediate_size: int = 40,
                 max_position_embeddings: int = 64, rms_norm_eps: float = 1e-5, **kwargs):
        self.style, self.vocab_size, self.hidden_size = style, vocab_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads = num_key_value_heads if style != "gptj" else num_attention_heads
        self.intermediate_size, self.max_position_embeddings = intermediate_size, max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.hidden_act = "silu" if style in ("llama", "swapped_gate") else "gelu"
        self.head_dim = hidden_size // num_attention_heads
        super().__init__(**kwargs)


class TinyRMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class TinyRotary(nn.Module):
    def __init__(self, d_head: int):
        super().__init__()
        self.inv_freq = nn.Buffer(1.0 / 10000 ** (torch.arange(0, d_head, 2).float() / d_head), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [b, p] -> [b, p, d_head] x2
        angles = positions[..., None].float() * self.inv_freq
        emb = torch.cat([angles, angles], -1)
        return emb.cos(), emb.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # x [b, h, p, d]
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, None] + turned * sin[:, None]


def eager_attention(module, q, k, v, mask, scaling, dropout=0.0, **kwargs):
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    scores = q @ k.transpose(-1, -2) * scaling
    if mask is not None:
        scores = scores + mask if mask.dtype != torch.bool else scores.masked_fill(~mask, -torch.inf)
    return (scores.softmax(-1) @ v).transpose(1, 2), None


class TinyAttention(nn.Module):
    def __init__(self, config: TinyConfig, layer_idx: int):
        super().__init__()
        self.config, self.is_causal = config, True
        if config.style != "no_layer_idx":
            self.layer_idx = layer_idx
        d, dh = config.hidden_size, config.head_dim
        self.fused = config.style == "fused_qkv"
        if self.fused:
            self.qkv_proj = nn.Linear(d, 3 * d)
        else:
            self.q_proj = nn.Linear(d, config.num_attention_heads * dh)
            self.k_proj = nn.Linear(d, config.num_key_value_heads * dh)
            self.v_proj = nn.Linear(d, config.num_key_value_heads * dh)
        self.o_proj = nn.Linear(config.num_attention_heads * dh, d)

    def forward(self, x, rotary, mask, **kwargs):
        b, p, _ = x.shape
        if self.fused:
            q, k, v = self.qkv_proj(x).chunk(3, -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = (t.view(b, p, -1, self.config.head_dim).transpose(1, 2) for t in (q, k, v))
        if rotary is not None:
            q, k = rotate(q, *rotary), rotate(k, *rotary)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
        z, _ = attend(self, q, k, v, mask, scaling=self.config.head_dim ** -0.5, **kwargs)
        return self.o_proj(z.reshape(b, p, -1))


class TinyMLP(nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        d, m = config.hidden_size, config.intermediate_size
        self.gated = config.style in ("llama", "swapped_gate")
        self.swapped = config.style == "swapped_gate"  # the activation on up_proj, not gate_proj
        if self.gated:
            self.gate_proj = nn.Linear(d, m, bias=False)
        self.up_proj, self.down_proj = nn.Linear(d, m), nn.Linear(m, d)

    def forward(self, x):
        if self.swapped:
            return self.down_proj(self.gate_proj(x) * nn.functional.silu(self.up_proj(x)))
        if self.gated:
            return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(nn.functional.gelu(self.up_proj(x)))


class TinyBlock(nn.Module):
    def __init__(self, config: TinyConfig, layer_idx: int):
        super().__init__()
        self.style = config.style
        norm = (lambda: TinyRMSNorm(config.hidden_size, config.rms_norm_eps)) if config.style != "gptj" else \
            (lambda: nn.LayerNorm(config.hidden_size))
        self.attn_norm = norm()
        self.attention = TinyAttention(config, layer_idx)
        if config.style != "gptj":
            self.mlp_norm = norm()
        self.feed_forward = TinyMLP(config)

    def forward(self, x, rotary, mask, **kwargs):
        if self.style == "gptj":  # one norm, attention and MLP in parallel
            h = self.attn_norm(x)
            return x + self.attention(h, rotary, mask, **kwargs) + self.feed_forward(h)
        if self.style == "post_norm":
            x = self.attn_norm(x + self.attention(x, rotary, mask, **kwargs))
            return self.mlp_norm(x + self.feed_forward(x))
        x = x + self.attention(self.attn_norm(x), rotary, mask, **kwargs)
        return x + self.feed_forward(self.mlp_norm(x))


class TinyDecoderForCausalLM(PreTrainedModel):
    config_class = TinyConfig
    base_model_prefix = "decoder"
    _supports_attention_backend = True
    _supports_sdpa = False

    def __init__(self, config: TinyConfig):
        super().__init__(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.style == "gptj":
            self.pos_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        else:
            self.rotary = TinyRotary(config.head_dim)
        self.blocks = nn.ModuleList([TinyBlock(config, i) for i in range(config.num_hidden_layers)])
        self.out_norm = TinyRMSNorm(config.hidden_size, config.rms_norm_eps) if config.style != "gptj" else \
            nn.LayerNorm(config.hidden_size)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.tok_embeddings

    def get_output_embeddings(self):
        return self.output

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, **kwargs):
        x = self.tok_embeddings(input_ids)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
        rotary = None
        if self.config.style == "gptj":
            x = x + self.pos_embeddings(position_ids)
        else:
            rotary = self.rotary(position_ids)
        mask = create_causal_mask(config=self.config, inputs_embeds=x, attention_mask=attention_mask, cache=None,
                                  position_ids=position_ids)
        for block in self.blocks:
            x = block(x, rotary, mask)
        return CausalLMOutput(logits=self.output(self.out_norm(x)))


def tiny(style: str, seed: int, **config) -> TinyDecoderForCausalLM:
    """Random weights, norms and biases included (HF-style init would leave them 1 and 0)."""
    torch.manual_seed(seed)
    model = TinyDecoderForCausalLM(TinyConfig(style=style, **config))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@functools.lru_cache(maxsize=2)
def wrapped(style: str, seed: int) -> tuple[TinyDecoderForCausalLM, HookedTransformer]:
    hf = tiny(style, seed)
    with pytest.warns(InferredAdapterWarning, match="inferred one from its module tree.*blocks.*'blocks'"):
        model = HookedTransformer.from_pretrained_no_processing(hf_model=hf)
    return hf, model


def own_logits(hf, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=tokens, attention_mask=mask, position_ids=positions_for(mask)).logits


@pytest.mark.support("inferred", "exact")
@pytest.mark.support("inferred", "hooks")
@pytest.mark.parametrize("style", ["llama", "gptj"])
@settings(max_examples=examples(2), phases=NO_SHRINK)
@given(batch=token_batches(), seed=st.sampled_from([0, 1]))
def test_inferred_adapter_equals_the_models_own_forward(style, batch, seed):
    tokens, mask = batch
    hf, model = wrapped(style, seed)
    adapter = model.adapter
    assert (adapter.blocks, adapter.attn, adapter.mlp, adapter.final_norm, adapter.unembed) == \
        ("blocks", "attention", "feed_forward", "out_norm", "output")
    assert adapter.parallel_attn_mlp == (style == "gptj") and adapter.gated_mlp == (style == "llama")
    assert adapter.norm_kind == ("rmsnorm" if style == "llama" else "layernorm")
    keep = mask.bool()
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, attention_mask=mask)
    assert_close(logits[keep], own_logits(hf, tokens, mask)[keep], atol=1e-5, rtol=0)

    b, p = tokens.shape
    d, h, kv, dh, m = 32, 4, (2 if style == "llama" else 4), 8, 40
    per_layer = {"hook_resid_pre": (b, p, d), "hook_attn_out": (b, p, d), "hook_mlp_out": (b, p, d),
                 "hook_resid_post": (b, p, d), "ln1.hook_scale": (b, p, 1), "ln1.hook_normalized": (b, p, d),
                 "ln2.hook_scale": (b, p, 1), "ln2.hook_normalized": (b, p, d), "attn.hook_q": (b, p, h, dh),
                 "attn.hook_k": (b, p, kv, dh), "attn.hook_v": (b, p, kv, dh), "attn.hook_z": (b, p, h, dh),
                 "attn.hook_attn_scores": (b, h, p, p), "attn.hook_pattern": (b, h, p, p),
                 "mlp.hook_pre": (b, p, m), "mlp.hook_post": (b, p, m)}
    if style == "llama":
        per_layer.update({"hook_resid_mid": (b, p, d), "attn.hook_rot_q": (b, p, h, dh),
                          "attn.hook_rot_k": (b, p, kv, dh), "mlp.hook_pre_linear": (b, p, m)})
    expected = {f"blocks.{l}.{k}": s for l in range(2) for k, s in per_layer.items()}
    expected.update({"hook_embed": (b, p, d), "ln_final.hook_scale": (b, p, 1), "ln_final.hook_normalized": (b, p, d),
                     "unembed.hook_in": (b, p, d), "unembed.hook_out": (b, p, VOCAB)})
    if style == "gptj":
        expected["hook_pos_embed"] = (b, p, d)
    assert {k: tuple(v.shape) for k, v in cache.items()} == expected

    with torch.no_grad():  # hooks sit where the names say: the model's own modules reproduce them
        block = hf.blocks[1]
        resid = cache["blocks.1.hook_resid_pre"]
        q = block.attention.q_proj(block.attn_norm(resid)).view(b, p, h, dh)
        assert_close(cache["blocks.1.attn.hook_q"][keep], q[keep], atol=1e-5, rtol=0)
        attn_out = block.attention.o_proj(cache["blocks.1.attn.hook_z"].flatten(-2))
        assert_close(cache["blocks.1.hook_attn_out"], attn_out, atol=1e-5, rtol=0)
        mlp_reads = resid if style == "gptj" else cache["blocks.1.hook_resid_mid"]
        assert_close(cache["blocks.1.hook_resid_post"], mlp_reads + cache["blocks.1.hook_mlp_out"] +
                     (cache["blocks.1.hook_attn_out"] if style == "gptj" else 0), atol=1e-5, rtol=0)


@pytest.mark.support("inferred", "processing")
@pytest.mark.support("inferred", "generate")
@pytest.mark.parametrize("style", ["llama", "gptj"])
def test_inferred_adapter_processing_and_generation(style):
    """Processed log-probs equal the model's own; greedy generation with fxhook's KV cache equals a
    greedy loop over the model's own full forward."""
    hf, _ = wrapped(style, 0)
    tokens = torch.randint(2, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    with pytest.warns(InferredAdapterWarning):
        processed = HookedTransformer.from_pretrained(hf_model=hf)
    with torch.no_grad():
        assert_close(processed(tokens).log_softmax(-1), hf(input_ids=tokens).logits.log_softmax(-1), atol=1e-4, rtol=0)
    _, model = wrapped(style, 0)
    expected = tokens
    with torch.no_grad():
        for _ in range(5):
            expected = torch.cat([expected, hf(input_ids=expected).logits[:, -1:].argmax(-1)], 1)
    ours = model.generate(tokens, max_new_tokens=5, do_sample=False, stop_at_eos=False, verbose=False)
    assert ours.tolist() == expected.tolist()


@pytest.mark.parametrize("style, names", [
    ("fused_qkv", r"no block child with separate q/k/v projections.*adapters/"),
    ("post_norm", r"(reads the block input|block's output is not its input).*adapters/"),
    ("no_layer_idx", r"attention TinyAttention has no integer layer_idx.*adapters/"),
    ("swapped_gate", r"down projection does not read silu\(gate\) \* up.*adapters/"),
])
def test_unusual_layouts_get_an_error_naming_what_is_missing(style, names):
    with pytest.raises(CannotInferAdapter, match=f"no adapter for TinyDecoderForCausalLM.*{names}") as error:
        HookedTransformer.from_pretrained_no_processing(hf_model=tiny(style, 0))
    assert "Architectures with an adapter: " in str(error.value) and "LlamaForCausalLM" in str(error.value)


ADAPTER_FIELDS = ("embed", "pos_embed", "blocks", "final_norm", "unembed", "ln1", "attn", "ln2", "mlp", "norm_kind",
                  "positional", "parallel_attn_mlp", "gated_mlp", "q_site", "k_site", "mlp_pre", "mlp_pre_linear",
                  "mlp_post", "q_proj", "k_proj", "v_proj", "o_proj", "mlp_in", "mlp_gate", "mlp_out")


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gptj", "phi"])
def test_inference_finds_what_the_hand_written_adapters_say(family):
    """On HF classes of the common layout, inference (run as if they had no adapter) reproduces the
    adapters written by hand in adapters/, field by field."""
    from adapters import BY_ARCHITECTURE
    from families import MHA_ONLY
    from fxhook.infer_adapter import infer_adapter
    from models import ModelSpec, build_hf_model

    spec = ModelSpec(family, 2, 4, 4 if family in MHA_ONLY else 2, 8, 40, True, False, 5, 1)
    hf = build_hf_model(spec)
    with pytest.warns(InferredAdapterWarning):
        inferred = infer_adapter(hf)
    written = BY_ARCHITECTURE[type(hf).__name__].specialised(hf.config)
    assert {f: getattr(inferred, f) for f in ADAPTER_FIELDS} == {f: getattr(written, f) for f in ADAPTER_FIELDS}
