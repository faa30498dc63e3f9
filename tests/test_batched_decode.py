"""Compiled prompt and batched compiled decode: the prompt runs compiled into the static KV cache (padded on
the left to one of a few shapes, chunked when long), then each token runs the compiled step, at any
batch size with left padding.

Every compile costs seconds here, so the file compiles few shapes: per batch size the prompt's shape and
the token step's, each checked against eager generation and HF's `generate`. The model is the tiny
"sharpened" Llama of test_generate (token-for-token comparisons are robust on it) with a 128-position
context, so a prompt longer than the chunk (64) fits. The real-model check uses SmolLM2's own weights,
tokenizer and vocabulary cut to its first two blocks (compiling all 30 takes minutes on this CPU): the
compiled code per block is the same for every block.
"""
from __future__ import annotations

import pytest
import torch

from fxhook import HookedTransformer
from fxhook.runtime import precompiled
from fxhook.runtime.decode import PREFILL_SIZES, prefill_plan
from models import build_hf_model
from test_generate import EMBED_SCALE, LLAMA, LOGIT_SCALE, greedy, hf_greedy, padded_batch

N_CTX = 128


@pytest.fixture(scope="module")
def llama():
    hf = build_hf_model(LLAMA, n_ctx=N_CTX)
    with torch.no_grad():  # as test_generate.sharpened: the input decides, argmaxes well separated
        hf.get_input_embeddings().weight.mul_(EMBED_SCALE)
        hf.model.norm.weight.mul_(LOGIT_SCALE)
    return hf, HookedTransformer.from_pretrained_no_processing(hf_model=hf)


