"""Pre-rotary q / k hooked on the arguments of HF's rotary function (adapter `Attention.rotary_fn`,
GPT-NeoX): the values are HF's own q / k, an edit there reaches the model, hook_q's graph reaches no k or
v, and the wrapped function is restored after every capture, also concurrent and failed ones."""
from __future__ import annotations

import threading

import pytest
import torch
import transformers.models.gpt_neox.modeling_gpt_neox as neox_module

from fxhook import HookedTransformer
from fxhook.capture.rotary_args import rotary_inputs_marked
from models import ModelSpec, build_hf_model

ORIGINAL = neox_module.apply_rotary_pos_emb


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return build_hf_model(ModelSpec("gpt_neox", 2, 2, 2, 8, 32, True, False, 3, 0))


def hf_pre_rotary(hf_model, tokens) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """HF's own (q, k) [b, p, heads, d_head] reaching apply_rotary_pos_emb, layer by layer."""
    seen = []

    def spy(q, k, *args, **kwargs):
        seen.append((q.transpose(1, 2).clone(), k.transpose(1, 2).clone()))
        return ORIGINAL(q, k, *args, **kwargs)
    neox_module.apply_rotary_pos_emb = spy
    try:
        with torch.no_grad():
            hf_model(tokens)
    finally:
        neox_module.apply_rotary_pos_emb = ORIGINAL
    return seen


def test_hook_q_k_are_hf_values_and_edits_reach_the_model(hf_model):
    model = HookedTransformer.from_pretrained_no_processing(hf_model=hf_model)
    assert neox_module.apply_rotary_pos_emb is ORIGINAL
    tokens = torch.randint(0, 90, (2, 6), generator=torch.Generator().manual_seed(1))
    _, cache = model.run_with_cache(tokens)
    for layer, (q, k) in enumerate(hf_pre_rotary(hf_model, tokens)):
        torch.testing.assert_close(cache[f"blocks.{layer}.attn.hook_q"], q, atol=1e-6, rtol=0)
        torch.testing.assert_close(cache[f"blocks.{layer}.attn.hook_k"], k, atol=1e-6, rtol=0)
    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_q", lambda q, hook: q * 0)]):
        zero_q, edited = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_attn_scores")
    assert not torch.allclose(zero_q, model(tokens))
    scores = edited["blocks.1.attn.hook_attn_scores"]  # [b, head, query, key]: q . k with q = 0, masked above
    assert torch.equal(scores.isneginf(), torch.ones(6, 6).triu(1).bool().expand_as(scores))
    assert scores.nan_to_num(neginf=0).abs().max() < 1e-6


def test_hook_q_reaches_no_key_or_value(hf_model):
    graph = HookedTransformer.from_pretrained_no_processing(hf_model=hf_model).hook_graph()
    assert set(graph.successors("blocks.0.attn.hook_q")) == {"blocks.0.attn.hook_rot_q"}
    assert set(graph.predecessors("blocks.0.attn.hook_rot_k")) == {"blocks.0.attn.hook_k"}
    assert set(graph.predecessors("blocks.0.attn.hook_v")) == {"blocks.0.ln1.hook_normalized"}


def test_wrapper_is_shared_by_concurrent_captures_and_restored(hf_model):
    attentions = [layer.attention for layer in hf_model.gpt_neox.layers]
    inside, release = threading.Barrier(2), threading.Event()

    def capture():
        with rotary_inputs_marked(attentions, "apply_rotary_pos_emb"):
            inside.wait()
            release.wait()
    thread = threading.Thread(target=capture)
    thread.start()
    with rotary_inputs_marked(attentions, "apply_rotary_pos_emb"):
        inside.wait()
        wrapped = neox_module.apply_rotary_pos_emb
        assert wrapped is not ORIGINAL and wrapped.__wrapped__ is ORIGINAL
        release.set()
        thread.join()
        assert neox_module.apply_rotary_pos_emb is wrapped  # this capture still runs
    assert neox_module.apply_rotary_pos_emb is ORIGINAL
    assert all(not a._forward_hooks and not a._forward_pre_hooks for a in attentions)


def test_outside_a_capture_the_wrapper_passes_through(hf_model):
    tokens = torch.randint(0, 90, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf_model(tokens).logits
        with rotary_inputs_marked([layer.attention for layer in hf_model.gpt_neox.layers], "apply_rotary_pos_emb"):
            assert torch.equal(hf_model(tokens).logits, expected)  # plain HF forward: no markers applied


def test_a_failed_capture_restores_and_a_wrong_name_is_refused(hf_model):
    attentions = [layer.attention for layer in hf_model.gpt_neox.layers]
    with pytest.raises(RuntimeError, match="boom"):
        with rotary_inputs_marked(attentions, "apply_rotary_pos_emb"):
            raise RuntimeError("boom")
    assert neox_module.apply_rotary_pos_emb is ORIGINAL
    with pytest.raises(ValueError, match="rotary_fn='apply_rotary' is not a function of"):
        with rotary_inputs_marked(attentions, "apply_rotary"):
            pass
    assert not hasattr(neox_module, "apply_rotary")
    assert all(not a._forward_hooks and not a._forward_pre_hooks for a in attentions)
