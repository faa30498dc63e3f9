"""Weight processing (fold_ln, center_writing_weights, center_unembed, fold_value_biases):
each flag alone and all together keep the HF model's log-probabilities, and each leaves
the weights in the canonical form it promises."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fxhook import HookedTransformer
from models import build_hf_model, model_specs, positions_for, token_batches
from profiles import examples

FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")


def _processed(hf, **flags):
    model = HookedTransformer.from_pretrained_no_processing(hf_model=copy.deepcopy(hf))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # center_writing_weights on RMS models warns and skips
        model.process_weights_(**{f: flags.get(f, False) for f in FLAGS})
    return model


@pytest.mark.support("*", "processing")
@settings(max_examples=examples(5))
@given(spec=model_specs(), batch=token_batches(), chosen=st.sampled_from(
    [(f,) for f in FLAGS] + [FLAGS, ("fold_ln", "center_writing_weights", "fold_value_biases")]))
def test_processing_keeps_log_probs(spec, batch, chosen):
    tokens, mask = batch
    hf = build_hf_model(spec)
    model = _processed(hf, **{f: True for f in chosen})
    with torch.no_grad():
        ref = hf(input_ids=tokens, attention_mask=mask, position_ids=positions_for(mask)).logits
        out = model(tokens, attention_mask=mask)
    keep = mask.bool()
    assert torch.allclose(out.log_softmax(-1)[keep], ref.log_softmax(-1)[keep], atol=1e-4)
    if "center_unembed" not in chosen:
        assert torch.allclose(out[keep], ref[keep], atol=1e-4)


@settings(max_examples=examples(4))
@given(spec=model_specs(families=("gpt2",)))
def test_folded_layer_norm_hooks_see_the_pure_normalised_input(spec):
    model = _processed(build_hf_model(spec), fold_ln=True)
    tokens = torch.randint(2, 90, (2, 7), generator=torch.Generator().manual_seed(spec.seed))
    _, cache = model.run_with_cache(tokens)
    last = spec.n_layers - 1
    norms = [(f"blocks.{l}.ln1.", f"blocks.{l}.hook_resid_pre") for l in range(spec.n_layers)] + \
        [(f"blocks.{l}.ln2.", f"blocks.{l}.hook_resid_mid") for l in range(spec.n_layers)] + \
        [("ln_final.", f"blocks.{last}.hook_resid_post")]
    for prefix, source in norms:
        centred = cache[source] - cache[source].mean(-1, keepdim=True)
        assert torch.allclose(cache[prefix + "hook_normalized"], centred / cache[prefix + "hook_scale"],
                              atol=1e-5), prefix
        assert torch.allclose(cache[prefix + "hook_normalized"].mean(-1), torch.zeros(()), atol=1e-5)
    assert model.cfg.normalization_type == "LNPre"


@pytest.mark.support("*", "processing")
@settings(max_examples=examples(4))
@given(spec=model_specs())
def test_canonical_forms(spec):
    hf = build_hf_model(spec)
    model = _processed(hf, **{f: True for f in FLAGS})
    from fxhook.processing.weight_dict import live_weights

    w = live_weights(model.hf_model, model.adapter, model.cfg)
    if spec.family == "gpt2":  # writing weights are centred only where a LayerNorm reads them
        for key in ["embed.W_E", "pos_embed.W_pos"] + [f"blocks.{l}.{k}" for l in range(spec.n_layers)
                                                       for k in ("attn.W_O", "attn.b_O", "mlp.W_out", "mlp.b_out")]:
            assert torch.allclose(w[key].mean(-1), torch.zeros(()), atol=1e-5), key
    assert torch.allclose(w["unembed.W_U"].mean(-1), torch.zeros(()), atol=1e-5)
    for layer in range(spec.n_layers):
        if f"blocks.{layer}.attn.b_V" in w:
            assert torch.all(w[f"blocks.{layer}.attn.b_V"] == 0)
    # the original HF model was not touched
    assert not torch.equal(hf.get_submodule(model.adapter.unembed).weight.t(), w["unembed.W_U"])


@settings(max_examples=examples(3))
@given(spec=model_specs())
def test_processing_twice_is_harmless(spec):
    hf = build_hf_model(spec)
    once = _processed(hf, **{f: True for f in FLAGS})
    twice = _processed(hf, **{f: True for f in FLAGS})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twice.process_weights_()
    tokens = torch.randint(2, 90, (2, 6), generator=torch.Generator().manual_seed(spec.seed))
    with torch.no_grad():
        assert torch.allclose(once(tokens), twice(tokens), atol=1e-5)


def test_center_writing_weights_does_not_apply_to_rms_models():
    """An RMSNorm does not remove the mean, so centring what writes to it would change the model."""
    from models import ModelSpec

    hf = build_hf_model(ModelSpec("llama", 1, 2, 2, 8, 16, True, False, 0))
    model = HookedTransformer.from_pretrained_no_processing(hf_model=copy.deepcopy(hf))
    before = {k: v.clone() for k, v in model.live_weights().items()}
    model.process_weights_(fold_ln=False, center_writing_weights=True, center_unembed=False,
                           fold_value_biases=False)
    assert all(torch.equal(v, before[k]) for k, v in model.live_weights().items())


@settings(max_examples=examples(3))
@given(spec=model_specs(families=("gpt2",)), batch=token_batches())
def test_refactored_attention_keeps_log_probs_and_makes_w_o_an_isometry(spec, batch):
    tokens, mask = batch
    hf = build_hf_model(spec)
    model = HookedTransformer.from_pretrained_no_processing(hf_model=copy.deepcopy(hf))
    model.process_weights_(refactor_factored_attn_matrices=True)
    with torch.no_grad():
        ref = hf(input_ids=tokens, attention_mask=mask, position_ids=positions_for(mask)).logits
        out = model(tokens, attention_mask=mask)
    keep = mask.bool()
    assert torch.allclose(out.log_softmax(-1)[keep], ref.log_softmax(-1)[keep], atol=1e-4)
    w_o = model.W_O  # [L, H, d_head, d_model]: orthonormal rows
    eye = torch.eye(spec.d_head).expand(spec.n_layers, spec.n_heads, -1, -1)
    assert torch.allclose(w_o @ w_o.transpose(-1, -2), eye, atol=1e-4)
    # columns of [W_Q; b_Q] and [W_K; b_K] (the bias as an always-1 input) pair up with equal norms
    q_eff = torch.cat([model.W_Q, model.b_Q[:, :, None]], dim=-2)
    k_eff = torch.cat([model.W_K, model.b_K[:, :, None]], dim=-2)
    assert torch.allclose(q_eff.norm(dim=-2), k_eff.norm(dim=-2), atol=1e-5)


def test_refactoring_refuses_rotary_models():
    from models import ModelSpec

    model = HookedTransformer.from_pretrained_no_processing(
        hf_model=build_hf_model(ModelSpec("llama", 1, 2, 2, 8, 16, False, False, 0)))
    with pytest.raises(ValueError, match="rotary"):
        model.process_weights_(refactor_factored_attn_matrices=True)


def test_center_unembed_is_refused_with_a_warning_when_logits_are_soft_capped():
    """Gemma 2 style final-logit soft-capping: centring W_U would change the log-probabilities."""
    from models import ModelSpec

    hf = build_hf_model(ModelSpec("llama", 1, 2, 2, 8, 16, False, False, 0))
    hf.config.final_logit_softcapping = 30.0  # what the processing pass reads (adapters set it per family)
    model = HookedTransformer.from_pretrained_no_processing(hf_model=hf)
    before = model.W_U.clone()
    with pytest.warns(UserWarning, match="soft-caps"):
        model.process_weights_(fold_ln=False, center_writing_weights=False, center_unembed=True,
                               fold_value_biases=False)
    assert torch.equal(model.W_U, before)
