"""Regional compilation (passes/regions.py, runtime/regional.py): each distinct block compiled once.

- the split pass alone: the split graph run eagerly gives the HF model's logits and the unsplit graph's
  activations, every block has one signature, and a hooked point cuts only its own block;
- compiled (torch's "aot_eager" backend: dynamo and AOT autograd, the steps a split could break):
  regional and whole-graph outputs equal eager, logits and cached activations;
- counted: a new hook set compiles only the regions it changed (a backend that counts dynamo's graphs);
- inductor in two fresh processes sharing a cache folder: the second compiles nothing (inductor's
  FX-graph cache hits, counted) and still equals eager.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from test_compile import CountingBackend
from torch.testing import assert_close

from fxhook import HookedTransformer, pipeline
from fxhook.passes.regions import HOOK_REGIONS, LIFTED, region_signature, regions_of
from fxhook.pipeline import GraphSpec
from models import ModelSpec, build_hf_model

TOL = dict(atol=1e-5, rtol=1e-5)
LLAMA = ModelSpec("llama", 3, 4, 2, 8, 40, False, False, 7)
LLAMA_2 = ModelSpec("llama", 2, 4, 2, 8, 40, False, False, 7)  # the compiled tests: fewer layers compile faster
GPT2 = ModelSpec("gpt2", 3, 4, 4, 8, 40, True, True, 3)




@pytest.fixture(scope="module")
def llama():
    """One unprocessed model for the tests that leave it as they found it (eager, no hooks)."""
    return HookedTransformer.from_pretrained_no_processing(hf_model=build_hf_model(LLAMA))


def _padded(batch: int = 3, length: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, 90, (batch, length), generator=g)
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0  # left padding
    return tokens, mask


def _run_split(split: torch.fx.GraphModule, gm: torch.fx.GraphModule, *args: torch.Tensor):
    tensors = [functools.reduce(getattr, path.split("."), gm) for path in split.meta[LIFTED]]
    return split(*args, *tensors)


# ------------------------------------------------------------------ the split pass alone
# HF's GPT-2 numbers positions from 0 whatever the padding (fxhook and TransformerLens skip the pads): unpadded
@pytest.mark.parametrize("family, padded", [("llama", True), ("gpt2", False)])
def test_split_regions_matches_hf_and_shares_block_signature(family, padded, llama):
    model = llama if family == "llama" else HookedTransformer.from_pretrained_no_processing(
        hf_model=build_hf_model(GPT2))
    hf, spec = model.hf_model, LLAMA if family == "llama" else GPT2
    tokens, mask = _padded()
    if not padded:
        mask = torch.ones_like(mask)
    names = frozenset(model.hook_dict)
    entry = model.graphs.forward(GraphSpec.from_cfg(model.cfg, live_hooks=frozenset(), outputs=names))
    split = pipeline.build_regions(entry.gm, model.adapter, model.cfg.n_layers)
    with torch.no_grad():
        logits, values = _run_split(split, entry.gm, tokens, mask)
        want_logits, want_values = entry.gm(tokens, mask)
        hf_logits = hf(tokens, attention_mask=mask).logits
    assert_close(logits[mask.bool()], hf_logits[mask.bool()], **TOL)
    assert_close(logits, want_logits, atol=0, rtol=0)
    for name, got, want in zip(entry.gm.meta[pipeline.ACTIVATION_NAMES], values, want_values):
        assert_close(got, want, atol=0, rtol=0, msg=name)
    signatures = [region_signature(sub) for _, sub in regions_of(split)]
    # the embedding side, one signature for every block, the final side
    assert len(signatures) == spec.n_layers + 2
    assert len(set(signatures[1:-1])) == 1 and len(set(signatures)) == 3


def test_split_regions_cuts_only_the_hooked_block(llama):
    model = llama
    hooked = "blocks.1.hook_mlp_out"
    entry = model.graphs.forward(GraphSpec.from_cfg(model.cfg, live_hooks=frozenset({hooked})))
    split = pipeline.build_regions(entry.gm, model.adapter, model.cfg.n_layers)
    assert len(split.meta[HOOK_REGIONS]) == 1
    (hook_region,) = split.meta[HOOK_REGIONS]
    region = split.get_submodule(hook_region)
    called = [region.get_submodule(n.target) for n in region.graph.nodes if n.op == "call_module"]
    assert called == [model.hook_dict[hooked]]  # the model's own point, the only thing its region does
    signatures = [region_signature(sub) for _, sub in regions_of(split)]
    # embedding side, block 0, block 1 before and after the hook, block 2, final side
    assert len(signatures) == 6
    assert signatures[1] == signatures[4] and len({signatures[1], signatures[2], signatures[3]}) == 3
    tokens, mask = _padded()
    seen = []
    model.add_hook(hooked, lambda x, hook: seen.append(x.clone()) or x * 0.5)
    try:
        with torch.no_grad():
            got = _run_split(split, entry.gm, tokens, mask)
            want = entry.gm(tokens, mask)
    finally:
        model.reset_hooks()
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])
    assert_close(got, want, atol=0, rtol=0)


# ------------------------------------------------------------------ compiled
def test_regional_and_whole_graph_compiled_match_eager_logits_and_cache():
    model = HookedTransformer.from_pretrained(hf_model=build_hf_model(LLAMA_2))
    tokens, mask = _padded()
    with torch.no_grad():
        eager_logits, eager_cache = model.run_with_cache(tokens, attention_mask=mask)
        for regional in (True, False):
            compiled_before = model.graphs.regions.stats["compiled"] if model.graphs.regions else 0
            model.compile(backend="aot_eager", regional=regional)
            logits = model(tokens, attention_mask=mask)
            _, cache = model.run_with_cache(tokens, attention_mask=mask)
            assert_close(logits, eager_logits, **TOL)
            assert set(cache.keys()) == set(eager_cache.keys())
            for name in cache.keys():
                assert_close(cache[name], eager_cache[name], **TOL, msg=f"{name} (regional={regional})")
            compiled_regions = model.graphs.regions.stats["compiled"] - compiled_before
            assert compiled_regions == (5 if regional else 0)  # 3 regions, then 2 more for the cache's outputs
            if regional:  # another shape runs from the same code (sizes passed between regions are dynamic)
                t = torch.randint(2, 90, (2, 11))
                assert_close(model(t).log_softmax(-1), model.hf_model(t).logits.log_softmax(-1), atol=1e-4, rtol=1e-4)
        model.compile(False)


def test_new_hook_set_compiles_only_the_changed_block(llama):
    model = llama
    tokens, mask = _padded()
    backend = CountingBackend()  # a new backend: the model's compiled regions are keyed by it, so all compile anew

    def halve(x, hook):
        return x * 0.5

    def compiled_regions() -> int:
        return model.graphs.regions.stats["compiled"]
    try:
        with torch.no_grad():
            model.compile(backend=backend)
            plain = model(tokens, attention_mask=mask)
            first, regions = backend.graphs, compiled_regions()
            assert first == 3  # the embedding side, one block for all three, the final side
            hooked = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[("blocks.1.hook_mlp_out", halve)])
            assert backend.graphs - first == 2  # block 1, before and after the hook; nothing else
            assert compiled_regions() - regions == 2
            # the same point on another block: its two halves are the same code, nothing compiles
            other = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[("blocks.2.hook_mlp_out", halve)])
            assert backend.graphs - first == 2 and compiled_regions() - regions == 2
    finally:
        model.compile(False)
    with torch.no_grad():
        assert_close(hooked, model.run_with_hooks(tokens, attention_mask=mask,
                                                  fwd_hooks=[("blocks.1.hook_mlp_out", halve)]), **TOL)
        assert_close(other, model.run_with_hooks(tokens, attention_mask=mask,
                                                 fwd_hooks=[("blocks.2.hook_mlp_out", halve)]), **TOL)
        assert_close(plain, model(tokens, attention_mask=mask), **TOL)
    assert not torch.allclose(hooked, plain)


def test_regional_must_be_a_bool(llama):
    with pytest.raises(TypeError, match="regional must be True or False"):
        llama.compile(regional="yes")
    assert llama.compile_options is None  # refused: the model is left as it was


# ------------------------------------------------------------------ across processes (inductor)
_CHILD = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from torch._dynamo.utils import counters
    from fxhook import HookedTransformer
    from models import ModelSpec, build_hf_model
    model = HookedTransformer.from_pretrained_no_processing(hf_model=build_hf_model(ModelSpec(*{spec!r})))
    tokens = torch.randint(2, 90, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(tokens)
        model.compile()
        compiled = model(tokens)
    print(json.dumps({{"hit": counters["inductor"]["fxgraph_cache_hit"],
                      "miss": counters["inductor"]["fxgraph_cache_miss"],
                      "regions": model.graphs.regions.stats["compiled"],
                      "diff": (compiled - eager).abs().max().item()}}))
""")


def _child(cache: Path) -> dict:
    spec = ModelSpec("llama", 2, 2, 1, 8, 16, False, False, 5)
    code = _CHILD.format(tests=str(Path(__file__).parent), spec=tuple(spec.__dict__.values()))
    # -O0: the test is about what is reused, not how fast the kernels run (both processes build alike)
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache), TORCHINDUCTOR_DEBUG_COMPILE="1", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_reuses_compiled_regions(tmp_path):
    first = _child(tmp_path)
    assert first["regions"] == 3 and first["miss"] == 3 and first["hit"] == 0
    second = _child(tmp_path)
    assert second["regions"] == 3 and second["miss"] == 0 and second["hit"] == 3
    assert first["diff"] < 1e-5 and second["diff"] < 1e-5