def ragged(seed: int, batch: int, longest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch whose first row has `longest` tokens and the others 1 to `longest`."""
    g = torch.Generator().manual_seed(seed)
    lengths = [longest] + torch.randint(1, longest + 1, (batch - 1,), generator=g).tolist()
    return padded_batch(seed, lengths=tuple(lengths))


def test_prefill_plan_pads_to_few_shapes():
    # worked by hand: pad up to the next size (each at most 1.5x the one before); beyond 64 the remainder
    # first, then chunks of 64
    assert PREFILL_SIZES == (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
    assert prefill_plan(1) == (0, [1])
    assert prefill_plan(2) == (0, [2])
    assert prefill_plan(5) == (1, [6])
    assert prefill_plan(8) == (0, [8])
    assert prefill_plan(9) == (3, [12])
    assert prefill_plan(33) == (15, [48])
    assert prefill_plan(64) == (0, [64])
    assert prefill_plan(65) == (0, [1, 64])
    assert prefill_plan(70) == (0, [6, 64])
    assert prefill_plan(71) == (1, [8, 64])
    assert prefill_plan(200) == (0, [8, 64, 64, 64])
    for length in range(1, 300):
        padding, chunks = prefill_plan(length)
        assert sum(chunks) == padding + length and set(chunks) <= set(PREFILL_SIZES)
        assert padding < chunks[0]  # the filler sits in the first chunk only
        assert 2 * padding < chunks[0]  # less filler than prompt in that chunk
    with pytest.raises(ValueError, match="at least one position"):
        prefill_plan(0)


@pytest.mark.parametrize("batch, longest", [(1, 6), (8, 70), (32, 11)], ids=["batch1", "batch8-chunked", "batch32"])
def test_compiled_prompt_and_decode_equal_eager_and_hf(llama, batch, longest):
    hf, model = llama
    tokens, mask = ragged(batch, batch, longest)
    expected = hf_greedy(hf, tokens, mask, 8)
    assert greedy(model, tokens, mask, 8).tolist() == expected.tolist()
    before = precompiled.stats["compiled"]
    assert greedy(model, tokens, mask, 8, use_compiled_decode=True).tolist() == expected.tolist()
    # the prompt's shape(s) and the token step, each compiled once (70 tokens: chunks of 8 and 64)
    assert precompiled.stats["compiled"] - before == len(set(prefill_plan(longest)[1]) | {1})
    # another prompt of another length in the same padded shape and cache bucket reuses every compiled piece
    other, other_mask = ragged(batch + 100, batch, longest - 1)
    assert prefill_plan(longest - 1)[1] == prefill_plan(longest)[1]
    before = precompiled.stats["compiled"]
    out = greedy(model, other, other_mask, 8, use_compiled_decode=True)
    assert out.tolist() == hf_greedy(hf, other, other_mask, 8).tolist()
    assert precompiled.stats["compiled"] == before


def test_compiled_step_distributions_and_seeded_samples_equal_eager(llama):
    _, model = llama
    tokens, mask = ragged(8, 8, 70)  # the shapes compiled above (batch 8): nothing new to compile
    runs = {}
    for compiled in (False, True):
        g = torch.Generator().manual_seed(7)
        runs[compiled] = model.generate(tokens, attention_mask=mask, max_new_tokens=8, do_sample=True,
                                        temperature=3.0, top_k=20, stop_at_eos=False, verbose=False, generator=g,
                                        output_logits=True, use_compiled_decode=compiled)
    eager, compiled = runs[False], runs[True]
    # the distribution sampled at each step: compiled equals eager (a step after the same tokens)
    torch.testing.assert_close(torch.stack(compiled.logits), torch.stack(eager.logits), atol=1e-4, rtol=0)
    assert compiled.sequences.tolist() == eager.sequences.tolist()
    # it did sample: greedy picks other tokens somewhere
    assert compiled.sequences.tolist() != greedy(model, tokens, mask, 8).tolist()


def test_hook_fires_with_batch_shapes_during_compiled_batched_generation(llama):
    _, model = llama
    tokens, mask = ragged(32, 32, 11)
    name = "blocks.0.hook_resid_post"
    vector = 3.0 * torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    shapes: list[tuple[int, ...]] = []

    def steer(x, hook):
        shapes.append(tuple(x.shape))
        return x + vector

    plain = greedy(model, tokens, mask, 5, use_compiled_decode=True)
    with model.hooks(fwd_hooks=[(name, steer)]):
        eager = greedy(model, tokens, mask, 5)
        shapes.clear()
        steered = greedy(model, tokens, mask, 5, use_compiled_decode=True)
    d = model.cfg.d_model
    # the prompt as it is (unpadded: hooks see what eager generation shows them), then one token a step
    assert shapes == [(32, tokens.shape[1], d)] + [(32, 1, d)] * 4
    assert steered.tolist() == eager.tolist() != plain.tolist()
    assert greedy(model, tokens, mask, 5, use_compiled_decode=True).tolist() == plain.tolist()  # hook gone


def test_compiled_batched_text_generation_on_smollm2_weights(smollm2_raw):
    model = HookedTransformer.from_pretrained_no_processing(hf_model=smollm2_raw.hf_model, first_n_layers=2,
                                                            tokenizer=smollm2_raw.tokenizer)
    prompts = ["The capital of France is", "Hello", "def fibonacci(n):"]
    texts = {c: model.generate(prompts, max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False,
                               use_compiled_decode=c) for c in (False, True)}
    assert texts[True] == texts[False]
    # the same left-padded batch through HF's generate (the truncated HF model fxhook runs)
    tok = smollm2_raw.tokenizer
    rows = [model.to_tokens(p)[0] for p in prompts]
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), tok.eos_token_id, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, row in enumerate(rows):
        tokens[i, width - len(row):], mask[i, width - len(row):] = row, 1
    expected = hf_greedy(model.hf_model, tokens, mask, 6)
    assert greedy(model, tokens, mask, 6, use_compiled_decode=True).tolist() == expected.tolist()
    assert [t for t in texts[True]] == [tok.decode(row, skip_special_tokens=True) for row in expected.tolist()]
