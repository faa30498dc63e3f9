"""Each pass alone, on a small captured graph, for the guarantee it states; and the pass contracts."""
from __future__ import annotations

import operator

import pytest
import torch
from torch import fx

from fxhook import HookedTransformer
from fxhook.core.attention_math import SDPA_FUNCTIONS
from fxhook.core.graph import copy_graph_module, finish, hook_markers, hook_point_nodes, output_node
from fxhook.core.hook_point import HookPoint
from fxhook.passes.expose_activations import ACTIVATION_NAMES, expose_activations
from fxhook.passes.flag_hooks import drop_markers
from fxhook.passes.insert_hook_points import insert_hook_points, prune_hook_points
from fxhook.passes.kv_cache import logits_only
from fxhook.passes.lower_attention import attention_modes, lower_attention
from fxhook.passes.slice_layers import slice_layers
from fxhook.pipeline import (DecodeKind, GraphSpec, Pass, PassContractError, build_decode_step, build_forward,
                             capture_decode, form_of, forward_passes, run_passes)
from fxhook.pipeline.contracts import HOOK_POINT
from models import ModelSpec, build_hf_model

SPEC = ModelSpec("llama", n_layers=2, n_heads=4, n_kv_heads=2, d_head=4, d_mlp=16, bias=True, tied=False, seed=5)
TOKENS = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
MASK = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    return HookedTransformer.from_pretrained_no_processing(hf_model=build_hf_model(SPEC))


@pytest.fixture(scope="module")
def captured(model):
    return model.graphs.captured()


def run(gm: fx.GraphModule):
    with torch.no_grad():
        return gm(TOKENS, MASK)


def hooked(captured) -> fx.GraphModule:
    """The captured graph lowered (eager attention everywhere) with HookPoints."""
    return insert_hook_points(lower_attention(copy_graph_module(captured)))


def test_captured_form_is_markers_and_opaque_attention(captured):
    assert form_of(captured) == {"marker", "attention"}


def test_lower_attention_fuses_exactly_the_layers_whose_pattern_nobody_reads(captured):
    gm = lower_attention(copy_graph_module(captured), attention_modes(frozenset({"blocks.1.attn.hook_pattern"})))
    assert "attention" not in form_of(gm)
    pattern_markers = {m.args[1] for m in hook_markers(gm.graph) if m.args[1].endswith(("scores", "pattern"))}
    assert pattern_markers == {"blocks.1.attn.hook_attn_scores", "blocks.1.attn.hook_pattern"}
    sdpa = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_FUNCTIONS]
    assert len(sdpa) == 1  # layer 0 runs the fused kernel, layer 1 the explicit maths
    torch.testing.assert_close(run(gm), run(lower_attention(copy_graph_module(captured))), atol=1e-5, rtol=0)


def test_insert_hook_points_turns_every_marker_into_a_named_point_and_keeps_values(captured):
    lowered = lower_attention(copy_graph_module(captured))
    names = [m.args[1] for m in hook_markers(lowered.graph)]
    made: list[str] = []

    def make(name: str) -> HookPoint:
        made.append(name)
        return HookPoint(name)
    gm = insert_hook_points(copy_graph_module(lowered), make)
    assert form_of(gm) == {"hook_point"}
    assert sorted(hook_point_nodes(gm)) == sorted(set(names)) == sorted(made)
    torch.testing.assert_close(run(gm), run(lowered), atol=0, rtol=0)


def test_prune_keeps_exactly_the_wanted_points_and_the_outputs(captured):
    full = hooked(captured)
    keep = frozenset({"blocks.0.hook_resid_post", "blocks.1.attn.hook_z"})
    pruned = prune_hook_points(copy_graph_module(full), keep)
    assert set(hook_point_nodes(pruned)) == keep
    torch.testing.assert_close(run(pruned), run(full), atol=0, rtol=0)


def test_drop_markers_removes_only_that_kind(captured):
    gm = copy_graph_module(captured)
    before = [m.args[1] for m in hook_markers(gm.graph)]
    gm = drop_markers(gm, "hook_resid_post")
    after = [m.args[1] for m in hook_markers(gm.graph)]
    assert after == [n for n in before if not n.endswith(".hook_resid_post")] and len(after) == len(before) - 2


def test_slice_layers_returns_the_residual_entering_the_stop_block_and_drops_later_layers(model, captured):
    full = hooked(captured)
    sliced = slice_layers(copy_graph_module(full), SPEC.n_layers, None, 1)
    assert not [n for n in hook_point_nodes(sliced) if n.startswith("blocks.1.")]
    _, cache = model.run_with_cache(TOKENS, attention_mask=MASK, names_filter="blocks.1.hook_resid_pre")
    torch.testing.assert_close(run(sliced), cache["blocks.1.hook_resid_pre"], atol=1e-6, rtol=0)


def test_expose_activations_returns_the_hooked_values_as_outputs(model, captured):
    wanted = frozenset({"blocks.0.attn.hook_z", "blocks.1.hook_mlp_out"})
    gm = expose_activations(prune_hook_points(hooked(captured), wanted), wanted, frozenset())
    assert hook_point_nodes(gm) == {} and set(gm.meta[ACTIVATION_NAMES]) == wanted
    logits, values = run(gm)
    expected, cache = model.run_with_cache(TOKENS, attention_mask=MASK, names_filter=list(wanted))
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)
    for name, value in zip(gm.meta[ACTIVATION_NAMES], values):
        torch.testing.assert_close(value, cache[name], atol=1e-6, rtol=0)


