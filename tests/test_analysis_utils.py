"""utils.test_prompt prints what TransformerLens 3.9's test_prompt prints, for the same model."""
from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fxhook import HookedTransformer
from fxhook.models_offline import gpt2_tokenizer
from fxhook.utils import test_prompt
from tl_reference import tl_model


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    # wide weights spread the logits: ranks are then not decided by float noise between near-ties
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50257, n_positions=64,
                                    initializer_range=1.0)).eval()
    tokenizer = gpt2_tokenizer()
    ours = HookedTransformer.from_pretrained_no_processing(hf_model=hf, tokenizer=tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = tl_model(hf)
        theirs.set_tokenizer(tokenizer)
    theirs.cfg.default_prepend_bos = True
    return ours, theirs


def printed(fn, *args, **kwargs) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn(*args, **kwargs)
    return " ".join(out.getvalue().split())  # rich wraps long lines where print does not


@pytest.mark.parametrize("answer", ["Paris", ["Paris", " Rome", "London"], "Paris and Rome"])
@pytest.mark.parametrize("prepend_bos", [None, False])
def test_prints_what_transformer_lens_prints(models, answer, prepend_bos):
    from transformer_lens.utilities import test_prompt as tl_test_prompt

    ours, theirs = models
    prompt = "The capital of France is"
    mine = printed(test_prompt, prompt, answer, ours, top_k=4, prepend_bos=prepend_bos)
    expected = printed(tl_test_prompt, prompt, answer, theirs, top_k=4, prepend_bos=prepend_bos)
    assert mine == expected


def test_returns_the_ranks(models):
    ours, _ = models
    with contextlib.redirect_stdout(io.StringIO()):
        ranks = test_prompt("The capital of France is", "Paris", ours, print_details=False)
    logits = ours(ours.to_tokens("The capital of France is"))[0, -1]
    paris = ours.to_single_token(" Paris")
    assert ranks == [[(" Paris", int((logits > logits[paris]).sum()))]]
    with pytest.raises(ValueError, match="needs an answer"):
        test_prompt("The capital of France is", [], ours)
