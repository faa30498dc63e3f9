"""Hook machinery and ActivationCache: attaching, editing, removing, caching.

The registry properties (leaks, permanence, contexts, filters, cache
selection) do not depend on the architecture, so they draw from a small pool
of models captured once per module (one GPT-2, one grouped-query Llama); the
inputs, hook names, edits and failure points are drawn by hypothesis.
Properties whose result depends on the architecture (editing resid_mid)
draw fresh random configs.
"""
from __future__ import annotations

import functools
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from fxhook import ActivationCache, HookedTransformer
from fxhook.core.hook_point import HookPoint, HookShapeError
from fxhook.utils import get_act_name
from models import NO_SHRINK, ModelSpec, build_hf_model, model_specs, token_batches
from profiles import examples


ATOL = 1e-5
POOL = (
    ModelSpec("gpt2", n_layers=2, n_heads=2, n_kv_heads=2, d_head=8, d_mlp=40, bias=True, tied=False, seed=11),
    ModelSpec("llama", n_layers=2, n_heads=4, n_kv_heads=2, d_head=4, d_mlp=16, bias=True, tied=True, seed=12),
)


@functools.lru_cache(maxsize=len(POOL) + 2)
def built(spec: ModelSpec) -> tuple[torch.nn.Module, HookedTransformer]:
    hf = build_hf_model(spec)
    return hf, HookedTransformer.from_pretrained_no_processing(hf_model=hf)


_POOL_MODELS: dict[ModelSpec, tuple[torch.nn.Module, HookedTransformer]] = {}


def pool_model(spec: ModelSpec) -> tuple[torch.nn.Module, HookedTransformer]:
    if spec not in _POOL_MODELS:
        _POOL_MODELS[spec] = built(spec)
    return _POOL_MODELS[spec]


pool_models = st.sampled_from(POOL).map(pool_model)


def attached(model: HookedTransformer) -> dict[str, tuple[int, int]]:
    """name -> (forward hooks, backward hooks) for every HookPoint that has any."""
    return {name: (len(p.fwd_hooks), len(p.bwd_hooks)) for name, p in model.hook_dict.items()
            if p.fwd_hooks or p.bwd_hooks}


def assert_no_hooks(model: HookedTransformer) -> None:
    leaked = attached(model)
    assert not leaked, f"hooks left attached: {leaked}"


@pytest.fixture(autouse=True)
def clean_pool_models():
    """A failing example must not leave hooks behind for the next test."""
    yield
    for _, model in _POOL_MODELS.values():
        model.reset_hooks(including_permanent=True)


class Boom(RuntimeError):
    pass


# ------------------------------------------------------------------ wrong shapes
@given(pair=pool_models, batch=token_batches(max_len=6), data=st.data())
def test_wrong_shaped_hook_output_raises_a_clear_error(pair, batch, data):
    _, model = pair
    tokens, mask = batch
    name = data.draw(st.sampled_from(sorted(model.hook_dict)), label="hook")
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=name)
    shape = tuple(cache[name].shape)
    dim = data.draw(st.integers(0, len(shape) - 1), label="dim")
    grow = data.draw(st.sampled_from(["grow", "shrink", "extra_dim"]), label="how")
    if grow == "extra_dim":
        bad = (*shape, 1)
    else:
        bad = list(shape)
        bad[dim] = bad[dim] + 1 if grow == "grow" or bad[dim] == 1 else bad[dim] - 1
        bad = tuple(bad)

    def bad_hook(x, hook):
        return torch.zeros(bad)

    with pytest.raises(HookShapeError) as info:
        with torch.no_grad():
            model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[(name, bad_hook)])
    message = str(info.value)
    assert name in message and "bad_hook" in message
    assert str(bad) in message and str(shape) in message
    assert_no_hooks(model)


@given(pair=pool_models, batch=token_batches(max_len=6))
def test_hook_returning_a_non_tensor_raises(pair, batch):
    _, model = pair
    tokens, mask = batch
    with pytest.raises(TypeError, match="blocks.0.hook_resid_pre"):
        model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: 1.0)])
    assert_no_hooks(model)