def test_cache_lowering_removes_the_kv_ops_and_passes_the_self_check(model):
    cfg = model.cfg
    decode = capture_decode(model.hf_model, model.adapter, cfg)
    assert form_of(decode) == {"marker", "attention", "kv_op"}
    for kind in (DecodeKind(), DecodeKind(static=True)):
        step = build_decode_step(decode, kind, model.graphs.captured(), cfg)  # raises if it disagrees
        assert "kv_op" not in form_of(step)


def test_logits_only_returns_the_same_logits_and_drops_the_cache_writes(model):
    cfg = model.cfg
    step = build_decode_step(capture_decode(model.hf_model, model.adapter, cfg), DecodeKind(),
                             model.graphs.captured(), cfg)
    empty = [torch.zeros(2, cfg.n_kv_heads, 0, cfg.d_head)] * cfg.n_layers
    positions = (MASK.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = step(TOKENS, positions, MASK, *empty, *empty)
        only = logits_only(copy_graph_module(step))
        logits = only(TOKENS, positions, MASK, *empty, *empty)
    assert isinstance(logits, torch.Tensor) and torch.equal(logits, full[0])
    assert len(full) == 1 + 2 * cfg.n_layers and not isinstance(output_node(only.graph).args[0], (tuple, list))
    with pytest.raises(ValueError, match="growing-cache decode graph"):
        logits_only(only)


# ------------------------------------------------------------------ contracts
def test_a_pass_out_of_order_is_refused_with_its_name(captured):
    spec = GraphSpec(live_hooks=frozenset())
    passes = forward_passes(spec, None, None, HookPoint)
    prune = next(p for p in passes if p.name == "prune_hook_points")
    with pytest.raises(PassContractError, match="'prune_hook_points' takes graphs with only"):
        run_passes(copy_graph_module(captured), [prune])  # markers and opaque attention are still there


def test_a_pass_that_breaks_its_promise_is_caught(captured):
    liar = Pass("claims to lower attention", lambda gm: gm, removes=frozenset({"attention"}))
    with pytest.raises(PassContractError, match="promises to remove"):
        run_passes(copy_graph_module(captured), [liar])


def test_a_pass_list_regenerates_the_code_once(monkeypatch):
    """Passes rewrite the graph; `run_passes` regenerates the module's code once, after the last (a
    12-layer graph's code takes ~50 ms to generate), and the code then does what every pass made it do;
    outside a pass list, `finish` regenerates it at once."""
    class Affine(torch.nn.Module):
        def forward(self, x):
            return (x + 2) * 3

    def retarget(old, new):
        def rewrite(gm: fx.GraphModule) -> fx.GraphModule:
            for node in gm.graph.nodes:
                if node.target is old:
                    node.target = new
            return finish(gm)
        return rewrite

    regenerated = []
    recompile = fx.GraphModule.recompile
    monkeypatch.setattr(fx.GraphModule, "recompile", lambda gm: regenerated.append(gm) or recompile(gm))
    gm = fx.symbolic_trace(Affine())
    regenerated.clear()
    gm = run_passes(gm, [Pass("add to sub", retarget(operator.add, operator.sub)),
                         Pass("mul to add", retarget(operator.mul, operator.add))])
    assert len(regenerated) == 1 and gm(torch.tensor([5.0])).item() == 6.0  # (5 - 2) + 3
    gm = retarget(operator.add, operator.mul)(gm)
    assert len(regenerated) == 2 and gm(torch.tensor([5.0])).item() == 9.0  # (5 - 2) * 3


def test_recipe_new_pass(model, captured):
    """docs/architecture.md, "a new pass": a function GraphModule -> GraphModule, a Pass with its contract,
    placed in a pass list where the contract allows. Here: a pass that doubles the token embedding."""
    def double_embedding(gm: fx.GraphModule) -> fx.GraphModule:
        node = hook_point_nodes(gm)["hook_embed"]
        with gm.graph.inserting_after(node):
            doubled = gm.graph.call_function(torch.mul, (node, 2.0))
        node.replace_all_uses_with(doubled, delete_user_cb=lambda user: user is not doubled)
        gm.recompile()
        return gm

    new_pass = Pass("double_embedding", double_embedding, accepts=frozenset({HOOK_POINT}))
    spec = GraphSpec.from_cfg(model.cfg)
    passes = forward_passes(spec, model.cfg, model.adapter, HookPoint)
    after = [p.name for p in passes].index("insert_hook_points") + 1
    gm = run_passes(copy_graph_module(captured), passes[:after] + [new_pass] + passes[after:])
    handle = model.hf_model.model.embed_tokens.register_forward_hook(lambda _module, _args, out: out * 2.0)
    try:  # the same edit made on the HF model itself
        with torch.no_grad():
            expected = model.hf_model(input_ids=TOKENS, use_cache=False).logits
    finally:
        handle.remove()
    with torch.no_grad():
        got = gm(TOKENS, torch.ones_like(TOKENS))
        plain = build_forward(captured, spec, model.cfg, model.adapter)(TOKENS, torch.ones_like(TOKENS))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (got - plain).abs().max() > 1e-3  # the pass changed what the graph computes
    with pytest.raises(PassContractError, match="double_embedding"):  # before the hook points exist: refused
        run_passes(copy_graph_module(captured), [new_pass])


def test_every_graph_kind_has_its_pass_list_in_the_pipeline(model):
    spec = GraphSpec.from_cfg(model.cfg, live_hooks=frozenset({"blocks.0.hook_resid_post"}))
    names = [p.name for p in forward_passes(spec, model.cfg, model.adapter, HookPoint)]
    assert names == ["lower_attention", "drop hook_mlp_in markers", "drop hook_tokens markers", "insert_hook_points",
                     "prune_hook_points"]
    assert output_node(model.graph_for(spec).graph) is not None
