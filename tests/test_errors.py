"""Bad input gets a clear error: unknown hook names, text without a tokenizer, prompts
longer than the context, architectures without an adapter."""
from __future__ import annotations

import functools
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxhook import HookedTransformer
from models import VOCAB, ModelSpec, build_hf_model, token_batches

POOL = (
    ModelSpec("gpt2", n_layers=2, n_heads=2, n_kv_heads=2, d_head=8, d_mlp=40, bias=True, tied=True, seed=21),
    ModelSpec("qwen2", n_layers=3, n_heads=4, n_kv_heads=1, d_head=4, d_mlp=16, bias=True, tied=False, seed=22),
)


@functools.lru_cache(maxsize=None)
def pool_model(spec: ModelSpec) -> HookedTransformer:
    return HookedTransformer.from_pretrained_no_processing(hf_model=build_hf_model(spec))


pool_models = st.sampled_from(POOL).map(pool_model)


def assert_no_hooks(model: HookedTransformer) -> None:
    leaked = [n for n, p in model.hook_dict.items() if p.fwd_hooks or p.bwd_hooks]
    assert not leaked, f"hooks left attached: {leaked}"


# ---------------------------------------------------------------- unknown hook names
@st.composite
def typos(draw, names: list[str]) -> tuple[str, str]:
    """(a valid hook name, that name with one character edit which is not a valid name)."""
    name = draw(st.sampled_from(names))
    i = draw(st.integers(0, len(name) - 2))
    kind = draw(st.sampled_from(["drop_last", "drop", "swap", "substitute", "insert"]))
    letter = draw(st.sampled_from("abcdefghijklmnopqrstuvwxyz_"))
    bad = {"drop_last": name[:-1], "drop": name[:i] + name[i + 1:],
           "swap": name[:i] + name[i + 1] + name[i] + name[i + 2:],
           "substitute": name[:i] + letter + name[i + 1:], "insert": name[:i] + letter + name[i:]}[kind]
    if bad in names or bad == name:
        bad = name + "x"
    return name, bad


ENTRIES = ("run_with_hooks", "run_with_hooks_bwd", "add_hook", "add_hook_list", "hooks", "run_with_cache_str",
           "run_with_cache_list")


def use_hook_name(model: HookedTransformer, entry: str, name: str, tokens: torch.Tensor) -> None:
    noop = lambda x, hook: None  # noqa: E731
    if entry == "run_with_hooks":
        model.run_with_hooks(tokens, fwd_hooks=[(name, noop)])
    elif entry == "run_with_hooks_bwd":
        model.run_with_hooks(tokens, bwd_hooks=[(name, noop)], reset_hooks_end=True)
    elif entry == "add_hook":
        model.add_hook(name, noop)
    elif entry == "add_hook_list":
        model.add_hook(["hook_embed", name], noop)
    elif entry == "hooks":
        with model.hooks(fwd_hooks=[("hook_embed", noop), (name, noop)]):
            model(tokens)
    elif entry == "run_with_cache_str":
        model.run_with_cache(tokens, names_filter=name)
    else:
        model.run_with_cache(tokens, names_filter=["hook_embed", name])


@given(model=pool_models, data=st.data(), entry=st.sampled_from(ENTRIES))
def test_unknown_hook_names_are_refused_with_suggestions(model, data, entry):
    names = sorted(model.hook_dict)
    name, bad = data.draw(typos(names), label="typo")
    tokens = torch.randint(2, VOCAB, (1, 4))
    try:
        with pytest.raises(KeyError) as info, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # backward hooks in run_with_hooks warn
            use_hook_name(model, entry, bad, tokens)
        message = str(info.value)
        assert repr(bad) in message, "the message names the unknown hook"
        suggestions = message.split("Did you mean:")[1] if "Did you mean:" in message else ""
        assert name in suggestions, f"{name!r} should be suggested for {bad!r}: {message}"
    finally:
        model.reset_hooks()
    assert_no_hooks(model)


def test_the_issue_example_suggests_resid_pre():
    model = pool_model(POOL[0])
    with pytest.raises(KeyError, match=r"Did you mean:.*'?blocks\.0\.hook_resid_pre\b"):
        model.run_with_hooks(torch.tensor([[2, 3]]), fwd_hooks=[("blocks.0.hook_resid_pr", lambda x, hook: None)])
    assert_no_hooks(model)


@given(model=pool_models)
def test_names_filter_of_a_wrong_type_is_refused(model):
    with pytest.raises(TypeError, match="names_filter"):
        model.run_with_cache(torch.tensor([[2, 3]]), names_filter=3)
    with pytest.raises(TypeError):
        model.add_hook(3, lambda x, hook: None)
    with pytest.raises(TypeError):
        model.add_hook("hook_embed", "not callable")
    assert_no_hooks(model)


