"""The last-position pass (passes/last_position.py): a prompt's step runs the final norm and the unembedding for
its last position only and gives the HF model's own logits there, in every family; hooks after the last block
never see the sliced values.

GPT-2, Llama, the families of tests/families.py (GPT-J ends as GPT-NeoX does) and the families of tests/family_models.py whose final side
differs run the step eagerly (the pass's graph is what compiled decode compiles; test_batched_decode.py
compares compiled and eager generation). One compiled prompt (Gemma 2: its final soft cap follows the unembedding) runs the padded,
precompiled path.
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from family_models import FIXED_BIAS, FamilySpec, _specials, build_family_model
from fxhook import HookedTransformer
from fxhook.core.graph import copy_graph_module
from fxhook.passes.last_position import last_position_logits
from fxhook.pipeline import DecodeKind, GraphSpec, PassContractError, forward_passes, run_passes
from fxhook.pipeline.build import logits_passes
from models import VOCAB, build_hf_model, left_padded_example, positions_for, stratum_example, stratum_fields

# family -> where its test model is built: GPT-2 and Llama, families of tests/families.py (parallel blocks,
# partial rotary, learned offsets), and the ends that differ (Gemma 2's (1 + w) final norm and logit soft cap,
# OLMo 2's post-norms). Gemma, Qwen2, Qwen3, Mistral, Mixtral and GPT-J end as one of these does.
FAMILIES = {**{f: "models" for f in ("gpt2", "llama", "gpt_neox", "opt", "phi")},
            **{f: "family_models" for f in ("gemma2", "olmo2")}}
BATCH, LENGTH, MAX_LEN = 2, 7, 16


def _family_spec(family: str) -> FamilySpec:
    fields = stratum_fields(family, "A")
    fields.pop("variant")
    fields["bias"] = FIXED_BIAS.get(family, fields["bias"])
    return FamilySpec(family=family, d_head=8, d_mlp=40, seed=11, **fields, **_specials(family, "A", 8))


@functools.lru_cache(maxsize=None)
def _pair(family: str) -> tuple[torch.nn.Module, HookedTransformer]:
    hf = (build_hf_model(stratum_example(family, "A", seed=11)) if FAMILIES[family] == "models"
          else build_family_model(_family_spec(family)))
    return hf, HookedTransformer.from_pretrained_no_processing(hf_model=hf)


def _hf_logits(hf: torch.nn.Module, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=tokens, attention_mask=mask, position_ids=positions_for(mask)).logits


def _logits_positions(gm: fx.GraphModule, *args: torch.Tensor) -> set[int]:
    """The position counts of every [b, pos, vocab] value the graph computes (shape propagation)."""
    ShapeProp(gm).propagate(*args)
    counts = set()
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        shape = getattr(meta, "shape", None)
        if shape is not None and len(shape) == 3 and shape[-1] == VOCAB:
            counts.add(shape[1])
    return counts


def _static_args(model: HookedTransformer, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The static decode graph's inputs for a prompt written into an empty cache (kv_cache.py's convention)."""
    cache = model.decoder.init_static_kv_cache(tokens.shape[0], MAX_LEN)
    full_mask = torch.zeros((tokens.shape[0], MAX_LEN), dtype=mask.dtype)
    full_mask[:, :tokens.shape[1]] = mask
    return (tokens, positions_for(mask), full_mask, *cache.keys, *cache.values, torch.arange(tokens.shape[1]))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prompt_step_unembeds_only_the_last_position_and_gives_hf_logits(family):
    hf, model = _pair(family)
    tokens, mask = left_padded_example(seed=5, batch=BATCH, length=LENGTH)  # row 1 left-padded by 3
    expected = _hf_logits(hf, tokens, mask)[:, -1:]
    decoder = model.decoder
    got = decoder.run_static(decoder.init_static_kv_cache(BATCH, MAX_LEN), tokens, mask, last_position=True)
    assert got.shape == (BATCH, 1, VOCAB)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # inside the graph no logits of other positions exist; the graph for every position has them
    spec = GraphSpec.from_cfg(model.cfg, live_hooks=frozenset())
    sliced = model.decode_graph_for(spec, DecodeKind(static=True, last_position=True))
    full = model.decode_graph_for(spec, DecodeKind(static=True))
    with torch.no_grad():
        assert _logits_positions(sliced, *_static_args(model, tokens, mask)) == {1}
        assert LENGTH in _logits_positions(full, *_static_args(model, tokens, mask))


