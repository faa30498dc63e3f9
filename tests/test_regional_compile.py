"""Regional compilation (passes/regions.py, runtime/regional.py): each distinct block compiled once.

- the split pass alone: the split graph run eagerly gives the HF model's logits and the unsplit graph's
  activations, every block has one signature, and a hooked point cuts only its own block;
- compiled (torch's "aot_eager" backend: dynamo and AOT autograd, the steps a split could break):
  regional and whole-graph outputs equal eager, logits and cached activations;
- counted: a new hook set compiles only the regions it changed (a backend that counts dynamo's graphs);
- inductor in two fresh processes sharing a cache folder: the first saves one precompiled artifact per
  distinct region, the second loads them and neither traces (dynamo) nor lowers (inductor) anything,
  counted, and still equals eager, for another batch and length too;
- the artifacts' keys (runtime/persisted_regions.py) change with what the guards do not check.
"""
from __future__ import annotations

import functools
import inspect
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
from fxhook.runtime.graphs import CompileOptions
from fxhook.runtime.persisted_regions import FOLDER, artifact_key, persistable, python_sources, static_view
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
    other = torch.randint(2, 90, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager, eager_other = model(tokens), model(other)
        model.compile()
        compiled, compiled_other = model(tokens), model(other)
    stats = model.graphs.regions.stats
    print(json.dumps({{"saved": stats["saved"], "loaded": stats["loaded"], "regions": stats["compiled"],
                      "traced": counters["stats"]["unique_graphs"],
                      "lowered": counters["inductor"]["fxgraph_cache_miss"],
                      "diff": max((compiled - eager).abs().max().item(),
                                  (compiled_other - eager_other).abs().max().item())}}))
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
    # the embedding side, one block for both, the final side: each traced and saved once; the other
    # batch and length run from the same code (dynamic sizes)
    assert first["regions"] == 3 and first["saved"] == 3 and first["loaded"] == 0 and first["traced"] == 3
    assert len(list((tmp_path / FOLDER).glob("*.bin"))) == 3
    second = _child(tmp_path)
    assert second["regions"] == 3 and second["loaded"] == 3 and second["saved"] == 0
    assert second["traced"] == 0 and second["lowered"] == 0  # dynamo traced nothing, inductor built nothing
    assert first["diff"] < 1e-5 and second["diff"] < 1e-5


def test_artifact_keys_change_with_what_guards_do_not_check():
    options = CompileOptions()
    key = artifact_key("a" * 64, options)
    assert key == artifact_key("a" * 64, CompileOptions())  # the same region and settings: the same files
    assert key != artifact_key("b" * 64, options)  # another region graph
    assert key != artifact_key("a" * 64, CompileOptions(dynamic=False))  # other compile settings
    with torch._inductor.config.patch(cpp_wrapper=True):  # inductor's configuration
        assert key != artifact_key("a" * 64, options)
    with torch._dynamo.config.patch(specialize_int=True):  # dynamo's
        assert key != artifact_key("a" * 64, options)
    assert key != artifact_key("a" * 64, options, ["def f(x):\n    return x\n"])  # a called function's source
    assert persistable(options) and not persistable(CompileOptions(backend="aot_eager"))
    assert not persistable(CompileOptions(mode="reduce-overhead")) and not persistable(CompileOptions(dynamic=None))


def test_static_view_marks_an_alias_not_the_model_tensor():
    buffer, parameter = torch.arange(6.0), torch.nn.Parameter(torch.ones(3))
    alias = static_view(buffer)
    assert alias is not buffer and alias.data_ptr() == buffer.data_ptr()
    assert alias._dynamo_static_indices == {0} and not hasattr(buffer, "_dynamo_static_indices")
    buffer += 1  # an in-place edit of the model's tensor is seen through the alias
    assert torch.equal(alias, buffer)
    assert static_view(parameter) is parameter  # dynamo keeps a parameter's sizes static already


def test_a_region_calling_python_code_is_keyed_by_its_source():
    from fxhook.core import attention_math

    graph = torch.fx.Graph()
    q, k, v = (graph.placeholder(n) for n in "qkv")
    graph.output(graph.call_function(attention_math.fused_attention, (q, k, v, None, 1.0, 1)))
    region = torch.fx.GraphModule(torch.nn.Module(), graph)
    assert python_sources(region) == [inspect.getsource(attention_math)]
    sdpa = torch.fx.Graph()
    q, k, v = (sdpa.placeholder(n) for n in "qkv")
    sdpa.output(sdpa.call_function(torch.nn.functional.scaled_dot_product_attention, (q, k, v)))
    assert python_sources(torch.fx.GraphModule(torch.nn.Module(), sdpa)) == []  # a torch op: torch's version


def test_an_artifact_traced_through_changed_source_is_stale():
    from torch._dynamo.package import InlinedSource, SourceInfo

    from fxhook.core import attention_math
    from fxhook.runtime.persisted_regions import _sources_unchanged

    traced = SourceInfo(inlined_sources=set())
    traced.add_code(attention_math.fused_attention.__code__)  # as dynamo records what it traced through
    (source,) = traced.inlined_sources

    class Artifact:  # what the check reads of a loaded function
        def __init__(self, sources: set):
            self.sources = sources

        def source_info(self) -> SourceInfo:
            return SourceInfo(inlined_sources=self.sources)

    assert _sources_unchanged(Artifact({source}))
    edited = InlinedSource(source.module, source.firstlineno, source.lastlineno, "0" * 64, source.content)
    assert not _sources_unchanged(Artifact({edited}))  # the function's lines hash otherwise now
    gone = InlinedSource("fxhook.no_such_module", 1, 2, source.checksum, "")
    assert not _sources_unchanged(Artifact({gone}))