# ------------------------------------------------------------------- text input
@given(model=pool_models, text=st.one_of(st.text(min_size=1, max_size=20),
                                         st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=3)))
def test_text_without_a_tokenizer_is_a_clear_value_error(model, text):
    assert model.tokenizer is None
    for call in (lambda: model(text), lambda: model.run_with_cache(text),
                 lambda: model.run_with_hooks(text, fwd_hooks=[("hook_embed", lambda x, hook: None)]),
                 lambda: model.to_tokens(text)):
        with pytest.raises(ValueError, match="tokenizer"):
            call()
    assert_no_hooks(model)


# --------------------------------------------------------------- context length
@given(model=pool_models, extra=st.integers(1, 16), batch=st.integers(1, 2))
def test_prompts_longer_than_the_context_are_refused(model, extra, batch):
    n_ctx = model.cfg.n_ctx
    tokens = torch.randint(2, VOCAB, (batch, n_ctx + extra))
    for call in (lambda: model(tokens), lambda: model.run_with_cache(tokens),
                 lambda: model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", lambda x, hook: None)])):
        with pytest.raises(ValueError, match="n_ctx") as info:
            call()
        assert str(n_ctx + extra) in str(info.value) and str(n_ctx) in str(info.value)
    assert_no_hooks(model)
    with torch.no_grad():  # exactly n_ctx is fine
        assert model(tokens[:, :n_ctx]).shape == (batch, n_ctx, model.cfg.d_vocab)


# ------------------------------------------------------------ forward arguments
@given(model=pool_models, batch=token_batches(max_len=6))
def test_bad_forward_arguments(model, batch):
    tokens, mask = batch
    n = model.cfg.n_layers
    with pytest.raises(ValueError, match="attention_mask"):
        model(tokens, attention_mask=mask[:, :-1])
    with pytest.raises(ValueError, match="start_at_layer"):
        model(torch.zeros(*tokens.shape, model.cfg.d_model), start_at_layer=n)
    with pytest.raises(ValueError, match="stop_at_layer"):
        model(tokens, stop_at_layer=n + 1)
    with pytest.raises(ValueError, match="return_type"):
        model(tokens, attention_mask=mask, return_type="probs")
    with pytest.raises(ValueError, match="scalar|loss"):
        model.run_with_cache(tokens, attention_mask=mask, incl_bwd=True)  # logits are not a scalar
    assert_no_hooks(model)


# ----------------------------------------------------------- unsupported models
def _tiny_causal_lms():
    """Tiny HF causal LMs of families fxhook may not have an adapter for."""
    import transformers as tf

    return {
        "GPTNeoXForCausalLM": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=VOCAB,
            max_position_embeddings=32)),
        "OPTForCausalLM": lambda: tf.OPTForCausalLM(tf.OPTConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32, vocab_size=VOCAB,
            max_position_embeddings=32, word_embed_proj_dim=16)),
        "BloomForCausalLM": lambda: tf.BloomForCausalLM(tf.BloomConfig(
            hidden_size=16, n_layer=1, n_head=2, vocab_size=VOCAB)),
        "PhiForCausalLM": lambda: tf.PhiForCausalLM(tf.PhiConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=VOCAB,
            max_position_embeddings=32)),
        "GPTJForCausalLM": lambda: tf.GPTJForCausalLM(tf.GPTJConfig(
            n_embd=16, n_layer=1, n_head=2, rotary_dim=4, vocab_size=VOCAB, n_positions=32)),
    }


def _without_adapter() -> list[str]:
    from adapters import BY_ARCHITECTURE

    return sorted(name for name in _tiny_causal_lms() if name not in BY_ARCHITECTURE)


@given(arch=st.sampled_from(_without_adapter()))
def test_a_causal_lm_without_an_adapter_is_not_implemented(arch):
    hf = _tiny_causal_lms()[arch]().eval()
    with pytest.raises(NotImplementedError) as info:
        HookedTransformer.from_pretrained_no_processing(hf_model=hf)
    message = str(info.value)
    assert arch in message and "adapter" in message.lower()


def test_an_encoder_only_model_is_refused():
    from transformers import BertConfig, BertForMaskedLM

    hf = BertForMaskedLM(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32, vocab_size=VOCAB, max_position_embeddings=32)).eval()
    with pytest.raises((NotImplementedError, ValueError)) as info:
        HookedTransformer.from_pretrained_no_processing(hf_model=hf)
    assert "BertForMaskedLM" in str(info.value)
