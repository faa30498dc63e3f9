"""The examples run, on the real offline SmolLM2 (loaded once here), and show what they say.

examples/compiled_analysis.py runs on a tiny random GPT-2 instead: compiling SmolLM2 takes minutes.
"""
from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fxhook import HookedTransformer
from fxhook.models_offline import gpt2_tokenizer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example(name: str):
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def smollm2(smollm2_processed) -> HookedTransformer:
    return smollm2_processed  # what the examples' load_model() loads when run alone (tests/conftest.py)


def test_direct_logit_attribution(smollm2, capsys):
    result = example("direct_logit_attribution").main(smollm2)
    cfg = smollm2.cfg
    assert len(result["labels"]) == cfg.n_layers * cfg.n_heads + cfg.n_layers + 2  # heads, MLPs, embed, bias
    assert result["logit_diff"] > 0  # the model prefers " Paris" to " Rome"
    # the direct attributions add up to the logit difference (fold_ln: the final norm is a cached scale)
    assert result["total"] == pytest.approx(result["logit_diff"], abs=1e-3)
    out = capsys.readouterr().out
    assert "largest contributions" in out and "By layer" in out


def test_activation_patching(smollm2, tmp_path):
    last = smollm2.cfg.n_layers - 1
    result = example("activation_patching").main(smollm2, layers=[0, last], out_dir=str(tmp_path))
    results, tokens = result["results"], result["str_tokens"]  # [2 layers, pos], fraction recovered
    assert result["clean_diff"] > 0 > result["corrupted_diff"]
    country = tokens.index(" France")
    others = [p for p in range(len(tokens)) if p != country]
    # entering block 0, the residual stream is the embedding: only the " France" token differs,
    # so patching it there is the whole clean run, and patching any other position changes nothing
    assert results[0, country].item() == pytest.approx(1.0, abs=1e-3)
    assert torch.allclose(results[0, others], torch.zeros(len(others)), atol=1e-3)
    # by the last block the answer has moved to the final position
    assert results[1, -1].item() > 0.8 and abs(results[1, country].item()) < 0.2
    assert (tmp_path / "patching_resid_pre.png").stat().st_size > 1000


def test_steering_vector(smollm2):
    result = example("steering_vector").main(smollm2, max_new_tokens=8)
    assert result["steered_gap"] > result["plain_gap"] + 1.0  # towards " love", away from " hate"
    assert result["steered"] != result["plain"]
    positions = result["hook_positions"]  # the hook ran at the prefill, then at each decoding step
    prompt_length = smollm2.to_tokens(example("steering_vector").PROMPT).shape[-1]
    assert positions[0] == prompt_length and set(positions[1:]) <= {1} and 2 <= len(positions) <= 8


def test_compiled_analysis(capsys):
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50257, n_positions=32)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer.from_pretrained(hf_model=hf, tokenizer=gpt2_tokenizer())
    result = example("compiled_analysis").main(model, repeats=2)
    assert result["max_difference"] < 1e-4
    assert result["eager"]["labels"] == result["compiled"]["labels"]
    assert result["eager_s"] > 0 and result["compiled_s"] > 0 and result["compile_s"] > 0
    assert not model.is_compiled  # the example leaves the model as it found it
    assert "x eager" in capsys.readouterr().out


def test_attribution_patching(smollm2, tmp_path):
    last = smollm2.cfg.n_layers - 1
    result = example("attribution_patching").main(smollm2, layers=[last], out_dir=str(tmp_path))
    assert len(result["heads"]) == smollm2.cfg.n_heads and result["actual"].shape == result["estimate"].shape
    # a last-layer head's output reaches the logits through the final norm alone: nearly linear, so the
    # first-order estimate tracks the actual change closely
    assert result["correlation"] > 0.9
    assert (tmp_path / "attribution_vs_actual.png").stat().st_size > 10_000
    assert (tmp_path / "hook_graph.png").stat().st_size > 10_000
