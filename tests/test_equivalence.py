"""No-processing fxhook models against the HF model they were captured from.

Every property draws a random GPT-2 / Llama / Mistral / Qwen2 config (1-4
layers, MHA/GQA/MQA, tied or not, random norm weights and random linear
biases) and a random left-padded token batch (the logits test also runs explicit
examples of every family in both coverage strata), and compares fxhook with the HF
model's own modules. HF is always called with the mask-derived positions
(`positions_for(mask)`), which is what fxhook computes internally.
"""
from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from fxhook import HookedTransformer
from fxhook.utils import get_act_name
from models import NO_SHRINK, VOCAB, ModelSpec, build_hf_model, left_padded_example, model_specs, positions_for, \
    stratum_example, token_batches
from profiles import examples


ATOL = 1e-5
ROTARY = ("llama", "mistral", "qwen2")
FAMILIES = ("gpt2", "llama", "mistral", "qwen2")


def covering_examples(test):
    """Explicit examples, on top of hypothesis's draws: every family in both coverage strata (models.STRATA:
    2-3 layers, GQA and MQA, biases on and off where the config allows, tied and untied), on a left-padded
    batch; tests/test_coverage.py checks what they cover."""
    for i, (family, stratum) in enumerate((f, s) for f in FAMILIES for s in ("A", "B")):
        test = example(spec=stratum_example(family, stratum, seed=i), batch=left_padded_example(seed=i))(test)
    return test


@functools.lru_cache(maxsize=4)
def built(spec: ModelSpec) -> tuple[torch.nn.Module, HookedTransformer]:
    hf = build_hf_model(spec)
    return hf, HookedTransformer.from_pretrained_no_processing(hf_model=hf)


def hf_logits(hf, tokens, mask) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=tokens, attention_mask=mask, position_ids=positions_for(mask)).logits


def final_norm_and_unembed(hf, spec: ModelSpec):
    if spec.family == "gpt2":
        return hf.transformer.ln_f, hf.lm_head
    return hf.model.norm, hf.lm_head


def hf_block(hf, spec: ModelSpec, layer: int):
    return hf.transformer.h[layer] if spec.family == "gpt2" else hf.model.layers[layer]


def expected_hook_shapes(spec: ModelSpec, batch: int, pos: int) -> dict[str, tuple[int, ...]]:
    """The contract table (design.md) for this config."""
    b, p, d = batch, pos, spec.d_model
    h, kv, dh, m = spec.n_heads, spec.n_kv_heads, spec.d_head, spec.d_mlp
    shapes = {"hook_embed": (b, p, d), "ln_final.hook_scale": (b, p, 1), "ln_final.hook_normalized": (b, p, d),
              "unembed.hook_in": (b, p, d), "unembed.hook_out": (b, p, VOCAB)}
    if spec.family == "gpt2":
        shapes["hook_pos_embed"] = (b, p, d)
    for layer in range(spec.n_layers):
        x = f"blocks.{layer}."
        shapes.update({
            x + "hook_resid_pre": (b, p, d), x + "hook_resid_mid": (b, p, d), x + "hook_resid_post": (b, p, d),
            x + "hook_attn_out": (b, p, d), x + "hook_mlp_out": (b, p, d),
            x + "ln1.hook_scale": (b, p, 1), x + "ln1.hook_normalized": (b, p, d),
            x + "ln2.hook_scale": (b, p, 1), x + "ln2.hook_normalized": (b, p, d),
            x + "attn.hook_q": (b, p, h, dh), x + "attn.hook_k": (b, p, kv, dh), x + "attn.hook_v": (b, p, kv, dh),
            x + "attn.hook_attn_scores": (b, h, p, p), x + "attn.hook_pattern": (b, h, p, p),
            x + "attn.hook_z": (b, p, h, dh),
            x + "mlp.hook_pre": (b, p, m), x + "mlp.hook_post": (b, p, m),
        })
        if spec.family in ROTARY:
            shapes[x + "attn.hook_rot_q"] = (b, p, h, dh)
            shapes[x + "attn.hook_rot_k"] = (b, p, kv, dh)
            shapes[x + "mlp.hook_pre_linear"] = (b, p, m)
    return shapes