# ---------------------------------------------------------------------- no leaks
@given(pair=pool_models, batch=token_batches(max_len=6), data=st.data())
def test_hooks_are_removed_however_the_run_ends(pair, batch, data):
    _, model = pair
    tokens, mask = batch
    names = sorted(model.hook_dict)
    fwd_names = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=6), label="fwd hooks")
    bwd_names = data.draw(st.lists(st.sampled_from(names), max_size=3), label="bwd hooks")
    perma_name = data.draw(st.none() | st.sampled_from(names), label="permanent hook")
    ending = data.draw(st.sampled_from(["normal", "hook_raises", "body_raises", "unknown_name"]), label="ending")
    boom_at = data.draw(st.sampled_from(fwd_names), label="raising hook")
    entry = data.draw(st.sampled_from(["run_with_hooks", "hooks_context", "run_with_cache"]), label="entry")

    perma_calls = []
    if perma_name is not None:
        model.add_hook(perma_name, lambda x, hook: perma_calls.append(hook.name), is_permanent=True)

    def hook(x, hook):
        if ending == "hook_raises" and hook.name == boom_at:
            raise Boom(hook.name)

    fwd = [(n, hook) for n in fwd_names]
    bwd = [(n, lambda g, hook: None) for n in bwd_names]
    if ending == "unknown_name":
        fwd.append(("blocks.0.hook_not_a_hook", hook))  # attaching fails after some hooks went on
    expected_error = {"normal": None, "hook_raises": Boom, "body_raises": Boom, "unknown_name": KeyError}[ending]

    def run():
        if entry == "run_with_hooks":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # bwd hooks with run_with_hooks warn (tested elsewhere)
                model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=fwd, bwd_hooks=bwd)
        elif entry == "run_with_cache":
            with model.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
                model.run_with_cache(tokens, attention_mask=mask, return_type="loss", incl_bwd=True)
        else:
            with model.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
                assert attached(model), "hooks are attached inside the block"
                loss = model(tokens, attention_mask=mask, return_type="loss")
                loss.backward()
        if ending == "body_raises":
            raise Boom("body")

    if expected_error is None:
        run()
    else:
        with pytest.raises(expected_error):
            run()
    # only the permanent hook is left, wherever the run stopped
    assert attached(model) == ({perma_name: (1, 0)} if perma_name is not None else {})
    model.reset_hooks()
    assert attached(model) == ({perma_name: (1, 0)} if perma_name is not None else {})
    if perma_name is not None and ending == "normal":
        assert perma_name in perma_calls
    model.reset_hooks(including_permanent=True)
    assert_no_hooks(model)


@given(pair=pool_models, batch=token_batches(max_len=6), data=st.data())
def test_permanent_hooks_and_reset_hooks_end(pair, batch, data):
    _, model = pair
    tokens, mask = batch
    names = sorted(model.hook_dict)
    perma, temp = data.draw(st.lists(st.sampled_from(names), min_size=2, max_size=2, unique=True), label="names")
    calls = []
    model.add_perma_hook(perma, lambda x, hook: calls.append(("perma", hook.name)))
    model.add_hook(temp, lambda x, hook: calls.append(("temp", hook.name)))
    with torch.no_grad():
        model(tokens, attention_mask=mask)
    assert sorted(calls) == sorted([("perma", perma), ("temp", temp)])
    model.reset_hooks()  # temporary hooks go, permanent ones stay
    assert attached(model) == {perma: (1, 0)}
    calls.clear()
    with torch.no_grad():
        model.run_with_hooks(tokens, attention_mask=mask, reset_hooks_end=False,
                             fwd_hooks=[(temp, lambda x, hook: calls.append(("run", hook.name)))])
    assert sorted(calls) == sorted([("perma", perma), ("run", temp)])
    assert attached(model) == {perma: (1, 0), temp: (1, 0)}, "reset_hooks_end=False keeps the run's hooks"
    model.reset_hooks(including_permanent=True)
    assert_no_hooks(model)
    calls.clear()
    with torch.no_grad():
        model(tokens, attention_mask=mask)
    assert calls == []


