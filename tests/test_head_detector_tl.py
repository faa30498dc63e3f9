"""fxhook.head_detector against TransformerLens 3.9's on the same tiny random GPT-2 (same weights, GPT-2's
tokenizer): every built-in pattern, custom patterns, both error measures, the exclusion flags, head
subsets and a passed cache give TransformerLens's scores; bad input is refused with a clear error."""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import transformer_lens.head_detector as tl_head_detector
from fxhook import HookedTransformer
from fxhook.head_detector import HEAD_NAMES, detect_head, get_duplicate_token_head_detection_pattern, \
    get_induction_head_detection_pattern, get_previous_token_head_detection_pattern
from fxhook.models_offline import gpt2_tokenizer
from models import randomise_biases, randomise_norms
from tl_reference import tl_model

PROMPT = "The cat sat on the mat. The cat sat on the mat again, said the cat."
PROMPTS = ["one two three one two three", "a b a b c a b c"]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50257, n_positions=64,
                        tie_word_embeddings=False, activation_function="gelu_new")
    hf = GPT2LMHeadModel(config)
    randomise_norms(hf, torch.Generator().manual_seed(1))
    randomise_biases(hf, 2)
    hf.eval()
    tokenizer = gpt2_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tl = tl_model(hf)
        tl.set_tokenizer(tokenizer)
    tl.cfg.default_prepend_bos = True  # TransformerLens's usual default, and fxhook's for this model
    fx = HookedTransformer.from_pretrained_no_processing(hf_model=hf, tokenizer=tokenizer, device="cpu")
    assert torch.equal(fx.to_tokens(PROMPT), tl.to_tokens(PROMPT))
    return fx, tl


@pytest.mark.parametrize("name, error_measure, exclude_bos, exclude_current_token",
                         list(itertools.product(HEAD_NAMES, ["mul", "abs"], [False, True], [False, True])))
def test_builtin_patterns_match_transformer_lens(models, name, error_measure, exclude_bos, exclude_current_token):
    fx, tl = models
    options = dict(exclude_bos=exclude_bos, exclude_current_token=exclude_current_token, error_measure=error_measure)
    ours = detect_head(fx, PROMPT, name, **options)
    theirs = tl_head_detector.detect_head(tl, PROMPT, name, **options)
    assert ours.shape == (2, 4)
    torch.testing.assert_close(ours, theirs, atol=2e-3 if error_measure == "abs" else 1e-5, rtol=0)
    if error_measure == "mul":
        assert ((ours >= 0) & (ours <= 1)).all()  # a share of attention, and every head was scored


def test_list_of_prompts_and_head_subsets_match(models):
    fx, tl = models
    for heads in ([(0, 1), (1, 3), (1, 0)], {0: [2], 1: [0, 1]}):
        ours = detect_head(fx, PROMPTS, "induction_head", heads=heads)
        theirs = tl_head_detector.detect_head(tl, PROMPTS, "induction_head", heads=heads)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
        assert (ours == -1).sum() == 8 - 3  # heads not asked for score -1


def test_custom_pattern_and_cache_match(models):
    fx, tl = models
    n = fx.to_tokens(PROMPT).shape[-1]
    custom = torch.tril(torch.rand(n, n, generator=torch.Generator().manual_seed(5)))
    _, cache = fx.run_with_cache(fx.to_tokens(PROMPT), remove_batch_dim=True)
    pattern_before = cache["pattern", 0, "attn"].clone()
    for measure in ("abs", "mul"):
        ours = detect_head(fx, PROMPT, custom, cache=cache, error_measure=measure, exclude_bos=True)
        theirs = tl_head_detector.detect_head(tl, PROMPT, custom, error_measure=measure, exclude_bos=True)
        torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=0)
    torch.testing.assert_close(cache["pattern", 0, "attn"], pattern_before, atol=0, rtol=0)  # cache untouched


def test_builtin_patterns_by_hand():
    tokens = torch.tensor([[7, 8, 9, 7, 8]])
    expected_previous = torch.tensor([[0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0],
                                      [0, 0, 0, 1, 0]], dtype=torch.float)
    expected_duplicate = torch.zeros(5, 5)
    expected_duplicate[3, 0] = expected_duplicate[4, 1] = 1  # second 7 sees the first; second 8 the first
    expected_induction = torch.zeros(5, 5)
    expected_induction[3, 1] = expected_induction[4, 2] = 1  # the token after each earlier copy
    torch.testing.assert_close(get_previous_token_head_detection_pattern(tokens), expected_previous)
    torch.testing.assert_close(get_duplicate_token_head_detection_pattern(tokens), expected_duplicate)
    torch.testing.assert_close(get_induction_head_detection_pattern(tokens), expected_induction)


def test_bad_input_is_refused(models):
    fx, _ = models
    _, cache = fx.run_with_cache(fx.to_tokens(PROMPT), remove_batch_dim=True)
    with pytest.raises(ValueError, match="head names"):
        detect_head(fx, PROMPT, "copy_head")
    with pytest.raises(ValueError, match="error_measure"):
        detect_head(fx, PROMPT, "induction_head", error_measure="l2")
    with pytest.raises(ValueError, match="cannot be used when `seq` is a list"):
        detect_head(fx, PROMPTS, "induction_head", cache=cache)
    with pytest.raises(ValueError, match="lower triangular"):
        detect_head(fx, PROMPT, torch.ones(4, 4))
    with pytest.raises(ValueError, match="out of range"):
        detect_head(fx, PROMPT, "induction_head", heads=[(0, 9)])
    with pytest.raises(ValueError, match="context window"):
        detect_head(fx, "word " * 80, "previous_token_head")