# --------------------------------------------------------------------------- logits
@pytest.mark.support("*", "exact")
@settings(phases=NO_SHRINK)
@given(spec=model_specs(FAMILIES), batch=token_batches())
@covering_examples
def test_logits_match_hf_and_left_padding_is_invisible(spec, batch):
    tokens, mask = batch
    hf, model = built(spec)
    keep = mask.bool()
    with torch.no_grad():
        ours = model(tokens, attention_mask=mask)
    ref = hf_logits(hf, tokens, mask)
    assert ours.shape == ref.shape == (*tokens.shape, hf.config.vocab_size)
    assert_close(ours[keep], ref[keep], atol=ATOL, rtol=0)
    # A left-padded row gives the same logits as the same prompt alone, unpadded (and as HF on it).
    for row in range(tokens.shape[0]):
        alone = tokens[row, keep[row]][None]
        with torch.no_grad():
            ours_alone = model(alone)
        assert_close(ours[row, keep[row]], ours_alone[0], atol=ATOL, rtol=0)
        with torch.no_grad():
            hf_alone = hf(input_ids=alone).logits
        assert_close(ours_alone, hf_alone, atol=ATOL, rtol=0)
    check_return_types(model, hf, tokens, mask)


# ------------------------------------------------------------------------ hook set
@pytest.mark.support("*", "hooks")
@settings(phases=NO_SHRINK)
@given(spec=model_specs(), batch=token_batches(max_len=8))
def test_hook_set_and_shapes_follow_the_contract(spec, batch):
    tokens, mask = batch
    hf, model = built(spec)
    expected = expected_hook_shapes(spec, *tokens.shape)
    assert set(model.hook_dict) == set(expected), (
        f"missing {sorted(set(expected) - set(model.hook_dict))}, extra {sorted(set(model.hook_dict) - set(expected))}")
    for name, point in model.hook_dict.items():
        assert point.name == name
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, attention_mask=mask)
    assert set(cache.keys()) == set(expected)
    wrong = {n: (tuple(cache[n].shape), s) for n, s in expected.items() if tuple(cache[n].shape) != s}
    assert not wrong, f"hook shapes (got, contract): {wrong}"

    # hook_mlp_in exists only while its flag is on; it is the MLP's input, i.e. resid_mid.
    mlp_in = {f"blocks.{layer}.hook_mlp_in" for layer in range(spec.n_layers)}
    try:
        model.set_use_hook_mlp_in(True)
        assert set(model.hook_dict) == set(expected) | mlp_in
        with torch.no_grad():
            _, cache_in = model.run_with_cache(tokens, attention_mask=mask)
        for layer in range(spec.n_layers):
            x = cache_in[f"blocks.{layer}.hook_mlp_in"]
            assert tuple(x.shape) == expected[f"blocks.{layer}.hook_resid_mid"]
            assert_close(x, cache_in[f"blocks.{layer}.hook_resid_mid"], atol=0, rtol=0)
    finally:
        model.set_use_hook_mlp_in(False)
    assert set(model.hook_dict) == set(expected)
    check_residual_stream(spec, hf, logits, cache, tokens, mask)


def check_residual_stream(spec, hf, logits, cache, tokens, mask):
    """Embeddings are HF's, the residual stream decomposes as in TransformerLens, and the last
    hook_resid_post through HF's final norm and unembedding gives the logits."""
    keep = mask.bool()
    with torch.no_grad():
        # the embeddings are HF's own
        if spec.family == "gpt2":
            assert_close(cache["hook_embed"], hf.transformer.wte(tokens), atol=0, rtol=0)
            pos = hf.transformer.wpe(positions_for(mask))
            assert_close(cache["hook_pos_embed"][keep], pos[keep], atol=0, rtol=0)
            assert_close(cache["blocks.0.hook_resid_pre"][keep],
                         (cache["hook_embed"] + cache["hook_pos_embed"])[keep], atol=ATOL, rtol=0)
        else:
            assert_close(cache["hook_embed"], hf.model.embed_tokens(tokens), atol=0, rtol=0)
            assert_close(cache["blocks.0.hook_resid_pre"], cache["hook_embed"], atol=0, rtol=0)
        for layer in range(spec.n_layers):
            x = f"blocks.{layer}."
            assert_close(cache[x + "hook_resid_mid"], cache[x + "hook_resid_pre"] + cache[x + "hook_attn_out"],
                         atol=ATOL, rtol=0)
            assert_close(cache[x + "hook_resid_post"], cache[x + "hook_resid_mid"] + cache[x + "hook_mlp_out"],
                         atol=ATOL, rtol=0)
            if layer + 1 < spec.n_layers:
                assert_close(cache[f"blocks.{layer + 1}.hook_resid_pre"], cache[x + "hook_resid_post"],
                             atol=0, rtol=0)
        # the last residual through HF's final norm and unembedding reproduces the logits
        norm, unembed = final_norm_and_unembed(hf, spec)
        resid = cache[f"blocks.{spec.n_layers - 1}.hook_resid_post"]
        assert_close(unembed(norm(resid))[keep], logits[keep], atol=ATOL, rtol=0)
    assert_close(logits[keep], hf_logits(hf, tokens, mask)[keep], atol=ATOL, rtol=0)


