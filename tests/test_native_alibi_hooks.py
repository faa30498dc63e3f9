"""ALiBi, Llama-like configs on the native model, and the hooks hook_tokens / unembed.hook_in / unembed.hook_out,
each against TransformerLens 3.9 built offline from the same config and state dict.

tests/test_native_tl.py draws configs across TransformerLens's space (ALiBi among its strata); this file checks
what a drawn config does not: ALiBi under left padding and inside the KV cache, TransformerLens state dicts that
HF's Llama could not hold (a nonzero gated b_in), and the values and edits of the three hooks.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from fxhook import HookedTransformer
from test_native_tl import _randomised_tl_model, _tl_model

transformer_lens = pytest.importorskip("transformer_lens")

NO_PROCESSING = dict(fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False)
BASE = dict(n_layers=2, d_model=16, d_head=4, n_heads=4, d_mlp=32, d_vocab=50, n_ctx=24, device="cpu", seed=0)
ALIBI = dict(BASE, act_fn="gelu_new", normalization_type="LN", positional_embedding_type="alibi",
             n_key_value_heads=2)
LLAMA_LIKE = dict(BASE, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True,
                  final_rms=True, n_key_value_heads=2, rotary_base=500.0, eps=1e-6)
GPT2_LIKE = dict(BASE, act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard")

_randomised = _randomised_tl_model  # every parameter random, norm weights 1 + noise


def _pair(cfg: dict, seed: int = 0):
    """(TransformerLens's random model, fxhook's HookedTransformer(cfg) holding its state dict unprocessed)."""
    theirs = _randomised(cfg, seed)
    ours = HookedTransformer(copy.deepcopy(cfg))
    ours.load_and_process_state_dict(_state(theirs), **NO_PROCESSING)
    return theirs, ours


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _tokens(seed: int, shape=(2, 9)) -> torch.Tensor:
    return torch.randint(0, 50, shape, generator=torch.Generator().manual_seed(seed))


def _assert_caches_match(ours_cache, theirs_cache, names, rows=None, tol=1e-5) -> None:
    for name in names:
        mine, ref = ours_cache[name], theirs_cache[name]
        if rows is not None:  # [b, p, ...] or [b, h, p, p]: compare the real query positions only
            mine, ref = (mine.transpose(1, 2)[rows], ref.transpose(1, 2)[rows]) if "attn_scores" in name or \
                "pattern" in name else (mine[rows], ref[rows])
        torch.testing.assert_close(mine, ref, atol=tol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------ ALiBi
def test_alibi_bias_is_transformer_lens_bias():
    """The bias fxhook's attention adds, from a mask alone, is TransformerLens's create_alibi_bias."""
    from transformer_lens.components.abstract_attention import AbstractAttention

    from fxhook.core.attention_math import alibi_bias
    from fxhook.native.modules import alibi_slopes

    for n_heads, p in ((4, 6), (6, 5), (16, 3)):
        q = torch.zeros(1, n_heads, p, 2)
        causal = torch.ones(p, p, dtype=torch.bool).tril()[None, None]
        ours = alibi_bias(alibi_slopes(n_heads), q, q, causal)
        theirs = AbstractAttention.create_alibi_bias(n_heads, p, "cpu")
        assert torch.equal(ours[0].masked_fill(~causal[0], 0.0), theirs)  # TransformerLens: 0 above the diagonal
    # queries at arbitrary cache slots (a static cache): each row counts from its own query, read off the mask
    slots = torch.tensor([2, 5])
    mask = (torch.arange(8)[None, :] <= slots[:, None])[None, None]  # [1, 1, 2, 8]
    bias = alibi_bias([0.5], torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 8, 2), mask)
    torch.testing.assert_close(bias[0, 0, 1, :6], 0.5 * (torch.arange(6.0) - 5))
    torch.testing.assert_close(bias[0, 0, 0, :3], 0.5 * (torch.arange(3.0) - 2))


def test_alibi_left_padded_batch_matches_transformer_lens():
    theirs, ours = _pair(ALIBI)
    assert type(ours.hf_model).__name__ == "TLNativeForCausalLM" and "hook_pos_embed" not in ours.hook_dict
    tokens = _tokens(1)
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0  # row 0 left-padded by three
    with torch.no_grad():
        our_logits, our_cache = ours.run_with_cache(tokens, attention_mask=mask)
        their_logits, their_cache = theirs.run_with_cache(tokens, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(our_logits[real], their_logits[real], atol=1e-5, rtol=1e-5)
    names = [f"blocks.{layer}.attn.{leaf}" for layer in range(2) for leaf in ("hook_attn_scores", "hook_pattern",
                                                                               "hook_z")]
    _assert_caches_match(our_cache, their_cache, names, rows=real)


def test_alibi_inside_the_kv_cache_matches_transformer_lens():
    """Greedy generation equals TransformerLens's, and the scores a hook sees at the last decode step (one
    query against the cache) are the row of TransformerLens's scores over the whole sequence."""
    theirs, ours = _pair(ALIBI, seed=1)
    tokens = _tokens(2, (2, 6))
    seen = []
    with torch.no_grad():
        with ours.hooks(fwd_hooks=[("blocks.1.attn.hook_attn_scores", lambda x, hook: seen.append(x.clone()))]):
            our_out = ours.generate(tokens, max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            their_out = theirs.generate(tokens, max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False)
        assert torch.equal(our_out, their_out)
        last = seen[-1]  # [b, h, 1, keys]: the query at index keys - 1
        assert last.shape[2] == 1 and len(seen) > 1
        keys = last.shape[-1]
        _, their_cache = theirs.run_with_cache(our_out[:, :keys], names_filter="blocks.1.attn.hook_attn_scores")
    torch.testing.assert_close(last[:, :, 0], their_cache["blocks.1.attn.hook_attn_scores"][:, :, keys - 1],
                               atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------- Llama-like configs
def test_llama_like_config_takes_what_hf_llama_cannot_hold():
    """A Llama-like TransformerLens config is built natively: its state dict with a nonzero gated b_in (added
    after the gate product in TransformerLens, inside it in HF's Llama) gives TransformerLens's logits, hooks,
    generation and processed model."""
    theirs, ours = _pair(LLAMA_LIKE, seed=2)
    assert type(ours.hf_model).__name__ == "TLNativeForCausalLM"
    assert theirs.blocks[0].mlp.b_in.abs().min() > 0  # really nonzero
    tokens = _tokens(3)
    with torch.no_grad():
        our_logits, our_cache = ours.run_with_cache(tokens)
        their_logits, their_cache = theirs.run_with_cache(tokens)
    torch.testing.assert_close(our_logits, their_logits, atol=1e-5, rtol=1e-5)
    shared = sorted(set(our_cache.keys()) & set(their_cache.keys()))
    assert {"blocks.1.mlp.hook_pre_linear", "blocks.1.attn.hook_rot_k", "unembed.hook_out"} <= set(shared)
    assert set(ours.hook_dict) <= set(theirs.hook_dict)  # every hook of ours is one of TransformerLens's
    _assert_caches_match(our_cache, their_cache, shared)
    with torch.no_grad():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            their_gen = theirs.generate(tokens, max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False)
        our_gen = ours.generate(tokens, max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False)
    assert torch.equal(our_gen, their_gen)
    # processed (fold_ln, centring, value-bias folding) against TransformerLens's processed model
    their_processed = _tl_model(LLAMA_LIKE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        their_processed.load_and_process_state_dict(_state(theirs))
        ours.load_and_process_state_dict(_state(theirs))
    with torch.no_grad():
        our_logits, our_cache = ours.run_with_cache(tokens)
        their_logits, their_cache = their_processed.run_with_cache(tokens)
    torch.testing.assert_close(our_logits, their_logits, atol=1e-4, rtol=1e-4)
    _assert_caches_match(our_cache, their_cache, sorted(set(our_cache.keys()) & set(their_cache.keys())), tol=1e-4)


# -------------------------------------------- hook_tokens, unembed.hook_in / hook_out
@pytest.mark.parametrize("cfg, built_as", [(GPT2_LIKE, "GPT2LMHeadModel"), (ALIBI, "TLNativeForCausalLM")])
def test_token_and_unembed_hooks_match_transformer_lens(cfg, built_as):
    theirs, ours = _pair(dict(cfg, use_hook_tokens=True), seed=3)
    assert type(ours.hf_model).__name__ == built_as
    names = ["hook_tokens", "unembed.hook_in", "unembed.hook_out"]
    tokens = _tokens(4)
    with torch.no_grad():
        our_logits, our_cache = ours.run_with_cache(tokens)
        _, their_cache = theirs.run_with_cache(tokens)
    assert torch.equal(our_cache["hook_tokens"], tokens)
    _assert_caches_match(our_cache, their_cache, names)
    torch.testing.assert_close(our_cache["unembed.hook_out"], our_logits, atol=0, rtol=0)

    def shift(t, hook):  # a hook on the token ids changes what is embedded
        return (t + 7) % 50

    def scale(x, hook):  # and one on the unembedding's input changes the logits
        return 2 * x

    with torch.no_grad():
        for edit in (("hook_tokens", shift), ("unembed.hook_in", scale)):
            mine = ours.run_with_hooks(tokens, fwd_hooks=[edit])
            ref = theirs.run_with_hooks(tokens, fwd_hooks=[edit])
            torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(mine, our_logits)


def test_hook_tokens_exists_only_with_its_flag():
    model = HookedTransformer(dict(ALIBI))
    assert "hook_tokens" not in model.hook_dict
    assert {"unembed.hook_in", "unembed.hook_out"} <= set(model.hook_dict)  # always there, as in TransformerLens
    assert not hasattr(model, "hook_tokens")  # as in TransformerLens without the flag
    tokens = _tokens(5)
    with pytest.raises(KeyError, match=r"use_hook_tokens is on \(model.cfg.use_hook_tokens = True\)"):
        model.run_with_hooks(tokens, fwd_hooks=[("hook_tokens", lambda t, hook: t)])
    with torch.no_grad():
        before = model(tokens)
        model.cfg.use_hook_tokens = True
        _, cache = model.run_with_cache(tokens)
    assert torch.equal(cache["hook_tokens"], tokens) and model.hook_tokens is model.hook_dict["hook_tokens"]
    assert model.unembed.hook_out is model.hook_dict["unembed.hook_out"]  # TransformerLens's attribute paths
    torch.testing.assert_close(cache["unembed.hook_out"], before, atol=0, rtol=0)


# ------------------------------------------------- TransformerLens's own checkpoints from a folder
def _save_tl_checkpoint(folder, theirs, config: dict) -> None:
    """What a TransformerLens-trained repository holds (NeelNanda's layout): config.json and model_final.pth."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(_state(theirs), folder / "model_final.pth")


NEEL_ATTN_ONLY = dict(d_model=16, n_layers=2, d_mlp=64, d_head=4, n_heads=4, n_ctx=24, d_vocab=50, act_fn="gelu_new",
                      attn_only=True, normalization="LN", shortformer_pos=True, tokenizer_name=None, lr=1e-3,
                      batch_size=8)  # Neel's spellings, and training settings that are not model fields


def test_transformer_lens_checkpoint_folder_loads_as_transformer_lens_loads_it(tmp_path):
    from fxhook.runtime.tl_checkpoint import tl_config_from_json

    tl_cfg = dict(tl_config_from_json(NEEL_ATTN_ONLY), device="cpu", seed=0)
    assert (tl_cfg["normalization_type"], tl_cfg["positional_embedding_type"]) == ("LN", "shortformer")
    assert "lr" not in tl_cfg
    theirs = _randomised(tl_cfg, seed=5)
    _save_tl_checkpoint(tmp_path / "attn-only", theirs, NEEL_ATTN_ONLY)
    ours = HookedTransformer.from_pretrained_no_processing(tmp_path / "attn-only", device="cpu")
    assert type(ours.hf_model).__name__ == "TLNativeForCausalLM" and ours.cfg.attn_only
    tokens = _tokens(6)
    with torch.no_grad():
        our_logits, our_cache = ours.run_with_cache(tokens)
        their_logits, their_cache = theirs.run_with_cache(tokens)
    torch.testing.assert_close(our_logits, their_logits, atol=1e-5, rtol=1e-5)
    _assert_caches_match(our_cache, their_cache, sorted(set(our_cache.keys()) & set(their_cache.keys())))

    # a GPT-2-like checkpoint, processed as TransformerLens's from_pretrained processes it
    config = dict(NEEL_ATTN_ONLY, attn_only=False, shortformer_pos=False)
    theirs = _randomised(dict(tl_config_from_json(config), device="cpu", seed=0), seed=6)
    _save_tl_checkpoint(tmp_path / "gelu", theirs, config)
    processed = HookedTransformer.from_pretrained(str(tmp_path / "gelu"), device="cpu")
    their_processed = _tl_model(dict(tl_config_from_json(config), device="cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        their_processed.load_and_process_state_dict(_state(theirs))
    with torch.no_grad():
        torch.testing.assert_close(processed(tokens), their_processed(tokens), atol=1e-4, rtol=1e-4)


def test_transformer_lens_checkpoint_folder_refusals(tmp_path):
    from fxhook.runtime.tl_checkpoint import tl_config_from_json

    config = dict(NEEL_ATTN_ONLY, attn_only=False, shortformer_pos=False)
    theirs = _randomised(dict(tl_config_from_json(config), device="cpu"), seed=7)
    _save_tl_checkpoint(tmp_path / "a", theirs, config)
    with pytest.raises(ValueError, match="first_n_layers"):
        HookedTransformer.from_pretrained(tmp_path / "a", first_n_layers=1)
    torch.save(_state(theirs), tmp_path / "a" / "other_final.pth")
    with pytest.raises(ValueError, match="2 files ending in 'final.pth'"):
        HookedTransformer.from_pretrained(tmp_path / "a")
    _save_tl_checkpoint(tmp_path / "old", theirs, dict(config, architecture="neel-solu-old"))
    with pytest.raises(NotImplementedError, match="old SoLU"):
        HookedTransformer.from_pretrained(tmp_path / "old")
