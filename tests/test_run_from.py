"""Resuming the forward from any hook point (`model.run_from`, the `resume_from` pass): with the cached
values it reproduces the full run's logits and every later hook, padding included; the values it asks
for are exactly the cut the hook graph gives; bad input fails clearly."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fxhook import HookedTransformer
from fxhook.analysis.hook_graph import downstream, resume_inputs
from fxhook.analysis.resume import required_inputs
from fxhook.core.hook_names import describe, position_axis
from fxhook.passes.resume_from import RESUME_INPUTS, resume_from
from family_models import OTHER_FAMILIES, build_any_model, specs_of
from models import NO_SHRINK, ModelSpec, build_hf_model, left_padded_batches, model_specs
from profiles import examples


@settings(max_examples=examples(3), phases=NO_SHRINK, deadline=None)
@given(spec=model_specs().filter(lambda s: s.n_layers <= 2), batch=left_padded_batches(max_batch=2, max_len=7),
       data=st.data())
def test_resume_from_any_hook_reproduces_the_run(spec, batch, data):
    check_resume_from_any_hook(spec, batch, data)


@pytest.mark.parametrize("family", OTHER_FAMILIES)
@settings(max_examples=examples(1), phases=NO_SHRINK, deadline=None)
@given(batch=left_padded_batches(max_batch=2, max_len=7), data=st.data())
def test_resume_from_any_hook_in_every_family(family, batch, data):
    """The same property in the families model_specs does not draw."""
    check_resume_from_any_hook(data.draw(specs_of(family).filter(lambda s: s.n_layers <= 2), label="spec"), batch,
                               data)


def check_resume_from_any_hook(spec, batch, data) -> None:
    """Resuming from drawn hook points (the whole run, and after a KV cache of a drawn prefix) reproduces the
    full run's logits and later hooks to 1e-5; the pass's cut is the hook graph's for every hook point."""
    torch.set_num_threads(1)
    model = HookedTransformer.from_pretrained_no_processing(hf_model=build_any_model(spec))
    tokens, mask = batch
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, attention_mask=mask)
        graph = model.hook_graph()
        names = list(graph)
        for name in names:
            # the pass's cut, attention materialised everywhere, is the hook graph's
            assert set(required_inputs(model, frozenset([name]), None)) == resume_inputs(graph, name), name
        for name in data.draw(st.lists(st.sampled_from(names), min_size=2, max_size=4, unique=True)):
            later = downstream(graph, name)
            out, resumed = model.run_from(name, cache, tokens=tokens, attention_mask=mask,
                                          names_filter=lambda n: True)
            assert (out - logits).abs().max() <= 1e-5, name
            assert set(resumed.keys()) == later | {name}, name  # only what depends on it was computed
            for later_name in resumed.keys():
                assert torch.allclose(resumed[later_name], cache[later_name], atol=1e-5, equal_nan=True), later_name
        # after a KV cache of the first positions only the later ones are computed, from any hook point whose
        # inputs are per-position values (a pattern's key axis spans the cached positions too)
        first = data.draw(st.integers(1, tokens.shape[1] - 1))
        past = model.init_kv_cache(tokens.shape[0])
        model(tokens[:, :first], attention_mask=mask[:, :first], past_kv_cache=past)
        real = mask[:, first:].bool()  # padding positions' logits are not defined
        for name in data.draw(st.lists(st.sampled_from(names), min_size=2, max_size=4, unique=True)):
            needed = required_inputs(model, frozenset([name]), after_cache=True)
            if any("key_pos" in describe(n)[0] for n in needed):
                continue
            given = {n: cache[n].narrow(position_axis(n), first, tokens.shape[1] - first) for n in needed}
            out = model.run_from(name, given, tokens=tokens[:, first:], attention_mask=mask[:, first:],
                                 past_kv_cache=past)
            assert out.shape == logits[:, first:].shape
            assert (out - logits[:, first:])[real].abs().max() <= 1e-5, name
        assert past.past_length == first  # read, not extended