# ----------------------------------------------------------------------- attention
@pytest.mark.support("*", "hooks")
@settings(phases=NO_SHRINK)
@given(spec=model_specs(), batch=token_batches())
def test_attention_hooks(spec, batch):
    tokens, mask = batch
    hf, model = built(spec)
    check_pattern_is_causal_normalised_and_masks_padding(spec, model, tokens, mask)
    check_qkv_hooks_are_hf_projections_and_rotary_matches_hf(spec, hf, model, tokens, mask)


def check_pattern_is_causal_normalised_and_masks_padding(spec, model, tokens, mask):
    b, p = tokens.shape
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask,
                                        names_filter=lambda n: n.endswith(("hook_pattern", "hook_attn_scores")))
    query_real = mask.bool()[:, None, :, None].expand(b, spec.n_heads, p, p)
    key_real = mask.bool()[:, None, None, :].expand(b, spec.n_heads, p, p)
    causal = torch.ones(p, p, dtype=torch.bool).tril().expand(b, spec.n_heads, p, p)
    allowed = causal & key_real
    for layer in range(spec.n_layers):
        pattern = cache["pattern", layer]
        scores = cache["attn_scores", layer]
        rows = pattern.sum(-1)[query_real[..., 0]]
        assert_close(rows, torch.ones_like(rows), atol=ATOL, rtol=0)
        assert (pattern[query_real & ~allowed] == 0).all(), "attention to the future or to padding"
        assert (pattern >= 0).all()
        masked_scores = scores[query_real & ~allowed]
        assert torch.isneginf(masked_scores).all(), "masked scores must be -inf"
        assert torch.isfinite(scores[query_real & allowed]).all()
        # the pattern is the softmax of the scores
        expect = torch.softmax(scores.masked_fill(~query_real, 0.0), dim=-1)
        assert_close(pattern[query_real], expect[query_real], atol=ATOL, rtol=0)


