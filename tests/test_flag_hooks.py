"""The flag-gated hooks: use_attn_result, use_split_qkv_input, use_attn_in, use_hook_mlp_in,
ungroup_grouped_query_attention. Each flag adds hooks without changing the model's function,
and each new hook means what TransformerLens says it means."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fxhook import HookedTransformer
from models import ModelSpec, build_hf_model, model_specs
from profiles import examples

FLAGS = ("use_attn_result", "use_split_qkv_input", "use_attn_in", "use_hook_mlp_in",
         "ungroup_grouped_query_attention")


def _model(spec):
    return HookedTransformer.from_pretrained_no_processing(hf_model=build_hf_model(spec))


def _tokens(seed: int, batch: int = 2, length: int = 6) -> torch.Tensor:
    return torch.randint(2, 90, (batch, length), generator=torch.Generator().manual_seed(seed))


def _set(model, **flags) -> None:
    for name in FLAGS:
        setattr(model.cfg, name, flags.get(name, False))


@settings(max_examples=examples(4))
@given(spec=model_specs(), flags=st.sets(st.sampled_from(FLAGS), min_size=1))
def test_flags_keep_the_logits(spec, flags):
    model = _model(spec)
    tokens = _tokens(spec.seed)
    with torch.no_grad():
        reference = model(tokens)
        if "use_attn_in" in flags and spec.n_kv_heads != spec.n_heads and \
                not {"use_split_qkv_input", "ungroup_grouped_query_attention"} & flags:
            _set(model, **{f: True for f in flags})
            with pytest.raises(NotImplementedError, match="grouped-query"):
                model(tokens)
            return
        _set(model, **{f: True for f in flags})
        assert torch.allclose(model(tokens), reference, atol=1e-5)


@settings(max_examples=examples(3))
@given(spec=model_specs())
def test_attn_result_sums_to_attn_out_and_edits_one_head(spec):
    model = _model(spec)
    tokens = _tokens(spec.seed)
    model.set_use_attn_result(True)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        for layer in range(spec.n_layers):
            result = cache["result", layer]
            assert result.shape == (*tokens.shape, spec.n_heads, spec.d_model)
            b_o = cache["attn_out", layer] - result.sum(2)  # the output bias, same at every position
            assert torch.allclose(b_o, b_o[:1, :1].expand_as(b_o), atol=1e-5)
        head = spec.seed % spec.n_heads

        def zero_head(x, hook):
            x = x.clone()
            x[:, :, head] = 0
            return x
        via_result = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_result", zero_head)])
        via_z = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", zero_head)])
    assert torch.allclose(via_result, via_z, atol=1e-5)


@settings(max_examples=examples(3))
@given(spec=model_specs())
def test_split_qkv_input_gives_each_head_its_own_input(spec):
    model = _model(spec)
    tokens = _tokens(spec.seed)
    model.set_use_split_qkv_input(True)
    head = spec.seed % spec.n_kv_heads
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        resid = cache["resid_pre", 0]
        for name, heads in (("q_input", spec.n_heads), ("k_input", spec.n_kv_heads), ("v_input", spec.n_kv_heads)):
            value = cache[name, 0]
            assert value.shape == (*tokens.shape, heads, spec.d_model)
            assert torch.equal(value, resid[:, :, None].expand_as(value))

        def perturb(x, hook):
            x = x.clone()
            x[:, :, head] += 0.5 * torch.randn_like(x[:, :, head])
            return x
        with model.hooks([("blocks.0.hook_k_input", perturb)]):
            _, edited = model.run_with_cache(tokens)
    change = (edited["k", 0] - cache["k", 0]).abs().amax(dim=(0, 1, 3))
    assert change[head] > 0
    assert torch.all(change[torch.arange(spec.n_kv_heads) != head] == 0)
    assert torch.equal(edited["q", 0], cache["q", 0])


@settings(max_examples=examples(3))
@given(spec=model_specs(families=("llama", "mistral", "qwen2")))
def test_ungrouped_keys_repeat_the_grouped_ones(spec):
    model = _model(spec)
    tokens = _tokens(spec.seed)
    with torch.no_grad():
        _, grouped = model.run_with_cache(tokens)
        model.set_ungroup_grouped_query_attention(True)
        _, ungrouped = model.run_with_cache(tokens)
    n_rep = spec.n_heads // spec.n_kv_heads
    for name in ("k", "v", "rot_k"):
        value = ungrouped[name, 0]
        assert value.shape == (*tokens.shape, spec.n_heads, spec.d_head)
        assert torch.allclose(value, grouped[name, 0].repeat_interleave(n_rep, dim=2), atol=1e-6)


def test_mlp_in_exists_only_with_its_flag_and_feeds_only_the_mlp():
    spec = ModelSpec("llama", 2, 4, 2, 8, 40, True, False, 5)
    model = _model(spec)
    tokens = _tokens(1)
    assert "blocks.0.hook_mlp_in" not in model.hook_dict
    model.set_use_hook_mlp_in(True)
    assert "blocks.0.hook_mlp_in" in model.hook_dict
    with torch.no_grad():
        _, clean = model.run_with_cache(tokens)
        assert torch.equal(clean["mlp_in", 0], clean["resid_mid", 0])
        with model.hooks([("blocks.0.hook_mlp_in", lambda x, hook: 2 * x)]):
            _, edited = model.run_with_cache(tokens)
    assert not torch.allclose(edited["mlp_out", 0], clean["mlp_out", 0])
    # the residual stream itself is not edited: resid_post = resid_mid + mlp_out
    assert torch.equal(edited["resid_mid", 0], clean["resid_mid", 0])
    assert torch.allclose(edited["resid_post", 0], clean["resid_mid", 0] + edited["mlp_out", 0], atol=1e-6)
