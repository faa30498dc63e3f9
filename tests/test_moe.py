"""Mixture-of-experts (Mixtral): routing hooks are live, and expert weights have TransformerLens-layout views.

Values of mlp.hook_expert_weights / hook_expert_indices against HF's router, processing and generation
are in tests/test_families_norms.py; here: an edit of the chosen experts does what the same edit inside
HF's router does, and the weight views are views of the HF parameters.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from family_models import FamilySpec, build_family_model, family_specs
from fxhook import HookedTransformer
from models import NO_SHRINK, STRATA, left_padded_batches, positions_for
from profiles import examples

BATCHES = left_padded_batches(max_len=8)


@pytest.mark.support("mixtral", "hooks")
@pytest.mark.parametrize("stratum", STRATA)  # one example per coverage stratum under the "ci" profile
@settings(max_examples=examples(1), phases=NO_SHRINK)
@given(data=st.data())
def test_editing_the_chosen_experts_matches_the_same_edit_in_hf(stratum, data):
    spec = data.draw(family_specs("mixtral", stratum), label="spec")
    tokens, mask = data.draw(BATCHES, label="batch")
    layer = data.draw(st.integers(0, spec.n_layers - 1), label="layer")
    hf = build_family_model(spec)
    model = HookedTransformer.from_pretrained_no_processing(hf_model=hf)
    n = spec.n_experts

    def next_experts(indices, hook):  # [b, p, k]: each token goes to the next experts along (still distinct)
        return (indices + 1) % n

    def hf_next_experts(_module, _args, out):
        logits, weights, indices = out
        return logits, weights, (indices + 1) % n

    keep = mask.bool()
    with torch.no_grad():
        ours = model.run_with_hooks(tokens, attention_mask=mask,
                                    fwd_hooks=[(f"blocks.{layer}.mlp.hook_expert_indices", next_experts)])
        clean = model(tokens, attention_mask=mask)
    handle = hf.model.layers[layer].mlp.gate.register_forward_hook(hf_next_experts)
    try:
        with torch.no_grad():
            ref = hf(input_ids=tokens, attention_mask=mask, position_ids=positions_for(mask)).logits
    finally:
        handle.remove()
    assert_close(ours[keep], ref[keep], atol=1e-5, rtol=0)
    assert (ours[keep] - clean[keep]).abs().max() > 1e-6  # the edit did something


def test_router_and_expert_weight_views_are_live():
    spec = FamilySpec("mixtral", 2, 4, 2, 8, 16, False, False, 7, n_experts=3, top_k=2)
    hf = build_family_model(spec)
    model = HookedTransformer.from_pretrained_no_processing(hf_model=hf)
    mlp = hf.model.layers[1].mlp
    views = model.blocks[1].mlp
    assert views.W_gate.shape == (spec.d_model, spec.n_experts)  # the router, as TransformerLens names it
    assert torch.equal(views.W_gate, mlp.gate.weight.t())
    w_in = model.live_weights()["blocks.1.mlp.experts.W_in"]
    w_gate = model.live_weights()["blocks.1.mlp.experts.W_gate"]
    w_out = model.live_weights()["blocks.1.mlp.experts.W_out"]
    assert w_in.shape == w_gate.shape == (spec.n_experts, spec.d_model, spec.d_mlp)
    assert w_out.shape == (spec.n_experts, spec.d_mlp, spec.d_model)
    x = torch.randn(5, spec.d_model)
    gate, up = torch.nn.functional.linear(x, mlp.experts.gate_up_proj[2]).chunk(2, dim=-1)
    assert_close(x @ w_gate[2], gate)
    assert_close(x @ w_in[2], up)
    with torch.no_grad():
        w_out[0].zero_()  # a view: the HF parameter changes
    assert mlp.experts.down_proj[0].abs().max() == 0
