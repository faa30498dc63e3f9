"""The neutral-op pass (passes/neutral_ops.py): after fold_ln the norms' unit weights and zero biases leave
the graph, every value stays bit for bit, and a later edit of such a weight is seen."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import fx, nn

from family_models import FamilySpec, build_family_model
from fxhook import HookedTransformer
from fxhook.core.graph import copy_graph_module
from fxhook.passes.expose_activations import ACTIVATION_NAMES
from fxhook.passes.neutral_ops import folded_norm_params, neutral_guard, remove_neutral_ops
from fxhook.pipeline import DecodeKind, GraphSpec, decode_passes, forward_passes, run_passes
from models import ModelSpec, build_hf_model

PASS_NAME = "remove_neutral_ops"
TOKENS = torch.tensor([[3, 1, 4, 1, 5, 9, 2], [6, 5, 3, 5, 8, 9, 7]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]])
POSITIONS = (MASK.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens (as TransformerLens)
# one family per norm formula: LayerNorm with biases, RMSNorm, Gemma's (1 + w) RMSNorm
FAMILIES = {
    "gpt2": lambda: build_hf_model(ModelSpec("gpt2", 2, 4, 4, 4, 16, bias=True, tied=True, seed=3)),
    "llama": lambda: build_hf_model(ModelSpec("llama", 2, 4, 2, 4, 16, bias=False, tied=False, seed=4)),
    "gemma": lambda: build_family_model(FamilySpec("gemma", 2, 4, 2, 4, 16, bias=True, tied=True, seed=5)),
}
NORM_OPS = {"gpt2": 2, "llama": 1, "gemma": 1}  # ops a folded norm applies its weight/bias with: mul (+ add)


@functools.lru_cache(maxsize=None)
def _processed(family: str) -> HookedTransformer:
    """One processed model per family for the whole file (its captures are the slow part)."""
    return HookedTransformer.from_pretrained(hf_model=FAMILIES[family]())


@pytest.fixture(params=sorted(FAMILIES))
def processed(request):
    return request.param, _processed(request.param)


def _build(model: HookedTransformer, spec: GraphSpec, with_pass: bool) -> fx.GraphModule:
    passes = forward_passes(spec, model.cfg, model.adapter, model.graphs.make_point)
    if not with_pass:
        passes = [p for p in passes if p.name != PASS_NAME]
    return run_passes(copy_graph_module(model.graphs.captured()), passes, "test forward")


def _ops(gm: fx.GraphModule) -> int:
    return sum(n.op == "call_function" for n in gm.graph.nodes)


def _readers_of(gm: fx.GraphModule, targets: frozenset[str]) -> int:
    """How many ops read a norm parameter (directly or through a dtype cast / `1 + w`)."""
    count = 0
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in targets:
            count += len(node.users)
    return count


def test_pass_alone_removes_exactly_the_identity_ops():
    """On a small exported module: x * w + b with w ones and b zeros loses both ops; a non-neutral,
    a non-candidate or a broadcasting operand keeps its op; the guard names what was assumed."""
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = nn.Parameter(torch.ones(4)), nn.Parameter(torch.zeros(4))
            self.other = nn.Parameter(torch.ones(4))  # neutral but not a candidate
            self.wide = nn.Parameter(torch.ones(4))  # neutral but broadcasts x[:1] to [4]

        def forward(self, x):  # x [4]
            return (x * self.w + self.b) * self.other, x[:1] * self.wide

    toy = Toy()
    gm = torch.export.export(toy, (torch.randn(4),)).module()
    x = torch.randn(4)
    before = gm(x)
    out = remove_neutral_ops(gm, frozenset({"w", "b", "wide"}))
    after = out(x)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    reads = {n.target for n in out.graph.nodes if n.op == "get_attr"}
    assert reads == {"other", "wide"}  # w and b gone; `other` is no candidate; `wide` broadcasts
    assert neutral_guard(out).targets == ("b", "w") and neutral_guard(out).holds()
    with torch.no_grad():
        toy.w.data += 1  # .data: no version counter moves
    assert not neutral_guard(out).holds()

    kept = torch.export.export(Toy(), (torch.randn(4),)).module()
    with torch.no_grad():
        kept.w.mul_(2.0)
    same = remove_neutral_ops(kept, frozenset({"w"}))
    assert any(n.op == "get_attr" and n.target == "w" for n in same.graph.nodes) and neutral_guard(same) is None


def test_a_norm_weight_read_twice_is_removed_at_both_reads():
    """GPT-J and Phi apply one norm for attention and MLP: the graph reads its weight once and uses it twice;
    both uses go, and the guard still names the parameter."""
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = nn.Parameter(torch.ones(4)), nn.Parameter(torch.zeros(4))

        def forward(self, x, y):  # [4], [4]
            return x * self.w + self.b, y * self.w + self.b

    gm = torch.export.export(Shared(), (torch.randn(4), torch.randn(4))).module()
    x, y = torch.randn(4), torch.randn(4)
    out = remove_neutral_ops(gm, frozenset({"w", "b"}))
    assert all(torch.equal(a, b) for a, b in zip(out(x, y), (x, y)))
    assert not [n for n in out.graph.nodes if n.op == "get_attr"]
    assert neutral_guard(out).targets == ("b", "w")


def test_logits_and_every_hook_equal_with_and_without_the_pass(processed):
    family, model = processed
    hf = model.hf_model  # the processed weights (from_pretrained works on its own copy)
    names = frozenset(model.hook_dict)
    spec = GraphSpec.from_cfg(model.cfg, live_hooks=frozenset(), outputs=names)
    without, with_pass = _build(model, spec, False), _build(model, spec, True)
    with torch.no_grad():
        ref_logits, ref_acts = without(TOKENS, MASK)
        logits, acts = with_pass(TOKENS, MASK)
        hf_logits = hf(TOKENS, attention_mask=MASK, position_ids=POSITIONS).logits
    assert with_pass.meta[ACTIVATION_NAMES] == without.meta[ACTIVATION_NAMES]
    assert len(acts) == len(names)
    assert torch.equal(logits, ref_logits)
    for name, a, b in zip(without.meta[ACTIVATION_NAMES], ref_acts, acts):
        assert torch.equal(a, b), name
    rows = MASK.bool()
    torch.testing.assert_close(logits[rows], hf_logits[rows], atol=1e-5, rtol=0)  # an independent anchor
    norms = folded_norm_params(model.adapter, model.cfg)
    n_norms = 2 * model.cfg.n_layers + 1
    assert _readers_of(with_pass, norms) == 0 and _readers_of(without, norms) > 0
    assert _ops(without) - _ops(with_pass) >= NORM_OPS[family] * n_norms


def test_the_model_runs_the_pass_in_forward_and_decode_graphs(processed):
    family, model = processed
    hf = model.hf_model  # the processed weights (from_pretrained works on its own copy)
    norms = folded_norm_params(model.adapter, model.cfg)
    with torch.no_grad():
        model(TOKENS, attention_mask=MASK)
        cache = model.init_kv_cache(batch_size=2)
        pieces = [model(TOKENS[:, :4], attention_mask=MASK[:, :4], past_kv_cache=cache)]
        pieces += [model(TOKENS[:, t:t + 1], past_kv_cache=cache) for t in range(4, TOKENS.shape[1])]
        hf_logits = hf(TOKENS, attention_mask=MASK, position_ids=POSITIONS).logits
    forward = model.graphs.forward(GraphSpec.from_cfg(model.cfg, live_hooks=frozenset())).gm
    spec, kind = GraphSpec.from_cfg(model.cfg, live_hooks=frozenset()), DecodeKind()
    decode = model.graphs.decode(spec, kind).gm
    step = model.graphs.decode_step(False, kind)
    unpassed = [p for p in decode_passes(spec, kind, model.cfg, model.adapter, model.graphs.make_point)
                if p.name != PASS_NAME]
    decode_without = run_passes(copy_graph_module(step), unpassed, "test decode")
    assert _readers_of(forward, norms) == 0 and _readers_of(decode, norms) == 0
    assert _ops(decode_without) - _ops(decode) >= NORM_OPS[family] * (2 * model.cfg.n_layers + 1)
    rows = MASK.bool()
    torch.testing.assert_close(torch.cat(pieces, 1)[rows], hf_logits[rows], atol=1e-5, rtol=0)


def test_unprocessed_models_keep_their_norm_ops_and_gradients():
    """HF initialises norms to ones and zeros: without fold_ln they are trainable weights, not neutral ops."""
    torch.manual_seed(0)
    from transformers import GPT2Config, GPT2LMHeadModel
    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=16, vocab_size=97)).eval()
    assert torch.equal(hf.transformer.h[0].ln_1.weight, torch.ones(16))  # neutral values, yet kept
    model = HookedTransformer.from_pretrained_no_processing(hf_model=hf)
    assert folded_norm_params(model.adapter, model.cfg) == frozenset()
    spec = GraphSpec.from_cfg(model.cfg, live_hooks=frozenset())
    gm = _build(model, spec, True)
    assert _ops(gm) == _ops(_build(model, spec, False))
    model(TOKENS[:, :5], return_type="loss").backward()
    assert model.blocks[0].ln1.w.grad is not None and bool(model.blocks[0].ln1.w.grad.ne(0).any())


@pytest.mark.parametrize("family, edit", [("gpt2", "data"), ("llama", "data"), ("gemma", "data"),
                                          ("gemma", "no_grad"), ("gpt2", "state_dict")])
def test_a_later_edit_of_a_removed_weight_is_seen(family, edit):
    """Forward and decode graphs built while the norms were neutral follow an edit made afterwards: through
    `.data` (no version counter moves), in place under no_grad, or by loading a state dict."""
    model = _processed(family)
    hf = model.hf_model  # the processed weights (from_pretrained works on its own copy)
    with torch.no_grad():
        before = model(TOKENS, attention_mask=MASK)
        cache = model.init_kv_cache(batch_size=2)
        model(TOKENS[:, :4], attention_mask=MASK[:, :4], past_kv_cache=cache)  # builds the decode graph
    stale = model.graphs.stale_rebuilds
    try:
        if edit == "data":
            model.blocks[0].ln1.w.data += 0.5
        elif edit == "no_grad":
            with torch.no_grad():
                model.blocks[1].ln2.w.add_(0.5)
                model.ln_final.w.add_(0.25)
        else:
            weights = {k: v.detach().clone() for k, v in model.live_weights().items()}
            weights["blocks.0.ln1.w"] += 0.5
            model.load_and_process_state_dict(weights, fold_ln=False, center_writing_weights=False,
                                              center_unembed=False, fold_value_biases=False)
        with torch.no_grad():
            after = model(TOKENS, attention_mask=MASK)
            cache = model.init_kv_cache(batch_size=2)  # the old cache holds keys made before the edit
            prefill = model(TOKENS[:, :4], attention_mask=MASK[:, :4], past_kv_cache=cache)
            step = model(TOKENS[:, 4:5], past_kv_cache=cache)
            hf_logits = hf(TOKENS, attention_mask=MASK, position_ids=POSITIONS).logits
        rows = MASK.bool()
        assert not torch.allclose(before[rows], after[rows], atol=1e-3)  # the edit matters
        torch.testing.assert_close(after[rows], hf_logits[rows], atol=1e-5, rtol=0)  # HF reads the same weights
        decoded = torch.cat([prefill, step], 1)
        torch.testing.assert_close(decoded[rows[:, :5]], hf_logits[:, :5][rows[:, :5]], atol=1e-5, rtol=0)
        if edit != "state_dict":  # loading weights rebuilds every graph anyway
            assert model.graphs.stale_rebuilds > stale
    finally:  # the fixture is shared: put the neutral weights back
        with torch.no_grad():
            for w in (model.blocks[0].ln1.w, model.blocks[1].ln2.w, model.ln_final.w):
                w.fill_(model.adapter.neutral_norm_weight)
