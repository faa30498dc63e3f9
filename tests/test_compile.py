"""Compiled execution: compiled == eager, hooks take effect, graphs specialised to the hook set.

Inductor compiles take tens of seconds here, so the property over many configs compiles with
torch's "aot_eager" backend (dynamo capture and AOT autograd, the steps that break on graph
problems), one fixed config goes through inductor, and the tests of hook behaviour use a
backend that counts dynamo's graphs and runs them as they are.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.testing import assert_close

from fxhook import HookedTransformer
from fxhook.pipeline import GraphSpec
from fxhook.core.graph import hook_point_nodes
from fxhook.core.hook_point import HookPoint
from models import NO_SHRINK, ModelSpec, build_hf_model, model_specs, token_batches
from profiles import examples

TOL = dict(atol=1e-4, rtol=1e-4)


class CountingBackend:
    """A torch.compile backend that counts the graphs dynamo hands it and runs them as they are."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs) -> callable:
        self.graphs += 1
        return gm.forward


def _wrap(spec: ModelSpec) -> HookedTransformer:
    return HookedTransformer.from_pretrained_no_processing(hf_model=build_hf_model(spec))


def _padded_batch(batch: int = 3, length: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, 90, (batch, length), generator=g)
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0  # left padding: fully masked query rows
    return tokens, mask


def _sdpa_count(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.target is torch.nn.functional.scaled_dot_product_attention)


# ------------------------------------------------------------------ numerics
@pytest.mark.support("llama", "compile")
def test_inductor_matches_eager():
    spec = ModelSpec("llama", 2, 4, 2, 8, 40, True, False, 4)
    model = _wrap(spec)
    tokens, mask = _padded_batch()
    with torch.no_grad():
        eager_logits, eager_cache = model.run_with_cache(tokens, attention_mask=mask)
        model.compile()
        logits = model(tokens, attention_mask=mask)
        assert_close(logits, eager_logits, **TOL)
        hf_logits = model.hf_model(tokens, attention_mask=mask).logits
        assert_close(logits[mask.bool()], hf_logits[mask.bool()], **TOL)
        _, cache = model.run_with_cache(tokens, attention_mask=mask)
    assert set(cache.keys()) == set(eager_cache.keys())
    for name in cache.keys():
        assert_close(cache[name], eager_cache[name], **TOL, msg=name)


@pytest.mark.support("*", "compile")
@settings(max_examples=examples(3), phases=NO_SHRINK)
@given(spec=model_specs(), batch=token_batches(max_len=8), data=st.data())
def test_compiled_forward_and_cache_match_eager(spec, batch, data):
    tokens, mask = batch
    model = _wrap(spec)
    names = sorted(model.hook_dict)
    chosen = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=4, unique=True), label="cached")
    with torch.no_grad():
        eager_logits, eager_cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=chosen)
        model.compile(backend="aot_eager")
        logits = model(tokens, attention_mask=mask)
        cached_logits, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=chosen)
    assert_close(logits, eager_logits, **TOL)
    assert_close(cached_logits, eager_logits, **TOL)
    assert set(cache.keys()) == set(chosen)
    for name in chosen:
        assert_close(cache[name], eager_cache[name], **TOL, msg=name)


# ------------------------------------------------------------------ hooks under compilation
def test_hooks_added_or_removed_after_compiling_take_effect():
    model = _wrap(ModelSpec("llama", 2, 4, 2, 8, 40, True, False, 5))
    tokens, mask = _padded_batch(seed=1)
    name = "blocks.0.hook_resid_post"

    def halve(x, hook):
        return x * 0.5

    with torch.no_grad():
        plain = model(tokens, attention_mask=mask)
        hooked_eager = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[(name, halve)])
        backend = CountingBackend()
        model.compile(backend=backend)
        assert_close(model(tokens, attention_mask=mask), plain, **TOL)
        model.add_hook(name, halve)
        assert_close(model(tokens, attention_mask=mask), hooked_eager, **TOL)
        model.reset_hooks()
        assert_close(model(tokens, attention_mask=mask), plain, **TOL)
        compiled_graphs = backend.graphs
        # a new hook function at the same point, and switching back and forth, reuse the compiled code
        for _ in range(2):
            seen = []
            out = model.run_with_hooks(tokens, attention_mask=mask,
                                       fwd_hooks=[(name, lambda x, hook: seen.append(hook.name) or x * 0.5)])
            assert seen == [name]
            assert_close(out, hooked_eager, **TOL)
            assert_close(model(tokens, attention_mask=mask), plain, **TOL)
    assert backend.graphs == compiled_graphs


