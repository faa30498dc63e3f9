"""The analysis calls against TransformerLens 3.9 on the same processed GPT-2 (and Llama) models:
same values to 1e-4, same labels."""
from __future__ import annotations

import logging
import warnings

import torch
from hypothesis import given, settings, strategies as st

from fxhook import HookedTransformer
from models import NO_SHRINK, ModelSpec, build_hf_model, model_specs
from tl_reference import tl_model
from profiles import examples


def _comparable(spec: ModelSpec) -> ModelSpec:
    """TransformerLens's fold_ln misreads W_in when d_mlp == d_model; its gated MLP has no biases."""
    fields = dict(spec.__dict__)
    if spec.d_mlp == spec.d_model:
        fields["d_mlp"] = spec.d_mlp + 8
    if spec.family != "gpt2":
        fields.update(family="llama", bias=False)
    return ModelSpec(**fields)


def _calls(d_model: int, n_layers: int):
    """(name, call on a cache) pairs: the analysis API with its options."""
    project = torch.randn(d_model, 3, generator=torch.Generator().manual_seed(0))
    right, wrong = torch.tensor([3, 5]), torch.tensor([4, 6])
    top = n_layers - 1
    return [
        ("accumulated_resid", lambda c: c.accumulated_resid(return_labels=True, apply_ln=True, incl_mid=True)),
        ("accumulated_resid layer", lambda c: c.accumulated_resid(top, apply_ln=True, mlp_input=True,
                                                                  pos_slice=-1, return_labels=True)),
        ("decompose_resid", lambda c: c.decompose_resid(return_labels=True, apply_ln=True, pos_slice=(1, 4))),
        ("decompose_resid mlp_input", lambda c: c.decompose_resid(top, mlp_input=True, mode="attn",
                                                                  apply_ln=True, return_labels=True)),
        ("decompose_resid mlp", lambda c: c.decompose_resid(mode="mlp", incl_embeds=False, return_labels=True)),
        ("stack_head_results", lambda c: c.stack_head_results(return_labels=True, apply_ln=True,
                                                              incl_remainder=True, pos_slice=[0, 2])),
        ("stack_neuron_results", lambda c: c.stack_neuron_results(n_layers, return_labels=True, apply_ln=True,
                                                                  incl_remainder=True, neuron_slice=(2, 9))),
        ("stack_neuron_results projected", lambda c: c.stack_neuron_results(
            n_layers, apply_ln=True, incl_remainder=True, project_output_onto=project)),
        ("get_neuron_results", lambda c: c.get_neuron_results(top, neuron_slice=[1, 4], pos_slice=-1)),
        ("full decomposition", lambda c: c.get_full_resid_decomposition(return_labels=True, apply_ln=True)),
        ("full decomposition mlp_input", lambda c: c.get_full_resid_decomposition(
            top, mlp_input=True, expand_neurons=False, apply_ln=True, pos_slice=-1, return_labels=True)),
        ("full decomposition projected", lambda c: c.get_full_resid_decomposition(
            apply_ln=True, project_output_onto=project[:, 0])),
        ("logit_attrs", lambda c: c.logit_attrs(c.get_full_resid_decomposition(pos_slice=-1), right,
                                                incorrect_tokens=wrong, pos_slice=-1)),
        ("logit_attrs one token", lambda c: c.logit_attrs(c.decompose_resid(), 7)),
        ("apply_ln_to_stack", lambda c: c.apply_ln_to_stack(c.decompose_resid(top), top)),
        ("stack_activation", lambda c: c.stack_activation("pattern")),
    ]


@settings(max_examples=examples(4), phases=NO_SHRINK)
@given(spec=model_specs(families=("gpt2", "llama")), processed=st.sampled_from([True, True, False]),
       length=st.integers(4, 8))
def test_analysis_matches_transformer_lens(spec, processed, length):
    spec = _comparable(spec)
    hf = build_hf_model(spec, tl_compatible=True)
    flags = dict(fold_ln=processed, center_writing_weights=processed and spec.family == "gpt2",
                 center_unembed=processed, fold_value_biases=processed)
    reference = tl_model(hf, **flags)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = HookedTransformer.from_pretrained_no_processing(hf_model=hf, **flags)
    tokens = torch.randint(2, 90, (2, length), generator=torch.Generator().manual_seed(spec.seed))
    with torch.no_grad():
        _, theirs = reference.run_with_cache(tokens)
        _, mine = ours.run_with_cache(tokens)
    logging.disable(logging.WARNING)  # TransformerLens logs when head results are already cached
    try:
        for name, call in _calls(spec.d_model, spec.n_layers):
            expected, got = call(theirs), call(mine)
            if isinstance(expected, tuple):
                assert got[1] == expected[1], name
                expected, got = expected[0], got[0]
            assert got.shape == expected.shape, name
            assert torch.allclose(got, expected, atol=1e-4), (name, (got - expected).abs().max())
    finally:
        logging.disable(logging.NOTSET)