# -------------------------------------------------------- hook object, filters, order
@given(pair=pool_models, batch=token_batches(max_len=6), data=st.data())
def test_hook_name_layer_and_ctx(pair, batch, data):
    _, model = pair
    tokens, mask = batch
    name = data.draw(st.sampled_from(sorted(model.hook_dict)), label="hook")
    seen = []

    def count(x, hook):
        assert isinstance(hook, HookPoint)
        hook.ctx["calls"] = hook.ctx.get("calls", 0) + 1
        seen.append((hook.name, hook.layer() if hook.name.startswith("blocks.") else None))

    with torch.no_grad():
        model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[(name, count)])
        model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[(name, count)])
    layer = int(name.split(".")[1]) if name.startswith("blocks.") else None
    assert seen == [(name, layer)] * 2
    point = model.hook_dict[name]
    assert point.ctx == {"calls": 2}, "ctx persists across runs unless cleared"
    if layer is None:
        with pytest.raises(ValueError):
            point.layer()
    with torch.no_grad():
        model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[(name, count)], clear_contexts=True)
    assert point.ctx == {}
    point.ctx["x"] = 1
    model.reset_hooks()  # clear_contexts=True by default
    assert point.ctx == {}


FILTERS = {
    "z": lambda n: n.endswith("attn.hook_z"),
    "resid": lambda n: "resid" in n,
    "layer 1": lambda n: n.startswith("blocks.1."),
    "norms": lambda n: ".ln" in n or n.startswith("ln_final"),
    "everything": lambda n: True,
}


@given(pair=pool_models, batch=token_batches(max_len=6), which=st.sampled_from(sorted(FILTERS)),
       how=st.sampled_from(["add_hook", "run_with_hooks", "hooks"]))
def test_filter_functions_attach_to_every_matching_hook(pair, batch, which, how):
    _, model = pair
    tokens, mask = batch
    name_filter = FILTERS[which]
    seen = []

    def record(x, hook):
        seen.append(hook.name)

    with torch.no_grad():
        if how == "add_hook":
            model.add_hook(name_filter, record)
            model(tokens, attention_mask=mask)
            model.reset_hooks()
        elif how == "run_with_hooks":
            model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[(name_filter, record)])
        else:
            with model.hooks(fwd_hooks=[(name_filter, record)]):
                model(tokens, attention_mask=mask)
    expected = [n for n in model.hook_dict if name_filter(n)]
    assert sorted(seen) == sorted(expected), "each matching hook fires exactly once"
    assert_no_hooks(model)


@given(pair=pool_models, batch=token_batches(max_len=6), data=st.data())
def test_hooks_on_one_point_chain_in_order_and_prepend_goes_first(pair, batch, data):
    _, model = pair
    tokens, mask = batch
    name = data.draw(st.sampled_from(sorted(n for n in model.hook_dict if "resid" in n or "mlp" in n)), label="hook")
    seen = {}

    def add_one(x, hook):
        seen["add_one"] = x.clone()
        return x + 1

    def double(x, hook):
        seen["double"] = x.clone()
        return x * 2

    def grab(x, hook):
        seen["last"] = x.clone()

    with torch.no_grad():
        model.add_hook(name, double)
        model.add_hook(name, grab)
        model.add_hook(name, add_one, prepend=True)  # runs first
        model(tokens, attention_mask=mask)
        model.reset_hooks()
    assert_close(seen["double"], seen["add_one"] + 1, atol=0, rtol=0)
    assert_close(seen["last"], (seen["add_one"] + 1) * 2, atol=0, rtol=0)


def test_run_with_hooks_warns_about_backward_hooks():
    _, model = pool_model(POOL[0])
    tokens = torch.randint(2, 50, (1, 4))
    with pytest.warns(UserWarning, match="model.hooks"):
        model.run_with_hooks(tokens, bwd_hooks=[("hook_embed", lambda g, hook: None)])
    assert_no_hooks(model)


