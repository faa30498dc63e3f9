"""Compiled decode: each new token runs a torch.compile'd graph over a static preallocated KV cache.

Compiling costs tens of seconds on a 2-core CPU, so this file compiles as little as it can: one
model, the unhooked decode graph once (in the prompt's padded shape and the token step's), the
steered one once, and checks everything else against those. The unhooked graph is compiled by
inductor without dynamo (runtime/precompiled.py), counted by `precompiled.stats`; hooked steps go
through torch.compile, and dynamo's recompile error (`error_on_recompile`) proves that new hook
functions at the same point reuse the compiled code. Batch sizes, long prompts and sampling:
tests/test_batched_decode.py.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from fxhook.runtime import precompiled
from test_generate import LLAMA, greedy, hf_greedy, padded_batch, sharpened


@pytest.fixture(scope="module")
def llama():
    torch._dynamo.reset()
    counters.clear()
    return sharpened(LLAMA)


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_compiled_decode_equals_eager_and_hf_without_recompiling(llama):
    hf, model = llama
    tokens, mask = padded_batch(21)
    eager = greedy(model, tokens, mask, 8)
    assert eager.tolist() == hf_greedy(hf, tokens, mask, 8).tolist()
    before = precompiled.stats["compiled"]
    assert greedy(model, tokens, mask, 8, use_compiled_decode=True).tolist() == eager.tolist()
    # the prompt (padded to 8 positions) and one step for every token, compiled straight from inductor:
    # no dynamo graph at all without hooks
    assert precompiled.stats["compiled"] == before + 2
    graphs = compiled_graphs()
    assert graphs == 0
    # another prompt length and more new tokens: the same static shapes (the prompt's padded shape, the
    # cache bucket), no recompile
    other, other_mask = padded_batch(22, lengths=(3, 8))
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = greedy(model, other, other_mask, 12, use_compiled_decode=True)
        assert out.tolist() == greedy(model, other, other_mask, 12).tolist()
        assert precompiled.stats["compiled"] == before + 2
        # embeddings input: the prompt from the embeddings (its own compiled graph), then the same token step
        new = greedy(model, model.W_E[tokens], mask, 8, use_compiled_decode=True, return_type="tokens")
        assert new.tolist() == eager[:, tokens.shape[1]:].tolist()
        # output_logits: the compiled steps' logits equal the eager ones
        a, b = (model.generate(tokens, max_new_tokens=5, do_sample=False, stop_at_eos=False, verbose=False,
                               attention_mask=mask, output_logits=True, use_compiled_decode=c) for c in (True, False))
        torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), atol=1e-4, rtol=0)
        # model.compile() makes compiled decode the default
        try:
            model.compile()
            assert greedy(model, tokens, mask, 8).tolist() == eager.tolist()
        finally:
            model.compile(False)
    assert compiled_graphs() == graphs and precompiled.stats["compiled"] == before + 3


def test_compiled_decode_reads_weights_edited_in_place(llama):
    """The compiled step reads the parameters' storage: an in-place edit (weight surgery, a
    processing pass) changes compiled generation exactly as it changes eager generation."""
    _, model = llama
    tokens, mask = padded_batch(24)
    weight = model.hf_model.model.layers[0].mlp.down_proj.weight
    kept = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(-4.0)
        runs = [model.generate(tokens, max_new_tokens=5, do_sample=False, stop_at_eos=False, verbose=False,
                               attention_mask=mask, output_logits=True, use_compiled_decode=c) for c in (True, False)]
        torch.testing.assert_close(torch.stack(runs[0].logits), torch.stack(runs[1].logits), atol=1e-4, rtol=0)
    finally:
        with torch.no_grad():
            weight.copy_(kept)
    unedited = model.generate(tokens, max_new_tokens=5, do_sample=False, stop_at_eos=False, verbose=False,
                              attention_mask=mask, output_logits=True, use_compiled_decode=True)
    assert not torch.allclose(torch.stack(unedited.logits), torch.stack(runs[0].logits), atol=1e-3)


def test_hooks_stay_live_under_compiled_decode(llama):
    _, model = llama
    tokens, mask = padded_batch(23)
    name = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    g = torch.Generator().manual_seed(1)
    vectors = [3.0 * torch.randn(model.cfg.d_model, generator=g) for _ in range(2)]
    plain = greedy(model, tokens, mask, 6)
    greedy(model, tokens, mask, 6, use_compiled_decode=True)  # the unhooked step is compiled first
    results, graphs = [], compiled_graphs()
    for i, vector in enumerate(vectors):  # a hook added after compiling, then another function at the same point
        seen: list[int] = []

        def steer(x, hook, vector=vector, seen=seen):
            seen.append(x.shape[1])
            return x + vector

        # the second hook function reuses the code compiled for the first (hooks run outside the graph)
        with model.hooks(fwd_hooks=[(name, steer)]), torch._dynamo.config.patch(error_on_recompile=i > 0):
            eager = greedy(model, tokens, mask, 6)
            seen.clear()
            compiled = greedy(model, tokens, mask, 6, use_compiled_decode=True)
        assert seen == [tokens.shape[1]] + [1] * 5  # the hook ran at prefill and at every compiled step
        assert compiled.tolist() == eager.tolist() != plain.tolist()
        results.append(compiled.tolist())
    assert compiled_graphs() > graphs  # the steered steps ran compiled code (split where the hook runs)
    assert results[0] != results[1]  # each hook's own edit, not one baked into the compiled code
    # hooks removed: the unhooked compiled step again, no steering left behind
    before = precompiled.stats["compiled"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert greedy(model, tokens, mask, 6, use_compiled_decode=True).tolist() == plain.tolist()
    assert precompiled.stats["compiled"] == before
