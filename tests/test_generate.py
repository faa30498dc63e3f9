"""Generation runtime: fxhook's own KV cache (decode graph), generate, generate_stream, sampling helpers.

Random tiny models have nearly tied logits and, left alone, predict nearly the same token everywhere
(the blocks' output swamps the 0.02-scale embeddings). The models here get embeddings x30 (the
input decides) and the final norm x10 (greedy argmaxes well separated), so token-for-token
comparisons are both robust and discriminating.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fxhook import HookedTransformer
from fxhook.runtime.kv_cache import KVCache
from fxhook.runtime.sampling import (apply_freq_penalty, apply_temperature, sample_logits, top_k_filter,
                                     top_p_filter)
from models import NO_SHRINK, VOCAB, ModelSpec, build_hf_model, model_specs
from profiles import examples

LOGIT_SCALE = 10.0
EMBED_SCALE = 30.0


def sharpened(spec: ModelSpec, sliding_window: int | None = None):
    hf = build_hf_model(spec)
    if sliding_window is not None:
        hf.config.sliding_window = sliding_window
    norm = hf.transformer.ln_f if spec.family == "gpt2" else hf.model.norm
    with torch.no_grad():
        hf.get_input_embeddings().weight.mul_(EMBED_SCALE)  # tokens, not the layers' constant drift, decide
        norm.weight.mul_(LOGIT_SCALE)
        if getattr(norm, "bias", None) is not None:
            norm.bias.mul_(LOGIT_SCALE)
    return hf, HookedTransformer.from_pretrained_no_processing(hf_model=hf)


def padded_batch(seed: int, lengths=(7, 4), pad_id: int = 1):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    tokens = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for row, n in enumerate(lengths):
        tokens[row, width - n:] = torch.randint(2, VOCAB, (n,), generator=g)
        mask[row, width - n:] = 1
    return tokens, mask


def hf_greedy(hf, tokens, mask, n: int) -> torch.Tensor:
    hf.generation_config.eos_token_id = None  # compare all n tokens, no early stop
    with torch.no_grad():
        return hf.generate(tokens, attention_mask=mask, do_sample=False, max_new_tokens=n, use_cache=True,
                           pad_token_id=0)


def greedy(model, tokens, mask, n: int, **kw) -> torch.Tensor:
    return model.generate(tokens, max_new_tokens=n, do_sample=False, stop_at_eos=False, verbose=False,
                          attention_mask=mask, **kw)


GPT2 = ModelSpec("gpt2", 2, 4, 4, 8, 40, True, False, 3)
LLAMA = ModelSpec("llama", 2, 4, 2, 8, 40, True, False, 3)


@pytest.fixture(scope="module", params=[GPT2, LLAMA], ids=["gpt2", "llama"])
def pair(request):
    return sharpened(request.param)


# ------------------------------------------------------------------ equal to HF generate
@pytest.mark.support("*", "generate")
@settings(max_examples=examples(3), phases=NO_SHRINK)
@given(spec=model_specs(), seed=st.integers(0, 2**16))
def test_greedy_equals_hf_generate_with_and_without_cache(spec, seed):
    hf, model = sharpened(spec)
    tokens, mask = padded_batch(seed)
    expected = hf_greedy(hf, tokens, mask, 6)
    assert greedy(model, tokens, mask, 6).tolist() == expected.tolist()
    assert greedy(model, tokens, mask, 6, use_past_kv_cache=False).tolist() == expected.tolist()


@pytest.mark.support("mistral", "generate")
def test_sliding_window_is_applied_in_the_cache():
    spec = ModelSpec("mistral", 2, 4, 2, 8, 40, True, False, 5)
    hf, model = sharpened(spec, sliding_window=3)
    tokens, mask = padded_batch(11, lengths=(6, 4))
    expected = hf_greedy(hf, tokens, mask, 6)
    assert greedy(model, tokens, mask, 6).tolist() == expected.tolist()
    # the window matters here: without it the logits differ
    _, unwindowed = sharpened(spec)
    assert not torch.allclose(model(tokens, attention_mask=mask), unwindowed(tokens, attention_mask=mask))


# ------------------------------------------------------------------ forward with a cache
def test_prefill_then_single_tokens_equal_full_forward(pair):
    _, model = pair
    tokens, mask = padded_batch(5, lengths=(9, 5))
    with torch.no_grad():
        full = model(tokens, attention_mask=mask)
        cache = model.init_kv_cache(batch_size=2)
        pieces = [model(tokens[:, :4], attention_mask=mask[:, :4], past_kv_cache=cache)]
        for t in range(4, 9):
            pieces.append(model(tokens[:, t:t + 1], past_kv_cache=cache))
            assert cache.past_length == t + 1
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=0)
    n_kv = model.cfg.n_kv_heads
    assert cache.keys[0].shape == (2, n_kv, 9, model.cfg.d_head)


def test_frozen_cache_is_read_not_extended(pair):
    _, model = pair
    tokens, _ = padded_batch(6, lengths=(6, 6))
    with torch.no_grad():
        full = model(tokens)
        cache = model.init_kv_cache(2)
        model(tokens[:, :5], past_kv_cache=cache)
        cache.freeze()
        a = model(tokens[:, 5:], past_kv_cache=cache)
        b = model(tokens[:, 5:], past_kv_cache=cache)
    assert cache.past_length == 5
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[:, 0], full[:, 5], atol=1e-4, rtol=0)


def test_cache_step_logits_equal_no_cache_and_tokens_identical(pair):
    _, model = pair
    tokens, mask = padded_batch(7)
    out_cache = greedy(model, tokens, mask, 8)
    out_plain = greedy(model, tokens, mask, 8, use_past_kv_cache=False)
    assert out_cache.tolist() == out_plain.tolist()
    full_mask = torch.cat([mask, torch.ones(2, 8, dtype=torch.long)], dim=1)
    with torch.no_grad():
        full = model(out_cache[:, :-1], attention_mask=full_mask[:, :-1])
        cache = model.init_kv_cache(2)
        steps = [model(tokens, attention_mask=mask, past_kv_cache=cache)[:, -1]]
        for t in range(tokens.shape[1], out_cache.shape[1] - 1):
            steps.append(model(out_cache[:, t:t + 1], past_kv_cache=cache)[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, tokens.shape[1] - 1:], atol=1e-4, rtol=0)


def test_rows_of_a_padded_batch_generate_as_alone(pair):
    _, model = pair
    tokens, mask = padded_batch(8, lengths=(7, 3))
    batched = greedy(model, tokens, mask, 6)
    for row in range(2):
        alone = tokens[row:row + 1, mask[row].argmax():]
        assert batched[row, tokens.shape[1]:].tolist() == greedy(model, alone, None, 6)[0, alone.shape[1]:].tolist()


def test_top_k_1_equals_greedy(pair):
    _, model = pair
    tokens, mask = padded_batch(9)
    sampled = model.generate(tokens, max_new_tokens=5, do_sample=True, top_k=1, stop_at_eos=False, verbose=False,
                             attention_mask=mask)
    assert sampled.tolist() == greedy(model, tokens, mask, 5).tolist()


def test_seeded_sampling_is_reproducible_and_cache_independent(pair):
    _, model = pair
    tokens, mask = padded_batch(10)
    runs = []
    for use_cache in (True, True, False):
        torch.manual_seed(123)
        runs.append(model.generate(tokens, max_new_tokens=6, stop_at_eos=False, verbose=False, attention_mask=mask,
                                   temperature=3.0, use_past_kv_cache=use_cache).tolist())
    assert runs[0] == runs[1] == runs[2]
    g = torch.Generator().manual_seed(5)
    a = model.generate(tokens, max_new_tokens=4, stop_at_eos=False, verbose=False, generator=g)
    g.manual_seed(5)
    assert a.tolist() == model.generate(tokens, max_new_tokens=4, stop_at_eos=False, verbose=False,
                                        generator=g).tolist()


# ------------------------------------------------------------------ hooks during generation
def test_steering_hook_changes_generation_as_in_a_no_cache_loop(pair):
    _, model = pair
    tokens, mask = padded_batch(12)
    g = torch.Generator().manual_seed(0)
    vector = 3.0 * torch.randn(model.cfg.d_model, generator=g)
    name = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    seen = []

    def steer(x, hook):
        seen.append(x.shape[1])
        return x + vector

    with model.hooks(fwd_hooks=[(name, steer)]):
        steered = greedy(model, tokens, mask, 6)
    assert seen == [tokens.shape[1]] + [1] * 5  # prefill, then one position a step
    # reference: full forward each step, the same edit, greedy
    ref, ref_mask = tokens, mask
    with torch.no_grad():
        for _ in range(6):
            logits = model.run_with_hooks(ref, attention_mask=ref_mask, fwd_hooks=[(name, lambda x, hook: x + vector)])
            ref = torch.cat([ref, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            ref_mask = torch.cat([ref_mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    assert steered.tolist() == ref.tolist()
    assert steered.tolist() != greedy(model, tokens, mask, 6).tolist()


# ------------------------------------------------------------------ input embeddings, output_logits
def test_generate_from_embeddings_equals_generate_from_tokens(pair):
    _, model = pair
    tokens, mask = padded_batch(19)
    p = tokens.shape[1]
    from_tokens = greedy(model, tokens, mask, 6)
    embeds = model.W_E[tokens]  # the model's own token embeddings: positional embeddings are still added
    for use_cache in (True, False):
        new = greedy(model, embeds, mask, 6, return_type="tokens", use_past_kv_cache=use_cache)
        assert new.tolist() == from_tokens[:, p:].tolist()  # embeddings input: only the new tokens (as TL)
    out = greedy(model, embeds, mask, 6)  # return_type "input": embeddings of the whole sequence
    torch.testing.assert_close(out, model.W_E[from_tokens])
    seen = []
    with model.hooks(fwd_hooks=[("hook_embed", lambda x, hook: seen.append(x.clone()))]):
        greedy(model, embeds, mask, 2)
    torch.testing.assert_close(seen[0], embeds)  # hook_embed sees the given embeddings at prefill
    torch.testing.assert_close(seen[1][:, 0], model.W_E[from_tokens[:, p]])


def test_output_logits_equal_the_no_cache_step_logits(pair):
    _, model = pair
    tokens, mask = padded_batch(20)
    p, n = tokens.shape[1], 5
    out = model.generate(tokens, max_new_tokens=n, do_sample=False, stop_at_eos=False, verbose=False,
                         attention_mask=mask, output_logits=True, return_dict_in_generate=True)
    assert out.sequences.tolist() == greedy(model, tokens, mask, n).tolist()
    assert len(out.logits) == n and out.logits[0].shape == (2, model.cfg.d_vocab)
    full_mask = torch.cat([mask, torch.ones(2, n, dtype=torch.long)], dim=1)
    with torch.no_grad():  # step i's logits: the full forward's at position p - 1 + i
        full = model(out.sequences[:, :-1], attention_mask=full_mask[:, :-1])
    torch.testing.assert_close(torch.stack(out.logits, dim=1), full[:, p - 1:], atol=1e-4, rtol=0)
    from_embeds = model.generate(model.W_E[tokens], max_new_tokens=n, do_sample=False, stop_at_eos=False,
                                 verbose=False, attention_mask=mask, output_logits=True)
    assert from_embeds.sequences.tolist() == out.sequences[:, p:].tolist()
    torch.testing.assert_close(torch.stack(from_embeds.logits, 1), full[:, p - 1:], atol=1e-4, rtol=0)


# ------------------------------------------------------------------ EOS, return types, streaming
def test_stop_at_eos_pads_finished_rows_and_stops(pair):
    _, model = pair
    tokens, mask = padded_batch(13)
    free = greedy(model, tokens, mask, 6)
    p = tokens.shape[1]
    eos = int(free[0, p + 1])  # row 0 emits this by its second step
    out = model.generate(tokens, max_new_tokens=6, do_sample=False, eos_token_id=[eos, VOCAB + 5], verbose=False,
                         attention_mask=mask)
    firsts = [row.index(eos) if eos in row else None for row in free[:, p:].tolist()]
    assert out.shape[1] == p + (6 if None in firsts else max(firsts) + 1)
    for row, first in enumerate(firsts):
        end = p + (6 if first is None else first + 1)
        assert out[row, :end].tolist() == free[row, :end].tolist()
        assert (out[row, end:] == eos).all()


def test_return_types_and_stream(pair):
    _, model = pair
    tokens, mask = padded_batch(14)
    out = greedy(model, tokens, mask, 7)
    assert greedy(model, tokens, mask, 7, return_type="tokens").tolist() == out.tolist()
    embeds = greedy(model, tokens, mask, 7, return_type="embeds")
    torch.testing.assert_close(embeds, model.W_E[out])
    chunks = list(model.generate_stream(tokens, max_new_tokens=7, max_tokens_per_yield=4, do_sample=False,
                                        stop_at_eos=False, verbose=False))
    assert torch.cat(chunks, dim=1)[:, tokens.shape[1]:].tolist() == out[:, tokens.shape[1]:].tolist()
    assert all(c.shape[1] <= max(4, tokens.shape[1] + 1) for c in chunks)
    assert greedy(model, tokens, mask, 0).tolist() == tokens.tolist()


def test_bad_arguments(pair):
    _, model = pair
    tokens, mask = padded_batch(15)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(tokens, max_new_tokens=-1, verbose=False)
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(tokens, max_new_tokens=2, return_type="str", stop_at_eos=False, verbose=False)
    with pytest.raises(ValueError, match="EOS"):
        model.generate(tokens, max_new_tokens=2, verbose=False)  # no tokenizer, no eos_token_id
    with pytest.raises(ValueError, match="return_type"):
        model.generate(tokens, max_new_tokens=2, return_type="logits", stop_at_eos=False, verbose=False)
    embeds = torch.randn(1, 3, model.cfg.d_model)
    with pytest.raises(ValueError, match="tokenizer"):  # nothing can decode the new tokens
        model.generate(embeds, max_new_tokens=2, return_type="str", stop_at_eos=False, verbose=False)
    with pytest.raises(ValueError, match="d_model"):
        model.generate(torch.randn(1, 3, model.cfg.d_model + 1), max_new_tokens=2, stop_at_eos=False, verbose=False)
    with pytest.raises(ValueError, match="EOS"):
        model.generate(embeds, max_new_tokens=2, verbose=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(embeds, max_new_tokens=-2, stop_at_eos=False, verbose=False)
    with pytest.raises(ValueError, match="use_past_kv_cache"):
        model.generate(tokens, max_new_tokens=2, stop_at_eos=False, verbose=False, use_past_kv_cache=False,
                       use_compiled_decode=True)
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(embeds, max_new_tokens=2, stop_at_eos=False, verbose=False, attention_mask=mask)
    with pytest.warns(UserWarning, match="num_beams"):
        model.generate(tokens, max_new_tokens=1, stop_at_eos=False, verbose=False, num_beams=2)
    with pytest.raises(TypeError, match="KVCache"):
        model(tokens, past_kv_cache=object())
    with pytest.raises(ValueError, match="batch size"):
        model(tokens, past_kv_cache=model.init_kv_cache(batch_size=3))
    with pytest.raises(ValueError, match="n_ctx"):
        cache = model.init_kv_cache(1)
        model(torch.ones(1, model.cfg.n_ctx + 1, dtype=torch.long), past_kv_cache=cache)


# ------------------------------------------------------------------ sampling helpers
def test_sampling_helpers_on_known_logits():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    torch.testing.assert_close(apply_temperature(logits, 2.0), logits / 2)
    with pytest.raises(ValueError):
        apply_temperature(logits, 0.0)
    assert top_k_filter(logits, 2).isinf().tolist() == [[True, False, False, True]]
    # probabilities of [3, 2, 1, 0]: 0.644, 0.237, 0.087, 0.032
    assert top_p_filter(logits, 0.5).isinf().tolist() == [[True, True, False, True]]
    assert top_p_filter(logits, 0.7).isinf().tolist() == [[True, False, False, True]]
    assert not top_p_filter(logits, 1.0).isinf().any()
    tokens = torch.tensor([[2, 2, 0, 1]])
    penalised = apply_freq_penalty(logits, tokens, 0.5, token_mask=torch.tensor([[1, 1, 1, 0]]))
    torch.testing.assert_close(penalised, torch.tensor([[0.5, 2.0, 2.0, 0.0]]))
    assert sample_logits(logits, temperature=0.0).tolist() == [2]
    assert sample_logits(logits, top_k=1).tolist() == [2]
    # a huge penalty on token 2 makes token 1 the only likely one
    assert sample_logits(logits, top_k=1, freq_penalty=10.0, tokens=torch.tensor([[2]])).tolist() == [1]
    # temperature: empirical frequencies follow softmax(logits / T)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_logits(logits.expand(4000, -1), temperature=2.0, generator=g)]).flatten()
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    torch.testing.assert_close(freq, (logits[0] / 2).softmax(-1), atol=0.03, rtol=0)


def test_kv_cache_object():
    _, model = sharpened(LLAMA)
    cache = model.init_kv_cache(3)
    assert isinstance(cache, KVCache) and cache.past_length == 0 and cache.batch_size == 3
    assert len(cache) == model.cfg.n_layers and cache.keys[0].shape == (3, LLAMA.n_kv_heads, 0, LLAMA.d_head)
    model(torch.randint(2, VOCAB, (3, 4)), past_kv_cache=cache)
    copy = cache.clone()
    model(torch.randint(2, VOCAB, (3, 1)), past_kv_cache=cache)
    assert copy.past_length == 4 and cache.past_length == 5


def test_flag_variants_generate_the_same(pair):
    _, model = pair
    tokens, mask = padded_batch(16)
    expected = greedy(model, tokens, mask, 5)
    seen = []
    try:
        model.set_use_attn_result(True)
        model.set_ungroup_grouped_query_attention(True)
        with model.hooks(fwd_hooks=[("blocks.0.attn.hook_result", lambda x, hook: seen.append(x.shape))]):
            assert greedy(model, tokens, mask, 5).tolist() == expected.tolist()
    finally:
        model.set_use_attn_result(False)
        model.set_ungroup_grouped_query_attention(False)
    assert seen[0][:3] == (2, tokens.shape[1], model.cfg.n_heads) and seen[1][:2] == (2, 1)


# ------------------------------------------------------------------ a real model
@pytest.fixture(scope="module")
def smollm2(smollm2_raw):
    return smollm2_raw  # loaded once per session (tests/conftest.py)


def test_smollm2_batched_text_greedy_equals_hf_generate(smollm2):
    model = smollm2
    prompts = ["The capital of France is", "def fibonacci(n):\n    if n < 2:"]
    tokens, mask = model.codec._tokenize(prompts, None, "left")
    expected = hf_greedy(model.hf_model, tokens, mask, 20)
    out = model.generate(prompts, max_new_tokens=20, do_sample=False, stop_at_eos=False, verbose=False,
                         return_type="tokens")
    assert out.tolist() == expected.tolist()
    text = model.generate(prompts[0], max_new_tokens=20, do_sample=False, stop_at_eos=False, verbose=False)
    assert isinstance(text, str) and text.startswith(prompts[0]) and "Paris" in text
    width = tokens.shape[1]
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt, max_new_tokens=20, do_sample=False, stop_at_eos=False, verbose=False,
                               return_type="tokens")
        assert alone[0, -20:].tolist() == out[row, width:].tolist()


def test_decode_graph_has_the_full_graphs_hook_points(pair):
    from fxhook.pipeline import GraphSpec
    from fxhook.core.graph import hook_point_nodes

    _, model = pair
    decode = model.decode_graph_for(GraphSpec.from_cfg(model.cfg))
    names = set(hook_point_nodes(decode))
    assert names == set(model.hook_dict)
    assert all(decode.get_submodule(n) is model.hook_dict[n] for n in names)  # the same HookPoint objects


def test_processed_model_greedy_equals_hf_generate():
    import copy

    hf, _ = sharpened(LLAMA)
    processed = HookedTransformer.from_pretrained(hf_model=copy.deepcopy(hf))
    tokens, mask = padded_batch(17)
    assert greedy(processed, tokens, mask, 6).tolist() == hf_greedy(hf, tokens, mask, 6).tolist()


def test_stream_yields_nothing_without_new_tokens(pair):
    _, model = pair
    tokens, _ = padded_batch(18)
    assert list(model.generate_stream(tokens, max_new_tokens=0, stop_at_eos=False, verbose=False)) == []
    chunks = list(model.generate_stream(tokens, max_new_tokens=3, max_tokens_per_yield=1, do_sample=False,
                                        stop_at_eos=False, verbose=False))
    assert [c.shape[1] for c in chunks] == [tokens.shape[1] + 1, 1, 1]


def test_decode_graph_self_check_refuses_a_wrong_decode(pair):
    from fxhook.pipeline.verify import verify_decode
    from fxhook.pipeline import DecodeKind, GraphSpec

    _, model = pair
    cfg = model.cfg
    args = (model.captured, cfg.n_layers, cfg.n_kv_heads, cfg.d_head, cfg.d_vocab)
    decode = model.decode_graph_for(GraphSpec.from_cfg(cfg))  # built (and verified) without error
    verify_decode(decode, *args)
    static = model.decode_graph_for(GraphSpec.from_cfg(cfg), DecodeKind(static=True))
    verify_decode(static, *args, static=True)

    def padding_ignored(ids, positions, mask, *rest):  # as if the model's HF code dropped the padding mask
        return decode(ids, positions, torch.ones_like(mask), *rest)

    with pytest.raises(NotImplementedError, match="use_past_kv_cache=False"):
        verify_decode(padding_ignored, *args)

    def reads_unwritten_slots(ids, positions, mask, *rest):  # a static cache that ignores its padding mask
        return static(ids, positions, torch.ones_like(mask), *rest)

    with pytest.raises(NotImplementedError, match="use_past_kv_cache=False"):
        verify_decode(reads_unwritten_slots, *args, static=True)


def test_static_cache_graph_equals_growing_cache_under_flags_and_pattern_hooks(pair):
    """The graph compiled decode runs (static cache), run eagerly: same logits as the growing cache,
    with per-head flags on and with a pattern hook (whose keys then span the whole static cache)."""
    _, model = pair
    tokens, mask = padded_batch(24)
    p = tokens.shape[1]
    patterns = []
    try:
        model.set_use_attn_result(True)
        model.set_ungroup_grouped_query_attention(True)
        with torch.no_grad(), model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern",
                                                       lambda x, hook: patterns.append(x.clone()))]):
            growing, static = model.init_kv_cache(2), model.init_static_kv_cache(2, 16)
            a = [model.decoder.run_growing(growing, tokens, mask)]
            b = [model.decoder.run_static(static, tokens, mask)]
            for t in range(3):
                new = torch.full((2, 1), 5 + t)
                a.append(model.decoder.run_growing(growing, new, torch.ones_like(new)))
                b.append(model.decoder.run_static(static, new, torch.ones_like(new)))
    finally:
        model.set_use_attn_result(False)
        model.set_ungroup_grouped_query_attention(False)
    torch.testing.assert_close(torch.cat(b, 1), torch.cat(a, 1), atol=1e-4, rtol=0)
    last_growing, last_static = patterns[-2], patterns[-1]  # the last step, growing then static
    assert last_static.shape[-1] == 16 and last_growing.shape[-1] == p + 3
    torch.testing.assert_close(last_static[..., :p + 3], last_growing, atol=1e-5, rtol=0)
    assert (last_static[..., p + 3:] == 0).all()  # unwritten slots get no attention


def test_decode_graph_simplification_keeps_values_and_drops_nodes(pair):
    from fxhook.core.kv_ops import positions_from_mask
    from fxhook.capture.kv import capture_decode
    from fxhook.pipeline import build_forward
    from fxhook.passes.kv_cache import lower_growing_cache

    _, model = pair
    spec = model._current_spec()
    simplified = model.decode_graph_for(spec)
    cfg = model.cfg
    captured = lower_growing_cache(capture_decode(model.hf_model, model.adapter, cfg.n_layers, cfg.n_heads,
                                                  cfg.n_kv_heads, cfg.d_head))
    plain = build_forward(captured, spec, model.cfg, model.adapter, model._make_point)
    assert len(simplified.graph.nodes) < 0.9 * len(plain.graph.nodes)
    assert not [n for n in simplified.graph.nodes if n.target is torch.ops.aten._assert_tensor_metadata.default]
    tokens, mask = padded_batch(25)
    cache = model.init_kv_cache(2)
    args = (tokens, positions_from_mask(mask, tokens.shape[1]), mask, *cache.keys, *cache.values)
    with torch.no_grad():
        for x, y in zip(simplified(*args), plain(*args)):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
