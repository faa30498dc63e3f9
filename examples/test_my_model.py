"""Prove that fxhook's model of YOUR checkpoint equals the Hugging Face model: a pytest file to copy.

    python -m pytest examples/test_my_model.py -q

Set MODEL to your checkpoint (a folder, a hub name in your cache, "smollm2"). As shipped it runs on a
tiny random Llama built here, so that it runs in seconds with nothing downloaded; FXHOOK_EXAMPLE_MODEL=smollm2
runs it on the packaged SmolLM2 (about a minute to load).
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
from hypothesis import given, settings

from fxhook import HookedTransformer
from fxhook.testing import assert_generation_matches, assert_hooks_consistent, assert_matches_hf, strategies

MODEL = os.environ.get("FXHOOK_EXAMPLE_MODEL")  # None: the tiny random model below


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=101, max_position_embeddings=64, bos_token_id=0,
                         eos_token_id=1)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def models() -> tuple[HookedTransformer, torch.nn.Module]:
    """(fxhook's model, processed as TransformerLens does; the plain HF model of the same checkpoint)."""
    if MODEL is None:
        hf_model = tiny_llama()
        return HookedTransformer.from_pretrained(hf_model=copy.deepcopy(hf_model)), hf_model
    from transformers import AutoModelForCausalLM

    from fxhook.models_offline import resolve_offline

    model = HookedTransformer.from_pretrained(MODEL, device="cpu")
    source, extra = resolve_offline(MODEL) or (MODEL, {})  # "smollm2" lives in a PyPI package
    return model, AutoModelForCausalLM.from_pretrained(source, **extra).eval()


def test_logits_and_hooks(models):
    model, hf_model = models

    @settings(max_examples=4, deadline=None)
    @given(batch=strategies.token_batches(model, max_length=10), ablate=strategies.ablations(model))
    def check(batch, ablate):
        assert_matches_hf(model, hf_model, batch)  # log-probabilities equal HF's (the model is processed)
        assert_hooks_consistent(model, batch, hf_model=hf_model, ablate=ablate)
    check()


def test_greedy_generation(models):
    model, hf_model = models

    @settings(max_examples=2, deadline=None)
    @given(batch=strategies.token_batches(model, max_batch=2, max_length=6))
    def check(batch):
        assert_generation_matches(model, hf_model, batch, max_new_tokens=3)
    check()
