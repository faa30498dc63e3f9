"""Pay for what you hook: the graph that runs keeps only the hook points that have hooks."""
from __future__ import annotations

import torch

from fxhook import HookedTransformer
from fxhook.pipeline import GraphSpec
from fxhook.core.graph import hook_point_nodes
from models import ModelSpec, build_hf_model


def _model():
    return HookedTransformer.from_pretrained_no_processing(
        hf_model=build_hf_model(ModelSpec("llama", 2, 4, 2, 8, 40, True, False, 11)))


def test_unhooked_points_are_not_in_the_graph_that_runs():
    model = _model()
    tokens = torch.randint(2, 90, (2, 6))
    bare = model.graph_for(GraphSpec.from_cfg(model.cfg, live_hooks=model.live_hooks()))
    assert model.live_hooks() == frozenset() and hook_point_nodes(bare) == {}
    assert len(hook_point_nodes(model.graph_module)) == len(model.hook_dict) > 0
    with torch.no_grad():
        assert torch.allclose(model(tokens), bare(tokens, torch.ones_like(tokens)))
        assert torch.allclose(model(tokens), model.hf_model(tokens).logits, atol=1e-5)
        seen = []
        with model.hooks([("blocks.1.attn.hook_z", lambda z, hook: seen.append(z.shape))]):
            assert model.live_hooks() == {"blocks.1.attn.hook_z"}
            hooked = model.graph_for(GraphSpec.from_cfg(model.cfg, live_hooks=model.live_hooks()))
            assert set(hook_point_nodes(hooked)) == {"blocks.1.attn.hook_z"}
            model(tokens)
        assert seen == [(2, 6, 4, 8)]


def test_switching_hook_sets_reuses_the_built_graphs():
    model = _model()
    tokens = torch.randint(2, 90, (1, 5))
    with torch.no_grad():
        _, first = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post")
        graph_a = model.graph_for(GraphSpec.from_cfg(model.cfg, live_hooks=frozenset({"blocks.0.hook_resid_post"})))
        model.run_with_cache(tokens, names_filter="blocks.1.hook_mlp_out")
        _, again = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post")
        assert model.graph_for(GraphSpec.from_cfg(
            model.cfg, live_hooks=frozenset({"blocks.0.hook_resid_post"}))) is graph_a
    assert list(again.keys()) == ["blocks.0.hook_resid_post"]
    assert torch.equal(first["blocks.0.hook_resid_post"], again["blocks.0.hook_resid_post"])