def check_qkv_hooks_are_hf_projections_and_rotary_matches_hf(spec, hf, model, tokens, mask):
    """hook_q/k/v are the projections of ln1's output, BEFORE rotary; rot_q/rot_k are HF's rotation."""
    keep = mask.bool()
    b, p = tokens.shape
    h, kv, dh = spec.n_heads, spec.n_kv_heads, spec.d_head
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask)
        for layer in range(spec.n_layers):
            x = f"blocks.{layer}."
            block = hf_block(hf, spec, layer)
            resid = cache[x + "hook_resid_pre"]
            if spec.family == "gpt2":
                q, k, v = block.attn.c_attn(block.ln_1(resid)).split(spec.d_model, dim=-1)
            else:
                normed = block.input_layernorm(resid)
                attn = block.self_attn
                q, k, v = attn.q_proj(normed), attn.k_proj(normed), attn.v_proj(normed)
            q, k, v = q.view(b, p, h, dh), k.view(b, p, kv, dh), v.view(b, p, kv, dh)
            assert_close(cache[x + "attn.hook_q"][keep], q[keep], atol=ATOL, rtol=0)
            assert_close(cache[x + "attn.hook_k"][keep], k[keep], atol=ATOL, rtol=0)
            assert_close(cache[x + "attn.hook_v"][keep], v[keep], atol=ATOL, rtol=0)
            if spec.family in ROTARY:
                q_hook, k_hook = cache[x + "attn.hook_q"], cache[x + "attn.hook_k"]
                cos, sin = hf.model.rotary_emb(q_hook, position_ids=positions_for(mask))
                rot_q, rot_k = apply_rotary_pos_emb(q_hook, k_hook, cos, sin, unsqueeze_dim=2)
                assert_close(cache[x + "attn.hook_rot_q"][keep], rot_q[keep], atol=ATOL, rtol=0)
                assert_close(cache[x + "attn.hook_rot_k"][keep], rot_k[keep], atol=ATOL, rtol=0)
                # the scores are built from the rotated q and k
                rk = cache[x + "attn.hook_rot_k"].repeat_interleave(h // kv, dim=2)
                scores = torch.einsum("bqhd,bkhd->bhqk", cache[x + "attn.hook_rot_q"], rk) * dh ** -0.5
                q_real = keep[:, None, :, None] & keep[:, None, None, :]
                causal = torch.ones(p, p, dtype=torch.bool).tril()
                sel = (q_real & causal).expand(b, h, p, p)
                assert_close(cache[x + "attn.hook_attn_scores"][sel], scores[sel], atol=ATOL, rtol=0)
            # z is the pattern applied to v (kv heads repeated for each query group)
            v_rep = cache[x + "attn.hook_v"].repeat_interleave(h // kv, dim=2)
            z = torch.einsum("bhqk,bkhd->bqhd", cache[x + "attn.hook_pattern"], v_rep)
            assert_close(cache[x + "attn.hook_z"][keep], z[keep], atol=ATOL, rtol=0)


# ------------------------------------------------------------------- interventions
@pytest.mark.support("*", "hooks")
@settings(phases=NO_SHRINK)
@given(spec=model_specs(), batch=token_batches(), data=st.data())
def test_zeroing_a_head_matches_the_same_edit_inside_hf(spec, batch, data):
    tokens, mask = batch
    hf, model = built(spec)
    layer = data.draw(st.integers(0, spec.n_layers - 1), label="layer")
    head = data.draw(st.integers(0, spec.n_heads - 1), label="head")
    keep = mask.bool()
    dh = spec.d_head

    def zero_head(z, hook):
        z = z.clone()
        z[:, :, head] = 0.0
        return z

    def hf_zero_head(_module, args):
        x = args[0].clone()
        x[..., head * dh:(head + 1) * dh] = 0.0
        return (x, *args[1:])

    with torch.no_grad():
        ours = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[(get_act_name("z", layer), zero_head)])
        clean = model(tokens, attention_mask=mask)
    block = hf_block(hf, spec, layer)
    out_proj = block.attn.c_proj if spec.family == "gpt2" else block.self_attn.o_proj
    handle = out_proj.register_forward_pre_hook(hf_zero_head)
    try:
        ref = hf_logits(hf, tokens, mask)
    finally:
        handle.remove()
    assert_close(ours[keep], ref[keep], atol=ATOL, rtol=0)
    # the edit did something (so the comparison above is not clean-vs-clean)
    assert (ours[keep] - clean[keep]).abs().max() > 1e-6


# ------------------------------------------------------- layer slicing and return types
@settings(max_examples=examples(4), phases=NO_SHRINK)
@given(spec=model_specs(), batch=token_batches(), data=st.data())
def test_stop_and_start_at_layer(spec, batch, data):
    tokens, mask = batch
    hf, model = built(spec)
    keep = mask.bool()
    n = spec.n_layers
    stop = data.draw(st.integers(0, n), label="stop_at_layer")
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, attention_mask=mask)
        resid = model(tokens, attention_mask=mask, stop_at_layer=stop)
    entering = cache[f"blocks.{stop}.hook_resid_pre"] if stop < n else cache[f"blocks.{n - 1}.hook_resid_post"]
    assert resid.shape == (*tokens.shape, spec.d_model)
    assert_close(resid, entering, atol=ATOL, rtol=0)  # the unhooked run fuses attention: float error only
    negative = data.draw(st.booleans(), label="negative index")
    if stop < n:
        start = stop - n if negative else stop
        with torch.no_grad():
            resumed = model(resid, start_at_layer=start, attention_mask=mask)
        assert_close(resumed[keep], logits[keep], atol=ATOL, rtol=0)
        # resuming keeps hooks working in the later blocks
        with torch.no_grad():
            _, part = model.run_with_cache(resid, start_at_layer=stop, attention_mask=mask)
        assert all(int(k.split(".")[1]) >= stop for k in part.keys() if k.startswith("blocks."))
        assert_close(part[f"blocks.{n - 1}.hook_resid_post"], cache[f"blocks.{n - 1}.hook_resid_post"],
                     atol=ATOL, rtol=0)


def reference_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross entropy over pairs where both positions are real tokens, and per token."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    return nll[valid].mean().float(), nll.float(), valid


def check_return_types(model, hf, tokens, mask):
    """return_type "loss" / "both" / None and loss_per_token, against a loss computed from HF's logits."""
    ref = hf_logits(hf, tokens, mask)
    loss_ref, nll_ref, valid = reference_loss(ref, tokens, mask)
    with torch.no_grad():
        loss = model(tokens, attention_mask=mask, return_type="loss")
        both = model(tokens, attention_mask=mask, return_type="both")
        per_token = model(tokens, attention_mask=mask, return_type="loss", loss_per_token=True)
        none = model(tokens, attention_mask=mask, return_type=None)
    assert none is None
    assert loss.shape == ()
    logits, loss_both = both
    assert both.logits is logits and both.loss is loss_both
    assert_close(logits[mask.bool()], ref[mask.bool()], atol=ATOL, rtol=0)
    assert per_token.shape == (tokens.shape[0], tokens.shape[1] - 1)
    assert_close(per_token[valid], nll_ref[valid], atol=ATOL, rtol=1e-5)
    with torch.no_grad():
        out, cache = model.run_with_cache(tokens, attention_mask=mask, return_type="loss")
    assert len(cache) == len(model.hook_dict)
    if valid.any():  # with no (real, real) token pair the mean loss is 0/0
        for value in (loss, loss_both, out):
            assert_close(value, loss_ref, atol=ATOL, rtol=1e-5)
    with pytest.raises(ValueError):
        model(tokens, attention_mask=mask, return_type="logprobs")