def test_a_hook_may_do_what_python_can_under_compilation():
    """Hooks run outside the compiled graph: printing, .item(), numpy and errors behave as in eager."""
    model = _wrap(ModelSpec("gpt2", 1, 2, 2, 8, 16, True, True, 6)).compile(backend=CountingBackend())
    tokens = torch.randint(2, 90, (2, 5))
    norms = []
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre",
                                                 lambda x, hook: norms.append(x.norm().item()))])
        assert len(norms) == 1 and norms[0] > 0
        with pytest.raises(ZeroDivisionError):
            model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_mlp_out", lambda x, hook: 1 / 0)])
    assert model.live_hooks() == frozenset()


def test_new_lengths_and_batch_sizes_do_not_recompile():
    model = _wrap(ModelSpec("llama", 1, 2, 1, 8, 16, False, True, 7))
    backend = CountingBackend()
    model.compile(backend=backend)
    with torch.no_grad():
        for batch, length in [(2, 4), (3, 6), (2, 9), (4, 5)]:
            tokens = torch.randint(2, 90, (batch, length))
            assert_close(model(tokens), model.hf_model(tokens).logits, **TOL)
    assert backend.graphs == 3  # compiled by region (the embedding side, the block, the final side), once each


def test_stop_at_layer_compiled_runs_only_the_layers_before():
    model = _wrap(ModelSpec("gpt2", 3, 2, 2, 8, 16, True, False, 8))
    tokens = torch.randint(2, 90, (2, 6))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter="blocks.1.hook_resid_pre")
        model.compile(backend=CountingBackend())
        calls = []
        with model.hooks([("blocks.2.hook_resid_pre", lambda x, hook: calls.append(hook.name))]):
            resid = model(tokens, stop_at_layer=1)
    assert calls == []
    assert_close(resid, cache["blocks.1.hook_resid_pre"], **TOL)
    sliced = model.graph_for(GraphSpec.from_cfg(model.cfg, stop=1, live_hooks=frozenset()))
    params = {n.target for n in sliced.graph.nodes if n.op == "get_attr"}
    assert params and not any(".h.1." in p or ".h.2." in p for p in params)


# ------------------------------------------------------------------ specialisation
def test_attention_is_fused_except_where_its_internals_are_read():
    model = _wrap(ModelSpec("llama", 3, 4, 2, 8, 40, True, False, 9))
    tokens, mask = _padded_batch(seed=2)
    n = model.cfg.n_layers
    bare = model.graph_for(GraphSpec.from_cfg(model.cfg, live_hooks=frozenset()))
    one = model.graph_for(GraphSpec.from_cfg(model.cfg, live_hooks=frozenset({"blocks.1.attn.hook_pattern"})))
    z_only = model.graph_for(GraphSpec.from_cfg(model.cfg, live_hooks=frozenset({"blocks.1.attn.hook_z"})))
    assert (_sdpa_count(bare), _sdpa_count(one), _sdpa_count(z_only)) == (n, n - 1, n)
    assert _sdpa_count(model.graph_module) == 0  # every hook point present: attention materialised
    with torch.no_grad():
        fused = bare(tokens, mask)
        materialised = model.graph_module(tokens, mask)
    assert torch.isfinite(fused).all()  # left-pad rows attend to nothing: finite, as in the eager math
    assert_close(fused, materialised, atol=1e-5, rtol=1e-5)


def test_run_with_cache_returns_activations_from_the_graph_without_python_hooks(monkeypatch):
    model = _wrap(ModelSpec("gpt2", 2, 2, 2, 8, 16, True, False, 10))
    tokens = torch.randint(2, 90, (2, 5))
    calls = []
    original = HookPoint.run_hooks
    monkeypatch.setattr(HookPoint, "run_hooks", lambda self, x: calls.append(self.name) or original(self, x))
    wanted = [f"blocks.{i}.hook_resid_post" for i in range(2)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=wanted)
    assert calls == [] and list(cache.keys()) == wanted
    graph = model.graph_for(GraphSpec.from_cfg(model.cfg, live_hooks=frozenset(), outputs=frozenset(wanted)))
    assert hook_point_nodes(graph) == {}
    # a point that is both hooked and cached runs its hook once, and the cache holds the edited value
    with torch.no_grad(), model.hooks([(wanted[0], lambda x, hook: x + 1.0)]):
        _, edited = model.run_with_cache(tokens, names_filter=wanted[0])
    assert calls == [wanted[0]]
    assert_close(edited[wanted[0]], cache[wanted[0]] + 1.0)


def test_from_pretrained_compile_flag():
    hf = build_hf_model(ModelSpec("gpt2", 1, 2, 2, 8, 16, True, True, 11))
    assert HookedTransformer.from_pretrained_no_processing(hf_model=hf, compile=True).is_compiled
    model = HookedTransformer.from_pretrained_no_processing(hf_model=hf)
    assert not model.is_compiled and model.compile() is model and model.is_compiled
    assert not model.compile(False).is_compiled
