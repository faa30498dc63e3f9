"""ActivationCache analysis on random GPT-2 and Llama-family models: every decomposition adds up
to the activation it decomposes, and apply_ln / logit_attrs reproduce what the model computes."""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fxhook import HookedTransformer
from models import NO_SHRINK, VOCAB, build_hf_model, model_specs
from profiles import examples

ATOL = 1e-4


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> bool:
    assert a.shape == b.shape, (a.shape, b.shape)
    return bool(torch.allclose(a, b, atol=atol, rtol=1e-4))


def load(spec, processed: bool) -> HookedTransformer:
    hf = build_hf_model(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if processed:
            return HookedTransformer.from_pretrained(hf_model=hf)
        return HookedTransformer.from_pretrained_no_processing(hf_model=hf)


def run(model, batch: int, length: int, seed: int):
    tokens = torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    return tokens, logits, cache


@settings(max_examples=examples(5), phases=NO_SHRINK)
@given(spec=model_specs(), processed=st.booleans(), batch=st.integers(1, 2), length=st.integers(2, 8))
def test_decompositions_add_up(spec, processed, batch, length):
    model = load(spec, processed)
    cfg = model.cfg
    _, logits, cache = run(model, batch, length, spec.seed)
    last_post = cache["resid_post", cfg.n_layers - 1]

    # decompose_resid: embeddings plus every block's outputs is the final residual stream
    parts, labels = cache.decompose_resid(return_labels=True)
    assert labels[0] == "embed" and labels[-1] == f"{cfg.n_layers - 1}_mlp_out"
    assert ("pos_embed" in labels) == (spec.family == "gpt2")
    assert close(parts.sum(0), last_post)
    for layer in range(cfg.n_layers):
        assert close(cache.decompose_resid(layer).sum(0), cache["resid_pre", layer])
        assert close(cache.decompose_resid(layer, mlp_input=True).sum(0), cache["resid_mid", layer])

    # heads: each layer's head results plus b_O is hook_attn_out
    heads, head_labels = cache.stack_head_results(return_labels=True)
    assert head_labels == [f"L{l}H{h}" for l in range(cfg.n_layers) for h in range(cfg.n_heads)]
    assert heads.shape == (cfg.n_layers * cfg.n_heads, batch, length, cfg.d_model)
    per_layer = heads.reshape(cfg.n_layers, cfg.n_heads, batch, length, cfg.d_model).sum(1)
    for layer in range(cfg.n_layers):
        assert close(per_layer[layer] + model.blocks[layer].attn.b_O, cache["attn_out", layer])

    # neurons: each layer's neuron results plus b_out is hook_mlp_out
    neurons = cache.stack_neuron_results(cfg.n_layers)
    per_layer = neurons.reshape(cfg.n_layers, cfg.d_mlp, batch, length, cfg.d_model).sum(1)
    for layer in range(cfg.n_layers):
        assert close(per_layer[layer] + model.blocks[layer].mlp.b_out, cache["mlp_out", layer])

    # remainders, full decompositions (with and without neurons, into the MLP of a block)
    assert close(cache.stack_head_results(incl_remainder=True).sum(0), last_post)
    assert close(cache.stack_neuron_results(cfg.n_layers, incl_remainder=True).sum(0), last_post)
    full, full_labels = cache.get_full_resid_decomposition(return_labels=True)
    assert len(full_labels) == full.shape[0] and full_labels[-1] == "bias"
    assert close(full.sum(0), last_post)
    assert close(cache.get_full_resid_decomposition(expand_neurons=False).sum(0), last_post)
    top = cfg.n_layers - 1
    assert close(cache.get_full_resid_decomposition(top, mlp_input=True).sum(0), cache["resid_mid", top])

    # accumulated_resid: the streams entering each block, then the final one
    acc, acc_labels = cache.accumulated_resid(return_labels=True, incl_mid=True)
    assert acc_labels[-1] == "final_post" and acc_labels[:2] == ["0_pre", "0_mid"]
    assert close(acc[-1], last_post) and close(acc[0], cache["resid_pre", 0])

    # apply_ln with the cached scales: the parts add up to what the norm hands on
    assert close(cache.decompose_resid(apply_ln=True).sum(0), cache["ln_final.hook_normalized"])
    assert close(cache.decompose_resid(top, apply_ln=True).sum(0), cache[f"blocks.{top}.ln1.hook_normalized"])
    assert close(cache.decompose_resid(top, mlp_input=True, apply_ln=True).sum(0),
                 cache[f"blocks.{top}.ln2.hook_normalized"])
    # the logit lens at the final layer is the model's own logits (the final norm recomputed)
    lens = cache.accumulated_resid(apply_ln=True)[-1] @ model.W_U + model.b_U
    assert close(lens, logits, atol=1e-3)


@settings(max_examples=examples(4), phases=NO_SHRINK)
@given(spec=model_specs(families=("gpt2", "llama")), length=st.integers(2, 8))
def test_logit_attributions_sum_to_the_logit_difference(spec, length):
    """Processed (fold_ln): the direct logit attributions of a full decomposition, through the
    final norm's cached scale, add up to the logit difference (less b_U's)."""
    model = load(spec, processed=True)
    tokens, logits, cache = run(model, 2, length, spec.seed)
    right, wrong = torch.tensor([3, 5]), torch.tensor([4, 4])
    expected = logits[torch.arange(2), -1, right] - logits[torch.arange(2), -1, wrong] \
        - (model.b_U[right] - model.b_U[wrong])
    for expand in (True, False):
        stack = cache.get_full_resid_decomposition(pos_slice=-1, expand_neurons=expand)
        attrs = cache.logit_attrs(stack, tokens=right, incorrect_tokens=wrong, pos_slice=-1)
        assert attrs.shape == (stack.shape[0], 2)
        assert close(attrs.sum(0), expected, atol=1e-3)
        # the same through apply_ln in the decomposition itself
        normed = cache.get_full_resid_decomposition(pos_slice=-1, expand_neurons=expand, apply_ln=True)
        direction = model.W_U[:, right] - model.W_U[:, wrong]  # [d_model, batch]
        assert close((normed.sum(0) * direction.T).sum(-1), expected, atol=1e-3)
    # projected decompositions equal the projection of the full ones
    project = model.W_U[:, 3]
    projected = cache.get_full_resid_decomposition(apply_ln=True, project_output_onto=project)
    assert close(projected, cache.get_full_resid_decomposition(apply_ln=True) @ project, atol=1e-3)


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    from models import ModelSpec

    model = load(ModelSpec("gpt2", 2, 2, 2, 4, 16, True, False, 1), processed=True)
    return model, run(model, 1, 5, 0)[2]


def test_slices_and_batch_axis(small):
    model, cache = small
    full = cache.accumulated_resid()
    assert close(cache.accumulated_resid(pos_slice=-1), full[:, :, -1])
    assert close(cache.accumulated_resid(pos_slice=(1, 4)), full[:, :, 1:4])
    assert close(cache.accumulated_resid(pos_slice=[0, 2]), full[:, :, [0, 2]])
    assert close(cache.stack_neuron_results(2, neuron_slice=3), cache.stack_neuron_results(2)[[3, 19]])
    without_batch = cache.apply_slice_to_batch_dim(0)
    assert not without_batch.has_batch_dim
    assert close(without_batch.decompose_resid(apply_ln=True, pos_slice=-1),
                 cache.decompose_resid(apply_ln=True, pos_slice=-1)[:, 0])
    assert close(cache.stack_activation("pattern"), torch.stack([cache["pattern", 0], cache["pattern", 1]]))


def test_errors_say_what_to_do(small):
    model, cache = small
    with pytest.raises(ValueError, match="layer must be in"):
        cache.decompose_resid(layer=7)
    with pytest.raises(ValueError, match="mode must be"):
        cache.decompose_resid(mode="heads")
    with pytest.raises(ValueError, match="same shape"):
        cache.logit_attrs(cache.decompose_resid(), tokens=torch.tensor([1, 2]), incorrect_tokens=3)
    with pytest.raises(TypeError, match="cannot slice"):
        cache.accumulated_resid(pos_slice="last")
    with torch.no_grad():
        _, partial = model.run_with_cache(torch.tensor([[2, 3, 4]]), names_filter=lambda n: "scale" not in n)
    with pytest.raises(KeyError, match="names_filter"):
        partial.decompose_resid(apply_ln=True)
    with pytest.warns(UserWarning, match="already holds"):
        cache.compute_head_results()
        cache.compute_head_results()