# ---------------------------------------------------------------- editing resid_mid
@settings(max_examples=examples(4), phases=NO_SHRINK)
@given(spec=model_specs(), batch=token_batches(), data=st.data())
def test_editing_resid_mid_reaches_the_mlp_and_the_residual_add(spec, batch, data):
    """An edit to hook_resid_mid is an edit of the residual stream itself (TransformerLens semantics);
    an edit to hook_mlp_in only changes what the MLP reads."""
    hf, model = built(spec)
    tokens, mask = batch
    keep = mask.bool()
    layer = data.draw(st.integers(0, spec.n_layers - 1), label="layer")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    delta = 0.5 * torch.randn((*tokens.shape, spec.d_model), generator=g)
    block = hf.transformer.h[layer] if spec.family == "gpt2" else hf.model.layers[layer]
    ln2 = block.ln_2 if spec.family == "gpt2" else block.post_attention_layernorm

    def hf_mlp(x):
        return block.mlp(ln2(x))

    x = f"blocks.{layer}."
    got = {}
    with torch.no_grad():
        _, clean = model.run_with_cache(tokens, attention_mask=mask)
        mid = clean[x + "hook_resid_mid"]
        model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[
            (x + "hook_resid_mid", lambda a, hook: a + delta),
            (x + "hook_resid_post", lambda a, hook: got.__setitem__("post", a.clone()))])
        assert_close(got["post"][keep], (mid + delta + hf_mlp(mid + delta))[keep], atol=ATOL, rtol=0)
        try:
            model.set_use_hook_mlp_in(True)
            model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[
                (x + "hook_mlp_in", lambda a, hook: a + delta),
                (x + "hook_resid_post", lambda a, hook: got.__setitem__("post", a.clone()))])
        finally:
            model.set_use_hook_mlp_in(False)
        assert_close(got["post"][keep], (mid + hf_mlp(mid + delta))[keep], atol=ATOL, rtol=0)
    assert_no_hooks(model)


# ---------------------------------------------------------------- ActivationCache
@given(pair=pool_models, batch=token_batches(max_len=6), data=st.data())
def test_activation_cache_indexing_and_mapping(pair, batch, data):
    from transformer_lens.utilities import get_act_name as tl_get_act_name

    _, model = pair
    tokens, mask = batch
    n = model.cfg.n_layers
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask)
    assert isinstance(cache, ActivationCache)
    assert set(cache.keys()) == set(model.hook_dict)
    assert len(cache) == len(model.hook_dict) == len(list(cache))
    assert all(cache[k] is v for k, v in cache.items())
    assert list(cache.values()) == [cache[k] for k in cache.keys()]
    layer = data.draw(st.integers(0, n - 1), label="layer")
    for short in ("pattern", "attn_scores", "q", "k", "v", "z", "resid_pre", "resid_mid", "resid_post",
                  "attn_out", "mlp_out", "pre", "post"):
        full = tl_get_act_name(short, layer)
        assert full in cache
        assert cache[short, layer] is cache[full]
        assert cache[short, layer - n] is cache[full], "negative layers count from the end"
        assert cache[f"{short}{layer}" if "_" not in short else full] is cache[full]
    for ln in ("ln1", "ln2"):
        assert cache["scale", layer, ln] is cache[f"blocks.{layer}.{ln}.hook_scale"]
        assert cache[f"normalized{layer}{ln}"] is cache[f"blocks.{layer}.{ln}.hook_normalized"]
    assert cache["scale"] is cache["ln_final.hook_scale"]
    assert cache["embed"] is cache["hook_embed"]
    assert "blocks.0.hook_resid_pre" in cache and "not_a_hook" not in cache
    with pytest.raises(KeyError, match="hook_resid_pre"):
        cache["blocks.0.hook_resid_pr"]
    # to(device) moves every tensor
    moved = cache.to("meta")
    assert moved is cache and all(v.device.type == "meta" for v in cache.values())