def test_pass_alone_on_a_forward_graph():
    """The pass on the captured forward graph (markers), then the forward passes: HF's last logits."""
    hf, model = _pair("llama")
    tokens, mask = left_padded_example(seed=6, batch=BATCH, length=LENGTH)
    spec = GraphSpec.from_cfg(model.cfg)
    gm = last_position_logits(copy_graph_module(model.graphs.captured()))
    gm = run_passes(gm, forward_passes(spec, model.cfg, model.adapter, model.graphs.make_point))
    with torch.no_grad():
        got = gm(tokens, mask)
    torch.testing.assert_close(got, _hf_logits(hf, tokens, mask)[:, -1:], atol=1e-5, rtol=0)
    # the last block's resid_post hook point still sees every position; the final norm's sees the last one
    seen = {}
    names = ("blocks.1.hook_resid_post", "ln_final.hook_normalized")
    for name in names:
        gm.get_submodule(name).add_hook(lambda x, hook: seen.__setitem__(hook.name, tuple(x.shape)))
    try:
        with torch.no_grad():
            gm(tokens, mask)
    finally:
        for name in names:
            gm.get_submodule(name).remove_hooks()
    d = model.cfg.d_model
    assert seen == {"blocks.1.hook_resid_post": (BATCH, LENGTH, d), "ln_final.hook_normalized": (BATCH, 1, d)}


def test_pass_refuses_a_graph_without_residual_markers():
    _, model = _pair("llama")
    spec = GraphSpec.from_cfg(model.cfg)
    hooked = run_passes(copy_graph_module(model.graphs.captured()),
                        forward_passes(spec, model.cfg, model.adapter, model.graphs.make_point))  # markers gone
    with pytest.raises(ValueError, match="hook_resid_post markers"):
        last_position_logits(hooked)
    # declared in the pipeline for graphs before their hook points: a hooked graph is refused by name
    with pytest.raises(PassContractError, match="last_position_logits"):
        run_passes(hooked, logits_passes(DecodeKind(static=True, last_position=True)))
    assert logits_passes(DecodeKind(static=True)) == []


def test_hooks_after_the_last_block_see_the_whole_prompt():
    """A hooked prompt runs the graph of every position; asking for the sliced one under a hook is refused
    and leaves the cache empty."""
    _, model = _pair("llama")
    tokens, mask = left_padded_example(seed=7, batch=BATCH, length=LENGTH)
    seen = []
    decoder = model.decoder
    with model.hooks(fwd_hooks=[("ln_final.hook_normalized", lambda x, hook: seen.append(tuple(x.shape))),
                                ("unembed.hook_out", lambda x, hook: seen.append(tuple(x.shape)))]):
        logits = decoder.prefill_static(decoder.init_static_kv_cache(BATCH, MAX_LEN), tokens, mask)
        cache = decoder.init_static_kv_cache(BATCH, MAX_LEN)
        with pytest.raises(ValueError, match="last position only"):
            decoder.run_static(cache, tokens, mask, last_position=True)
        assert cache.length == 0
    assert seen == [(BATCH, LENGTH, model.cfg.d_model), (BATCH, LENGTH, VOCAB)]
    assert logits.shape == (BATCH, VOCAB)


def test_a_block_hook_keeps_the_last_position_graph():
    """Only hooks after the last block would see one position: a block's hook runs in the sliced graph, sees
    every position, and its edit reaches the last position's logits as in the full graph."""
    _, model = _pair("llama")
    tokens, mask = left_padded_example(seed=7, batch=BATCH, length=LENGTH)
    decoder, seen = model.decoder, []

    def edit(x, hook):
        seen.append(tuple(x.shape))
        return x * 1.5
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", edit)]):
        full = decoder.run_static(decoder.init_static_kv_cache(BATCH, MAX_LEN), tokens, mask)
        last = decoder.run_static(decoder.init_static_kv_cache(BATCH, MAX_LEN), tokens, mask, last_position=True)
    plain = decoder.run_static(decoder.init_static_kv_cache(BATCH, MAX_LEN), tokens, mask)
    assert seen == [(BATCH, LENGTH, model.cfg.d_model)] * 2
    assert last.shape == (BATCH, 1, VOCAB)
    torch.testing.assert_close(last[:, 0], full[:, -1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full[:, -1], plain[:, -1], atol=1e-3)  # the edit moved them


def test_compiled_prompt_equals_hf_on_gemma2():
    """The padded, precompiled prompt (its step unembeds one position, then the final soft cap)."""
    hf, model = _pair("gemma2")
    tokens, mask = left_padded_example(seed=8, batch=BATCH, length=LENGTH)
    decoder = model.decoder
    with torch.no_grad():
        cache = decoder.static_kv_cache_for(BATCH, LENGTH, 2)
        got = decoder.prefill_static(cache, tokens, mask)
    assert cache.filler == 1  # 7 tokens ran padded to the compiled shape of 8
    torch.testing.assert_close(got, _hf_logits(hf, tokens, mask)[:, -1], atol=1e-5, rtol=0)