@pytest.fixture(scope="module")
def small():
    model = HookedTransformer.from_pretrained_no_processing(
        hf_model=build_hf_model(ModelSpec("llama", 2, 4, 2, 8, 40, True, False, 3)))
    tokens = torch.randint(2, 90, (2, 6), generator=torch.Generator().manual_seed(0))
    return model, tokens


def test_run_from_options_and_hooks(small):
    model, tokens = small
    name = "blocks.1.attn.hook_z"
    with torch.no_grad():
        loss = model(tokens, return_type="loss")
        _, cache = model.run_with_cache(tokens, names_filter=list(required_inputs(model, frozenset([name]))))
        assert torch.allclose(model.run_from(name, cache, tokens=tokens, return_type="loss"), loss, atol=1e-6)

        def zero_head(z, hook):
            z[:, :, 2] = 0.0
            return z
        patched = model.run_with_hooks(tokens, fwd_hooks=[(name, zero_head)])
        resumed = model.run_from(name, cache, fwd_hooks=[(name, zero_head)])
    assert torch.allclose(resumed, patched, atol=1e-5)
    assert not model.live_hooks()  # the call's hooks are gone


def test_run_from_errors(small):
    model, tokens = small
    name = "blocks.1.hook_resid_mid"
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    out = "blocks.1.hook_mlp_out"  # is added to resid_mid, which must be given too
    with pytest.raises(KeyError, match="hook_resid_mid.*names_filter"):
        model.run_from(out, {out: cache[out]})
    with pytest.raises(Exception, match="blocks.9"):
        model.run_from("blocks.9.hook_resid_pre", cache)
    with pytest.raises(ValueError, match="tokens="):
        model.run_from(name, cache, return_type="loss")
    with pytest.raises(ValueError, match=r"\[batch, pos\]"):
        model.run_from(name, cache, attention_mask=torch.ones(1, 6, dtype=torch.long))
    past = model.init_kv_cache(2)
    model(tokens[:, :2], past_kv_cache=past)
    with pytest.raises(ValueError, match="cannot both"):
        model.run_from(name, cache, past_kv_cache=past, names_filter="blocks.1.hook_resid_post")
    with pytest.raises(TypeError, match="KVCache"):
        model.run_from(name, cache, past_kv_cache=[past.keys, past.values])
    with pytest.raises(ValueError, match="batch of 2"):
        model.run_from(name, {name: cache[name][:1, 2:]}, past_kv_cache=past)
    with pytest.raises(ValueError, match="batch axis"):
        model.run_from("blocks.0.hook_resid_pre", {"blocks.0.hook_resid_pre": cache["blocks.0.hook_resid_pre"][0]})


def test_resume_from_pass_alone(small):
    """The pass on the full hooked graph: inputs are the start and the points beside it; the rest is gone."""
    model, tokens = small
    gm = model.graph_module
    from fxhook.core.graph import copy_graph_module, hook_point_nodes

    resumed = resume_from(copy_graph_module(gm), frozenset(["blocks.1.attn.hook_pattern"]))
    assert set(resumed.meta[RESUME_INPUTS]) == {"blocks.1.attn.hook_pattern", "blocks.1.attn.hook_v",
                                                "blocks.1.hook_resid_pre"}
    assert "blocks.0.hook_resid_post" not in hook_point_nodes(resumed)
    # a start that another start reaches is computed, not fed
    both = resume_from(copy_graph_module(gm), frozenset(["blocks.0.hook_resid_pre", "blocks.1.attn.hook_q"]))
    assert both.meta[RESUME_INPUTS] == ("blocks.0.hook_resid_pre",)
    with pytest.raises(ValueError, match="no such hook point"):
        resume_from(copy_graph_module(gm), frozenset(["blocks.7.attn.hook_z"]))
