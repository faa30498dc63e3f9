"""Bad input gets a clear error at the API boundary; what used to be silently wrong is now right or refused."""
from __future__ import annotations

import os
import time
import warnings

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fxhook import HookedTransformer
from fxhook.models_offline import gpt2_tokenizer
from models import ModelSpec, build_hf_model
from tl_reference import build_tl_model, detached_copy, tl_config, tl_state_dict

GPT2 = ModelSpec("gpt2", n_layers=2, n_heads=2, n_kv_heads=2, d_head=8, d_mlp=40, bias=True, tied=False, seed=31)
LLAMA = ModelSpec("llama", n_layers=2, n_heads=4, n_kv_heads=2, d_head=4, d_mlp=24, bias=False, tied=False, seed=32)


@pytest.fixture(scope="module")
def gpt2() -> HookedTransformer:
    return HookedTransformer.from_pretrained_no_processing(hf_model=build_hf_model(GPT2))


@pytest.fixture(scope="module")
def llama() -> HookedTransformer:
    return HookedTransformer.from_pretrained_no_processing(hf_model=build_hf_model(LLAMA))


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory) -> HookedTransformer:
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50257, n_positions=64)).eval()
    return HookedTransformer.from_pretrained_no_processing(
        hf_model=hf, tokenizer=gpt2_tokenizer(tmp_path_factory.mktemp("bpe")))


# ------------------------------------------------------------------ state dicts
def test_a_weight_of_another_shape_is_refused_not_broadcast(gpt2):
    with pytest.raises(ValueError, match=r"'blocks.0.attn.W_Q' has shape \(8,\).*shapes must match exactly"):
        gpt2.load_and_process_state_dict({"blocks.0.attn.W_Q": torch.zeros(8)})


def test_a_key_for_a_block_the_model_lacks_names_the_blocks(gpt2):
    with pytest.raises(KeyError, match=r"block 5, but this model has n_layers=2"):
        gpt2.load_and_process_state_dict({"blocks.5.attn.b_Q": torch.zeros(2, 8)})


def test_transformer_lens_attention_biases_load_into_a_bias_free_model(llama):
    """The HF Llama has no attention biases: loading nonzero ones creates them, equal to TransformerLens."""
    hf = build_hf_model(LLAMA)
    cfg = tl_config(hf)
    state = tl_state_dict(hf, cfg)
    g = torch.Generator().manual_seed(0)
    for layer in range(LLAMA.n_layers):
        for key, shape in (("b_Q", (4, 4)), ("_b_K", (2, 4)), ("_b_V", (2, 4)), ("b_O", (16,))):
            state[f"blocks.{layer}.attn.{key}"] = torch.randn(shape, generator=g) * 0.5
        state[f"blocks.{layer}.mlp.b_out"] = torch.randn(16, generator=g) * 0.5
    reference = build_tl_model(cfg, detached_copy(state))  # TransformerLens edits what it is given
    ours = HookedTransformer.from_pretrained_no_processing(hf_model=build_hf_model(LLAMA))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                         fold_value_biases=False)
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9]])
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), reference(tokens), atol=1e-4, rtol=0)


def test_a_gated_b_in_that_the_hf_model_cannot_represent_is_refused(llama):
    with pytest.raises(ValueError, match="b_in.*after act\\(gate\\) \\* up"):
        llama.load_and_process_state_dict({"blocks.0.mlp.b_in": torch.ones(24)})


def test_refactoring_non_finite_weights_names_the_weight(gpt2):
    state = {k: v.detach().clone() for k, v in gpt2.live_weights().items()}
    state["blocks.1.attn.W_V"][0, 0, 0] = float("inf")
    model = HookedTransformer.from_pretrained_no_processing(hf_model=build_hf_model(GPT2))
    with pytest.raises(ValueError, match="blocks.1.attn.W_V has non-finite values"):
        model.load_and_process_state_dict(state, refactor_factored_attn_matrices=True)


# ------------------------------------------------------------------ keywords and flags
def test_run_with_cache_slices_positions_as_transformer_lens(gpt2):
    hf = build_hf_model(GPT2)
    reference = build_tl_model(tl_config(hf), tl_state_dict(hf, tl_config(hf)))
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9]])
    with torch.no_grad():
        _, theirs = reference.run_with_cache(tokens, pos_slice=-1)
        _, ours = gpt2.run_with_cache(tokens, pos_slice=-1)
    shared = sorted(set(theirs.keys()) & set(ours.keys()))
    assert len(shared) > 20
    for name in shared:
        assert ours[name].shape == theirs[name].shape, name
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-4, rtol=0, msg=name)


@pytest.mark.parametrize("value", ["no", 1, None])
def test_flags_take_booleans_only(gpt2, value):
    with pytest.raises(TypeError, match="takes True or False"):
        gpt2.set_use_attn_result(value)
    assert gpt2.cfg.use_attn_result is False


# ------------------------------------------------------------------ tokens in and out
def test_token_ids_outside_the_vocabulary_are_refused(with_tokenizer, gpt2):
    with pytest.raises(ValueError, match="token id 1000000, outside the vocabulary"):
        with_tokenizer.to_str_tokens(10**6)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        with_tokenizer.to_string(torch.tensor([5, 10**6]))
    with pytest.raises(ValueError, match="token id 97, outside the vocabulary \\[0, 97\\)"):
        gpt2(torch.tensor([[1, 97]]))


