"""Processed fxhook models against TransformerLens 3.9's processed HookedTransformer:
the same weights in TransformerLens layout and the same activations at every shared hook."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fxhook import HookedTransformer
from models import ModelSpec, build_hf_model, model_specs
from tl_reference import tl_model
from profiles import examples

FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")
WEIGHTS = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in", "W_out", "b_in", "b_out",
           "W_E", "W_U", "b_U")


def _tl_comparable(spec: ModelSpec) -> ModelSpec:
    """Configs TransformerLens 3.9 processes correctly.

    Its gated MLP has no gate bias, so Llama-family references carry no MLP biases; and its
    fold_ln picks the d_model axis of W_in by shape, folding along the wrong axis when
    d_mlp == d_model (fxhook's log-probs still equal HF's there: test_processing covers it).
    """
    fields = dict(spec.__dict__)
    if spec.d_mlp == spec.d_model:
        fields["d_mlp"] = spec.d_mlp + 8
    if spec.family != "gpt2":
        fields.update(family="llama", bias=False)
    return ModelSpec(**fields)


@pytest.mark.support("*", "processing")
@settings(max_examples=examples(5))
@given(spec=model_specs(families=("gpt2", "llama")),
       flags=st.sampled_from([dict.fromkeys(FLAGS, True), {"fold_ln": True}, {"fold_value_biases": True},
                              {"fold_ln": True, "center_writing_weights": True}]))
def test_processed_model_matches_transformer_lens(spec, flags):
    spec = _tl_comparable(spec)
    hf = build_hf_model(spec)
    flags = {f: flags.get(f, False) for f in FLAGS}
    if spec.family != "gpt2":
        flags["center_writing_weights"] = False  # neither library centres for RMSNorm
    reference = tl_model(hf, **flags)
    ours = HookedTransformer.from_pretrained_no_processing(hf_model=copy.deepcopy(hf))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.process_weights_(**flags)

    for name in WEIGHTS:
        theirs = getattr(reference, name)
        mine = getattr(ours, name)
        assert mine.shape == theirs.shape, name
        assert torch.allclose(mine, theirs, atol=1e-4), name
    if spec.family == "gpt2":
        assert torch.allclose(ours.W_pos, reference.W_pos, atol=1e-4)

    tokens = torch.randint(2, 90, (2, 7), generator=torch.Generator().manual_seed(spec.seed))
    with torch.no_grad():
        their_logits, their_cache = reference.run_with_cache(tokens)
        my_logits, my_cache = ours.run_with_cache(tokens)
    assert torch.allclose(my_logits, their_logits, atol=1e-4)
    shared = set(their_cache.keys()) & set(my_cache.keys())
    assert len(shared) >= 12 * spec.n_layers
    for name in sorted(shared):
        assert torch.allclose(my_cache[name], their_cache[name], atol=1e-4), name


@settings(max_examples=examples(3))
@given(spec=model_specs(families=("gpt2", "llama")))
def test_load_and_process_state_dict_takes_transformer_lens_weights(spec):
    """Weights from a TransformerLens model load into a differently initialised fxhook model."""
    spec = _tl_comparable(spec)
    reference = tl_model(build_hf_model(spec))
    other = ModelSpec(**{**spec.__dict__, "seed": spec.seed + 1})
    ours = HookedTransformer.from_pretrained_no_processing(hf_model=build_hf_model(other))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.load_and_process_state_dict(reference.state_dict(), fold_ln=False, center_writing_weights=False,
                                         center_unembed=False, fold_value_biases=False)
    tokens = torch.randint(2, 90, (2, 7), generator=torch.Generator().manual_seed(spec.seed))
    with torch.no_grad():
        assert torch.allclose(ours(tokens), reference(tokens), atol=1e-4)