@given(pair=pool_models, batch=token_batches(max_batch=1, max_len=6))
def test_remove_batch_dim(pair, batch):
    _, model = pair
    tokens, mask = batch
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask)
        _, direct = model.run_with_cache(tokens, attention_mask=mask, remove_batch_dim=True)
    full = {k: v.clone() for k, v in cache.items()}
    assert cache.remove_batch_dim() is cache
    for name, value in full.items():
        assert_close(cache[name], value[0], atol=0, rtol=0)
        assert_close(direct[name], value[0], atol=0, rtol=0)
    two = torch.cat([tokens, tokens])
    with torch.no_grad():
        _, batched = model.run_with_cache(two)
    with pytest.raises(ValueError, match="batch"):
        batched.remove_batch_dim()


@given(pair=pool_models, batch=token_batches(max_len=6), data=st.data())
def test_names_filter_keeps_exactly_what_was_asked(pair, batch, data):
    _, model = pair
    tokens, mask = batch
    names = sorted(model.hook_dict)
    with torch.no_grad():
        logits, full = model.run_with_cache(tokens, attention_mask=mask)
    kind = data.draw(st.sampled_from(["str", "list", "tuple", "callable"]), label="kind")
    if kind == "str":
        name_filter = data.draw(st.sampled_from(names), label="name")
        expected = {name_filter}
    elif kind in ("list", "tuple"):
        chosen = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=5), label="names")
        name_filter = chosen if kind == "list" else tuple(chosen)
        expected = set(chosen)
    else:
        suffix = data.draw(st.sampled_from(["hook_pattern", "hook_scale", "resid_post", "hook_q", "nothing"]))
        name_filter = lambda n: n.endswith(suffix)  # noqa: E731
        expected = {n for n in names if n.endswith(suffix)}
    with torch.no_grad():
        out, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=name_filter)
    assert set(cache.keys()) == expected
    # a filtered run fuses the attention of layers whose pattern it does not keep: equal to float error
    for name in expected:
        assert_close(cache[name], full[name], atol=1e-5, rtol=1e-5)
    assert_close(out, logits, atol=1e-5, rtol=1e-5)
    _, as_dict = model.run_with_cache(tokens, attention_mask=mask, names_filter=name_filter,
                                      return_cache_object=False)
    assert isinstance(as_dict, dict) and set(as_dict) == expected
    assert_no_hooks(model)


NAMES_IN_BLOCKS = ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_in", "attn_in",
                   "q_input", "k_input", "v_input", "q", "k", "v", "z", "rot_q", "rot_k", "result",
                   "attn_scores", "pattern", "attn", "pre", "pre_linear", "post",
                   "attn_logits", "key", "query", "value", "mlp_pre", "mlp_post"]


@given(data=st.data())
def test_get_act_name_agrees_with_transformer_lens(data):
    from transformer_lens.utilities import get_act_name as tl_get_act_name

    layer = data.draw(st.integers(0, 47), label="layer")
    form = data.draw(st.sampled_from(["block", "block_shorthand", "norm", "norm_shorthand", "top", "full"]))
    if form == "block":
        args = (data.draw(st.sampled_from(NAMES_IN_BLOCKS)), layer)
    elif form == "block_shorthand":  # TransformerLens parses shorthand only for names without "_"
        args = (data.draw(st.sampled_from([n for n in NAMES_IN_BLOCKS if "_" not in n])) + str(layer),)
    elif form == "norm":
        args = (data.draw(st.sampled_from(["scale", "normalized"])), layer, data.draw(st.sampled_from(["ln1", "ln2"])))
    elif form == "norm_shorthand":
        args = (data.draw(st.sampled_from(["scale", "normalized"])) + str(layer)
                + data.draw(st.sampled_from(["ln1", "ln2"])),)
    elif form == "top":
        args = (data.draw(st.sampled_from(["embed", "pos_embed", "scale", "normalized"])),)
    else:
        args = (data.draw(st.sampled_from(["hook_embed", f"blocks.{layer}.attn.hook_z", "ln_final.hook_scale"])),)
    assert get_act_name(*args) == tl_get_act_name(*args)