@pytest.mark.parametrize("make_input,message", [
    (lambda: "", "has no tokens"),
    (lambda: torch.zeros((0, 4), dtype=torch.long), "no rows"),
    (lambda: torch.zeros((1, 0), dtype=torch.long), "has no tokens"),
    (lambda: torch.zeros((2, 3, 4, 5), dtype=torch.long), "must have shape \\[batch, pos\\]"),
    (lambda: torch.zeros((1, 3)), "must be integer token ids"),
])
def test_empty_or_malformed_input_is_a_clear_error(with_tokenizer, make_input, message):
    with pytest.raises((ValueError, TypeError), match=message):
        with_tokenizer(make_input(), prepend_bos=False)


def test_a_list_of_ints_is_not_mistaken_for_text(gpt2):
    with pytest.raises(TypeError, match="pass token ids as a tensor"):
        gpt2([1, 2, 3])


def test_start_at_layer_checks_its_input_and_layer(gpt2):
    with pytest.raises(TypeError, match="residual stream entering that block"):
        gpt2(torch.tensor([[1, 2, 3]]), start_at_layer=1)
    with pytest.raises(ValueError, match=r"d_model=16\].*got \(1, 3, 5\)"):
        gpt2(torch.zeros(1, 3, 5), start_at_layer=1)
    with pytest.raises(TypeError, match="start_at_layer must be an int"):
        gpt2(torch.zeros(1, 3, 16), start_at_layer=1.5)
    with pytest.raises(ValueError, match=r"stop_at_layer must be in \[-2, 2\], got -5"):
        gpt2(torch.tensor([[1, 2, 3]]), stop_at_layer=-5)


# ------------------------------------------------------------------ generation
def test_nan_logits_stop_greedy_decoding_naming_the_step(gpt2):
    def poison(x, hook):
        return torch.full_like(x, float("nan"))
    with gpt2.hooks(fwd_hooks=[("blocks.1.hook_resid_post", poison)]):
        with pytest.raises(FloatingPointError, match="logits of new token 0 are NaN"):
            gpt2.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False, stop_at_eos=False,
                          verbose=False)


def test_padded_token_batch_without_a_mask_warns(with_tokenizer):
    pad = with_tokenizer.tokenizer.pad_token_id
    tokens = torch.tensor([[10, 11, 12], [13, pad, pad]])
    with pytest.warns(UserWarning, match=r"rows \[1\] of this token batch look padded"):
        with_tokenizer.generate(tokens, max_new_tokens=1, stop_at_eos=False, verbose=False)
    with warnings.catch_warnings(record=True) as caught:  # with the mask it says nothing
        warnings.simplefilter("always")
        with_tokenizer.generate(tokens, max_new_tokens=1, stop_at_eos=False, verbose=False,
                                attention_mask=torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert not [w for w in caught if "look padded" in str(w.message)]


def test_no_processing_with_a_dtype_converts_the_callers_model_as_documented():
    hf = build_hf_model(GPT2)
    HookedTransformer.from_pretrained_no_processing(hf_model=hf, dtype="float64")
    assert next(hf.parameters()).dtype == torch.float64
    assert "converts the caller's model too" in HookedTransformer.from_pretrained_no_processing.__doc__


# ------------------------------------------------------------------ first contact
def test_offline_hub_fails_at_once_with_the_reason():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    start = time.perf_counter()
    with pytest.raises(OSError, match="The hub is off .*Models available with no hub: .*smollm2"):
        HookedTransformer.from_pretrained("gpt2-such-a-model-is-not-cached")
    assert time.perf_counter() - start < 10


def test_an_unreachable_hub_fails_at_once_with_the_reason(monkeypatch):
    """No HF_HUB_OFFLINE, but no network either: one quick probe (stubbed here: tests never reach out)
    sends the loader to the local cache instead of the hub client's half-minute of retries."""
    from fxhook.runtime import loading

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    probes = []
    monkeypatch.setattr(loading, "_hub_reachable", lambda *a, **k: probes.append(1) or False)
    start = time.perf_counter()
    with pytest.raises(OSError, match="The hub cannot be reached from here, so only the local cache was searched"):
        HookedTransformer.from_pretrained("gpt2-such-a-model-is-not-cached")
    assert probes == [1] and time.perf_counter() - start < 10


# ------------------------------------------------------------------ no keyword accepted and ignored
def test_reset_hooks_follows_its_direction(gpt2):
    name = "blocks.0.hook_resid_post"
    gpt2.add_hook(name, lambda x, hook: None)
    gpt2.add_hook(name, lambda g, hook: None, dir="bwd")
    gpt2.reset_hooks(direction="fwd")
    point = gpt2.hook_dict[name]
    assert len(point.fwd_hooks) == 0 and len(point.bwd_hooks) == 1
    with gpt2.hooks(fwd_hooks=[(name, lambda x, hook: None)], bwd_hooks=[(name, lambda g, hook: None)]):
        gpt2.reset_hooks(direction="bwd")  # this call's backward hook goes, its forward hook stays
        assert len(point.fwd_hooks) == 1 and len(point.bwd_hooks) == 0
    gpt2.reset_hooks()
    assert not point.fwd_hooks and not point.bwd_hooks
    with pytest.raises(ValueError, match="direction must be"):
        gpt2.reset_hooks(direction="forward")


def test_keywords_fxhook_cannot_honour_are_refused(gpt2, capsys):
    tokens = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="level=1 is not supported"):
        gpt2.add_hook("blocks.0.hook_resid_post", lambda x, hook: None, level=1)
    with pytest.raises(NotImplementedError, match="shortformer_pos_embed is not supported"):
        gpt2(tokens, shortformer_pos_embed=torch.zeros(1, 3, 16))
    gpt2.to("cpu", print_details=True)
    assert "Moving model to device:  cpu" in capsys.readouterr().out  # TransformerLens's words
    with pytest.raises(TypeError, match="second argument is print_details"):
        gpt2.to("cpu", torch.float64)
