"""Gemma, Gemma 2, Qwen3, OLMo 2, Mixtral, windowed Mistral and Qwen2 against the HF model and TransformerLens 3.9.

Per family and coverage stratum (models.STRATA fixes layers, GQA/MQA, biases, tying, Gemma 2's window,
caps and query scale, Mistral's window, Mixtral's experts; hypothesis draws the rest): logits exact to
1e-5 without processing (left padding included), the hook set and shapes of the contract plus the
family's own hooks (TransformerLens's names), hook values read from the HF modules, log-probs to 1e-4
with processing, TransformerLens's activations at every shared hook, and greedy generation with the KV
cache equal to HF's generate(use_cache=True).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from family_models import POST_NORM, QK_NORM, FamilySpec, build_family_model, family_specs
from fxhook import HookedTransformer
from models import NO_SHRINK, STRATA, VOCAB, left_padded_batches, positions_for
from tl_reference_norms import tl_model
from profiles import examples

ATOL = 1e-5
# one example per family and coverage stratum under the "ci" profile (each costs a capture), ten under
# "thorough" (models.STRATA; tests/test_coverage.py checks what the strata cover)
EXAMPLES = examples(1)
BATCHES = left_padded_batches(max_len=10)
FAMILIES = ("gemma", "gemma2", "qwen3", "olmo2", "mixtral", "mistral", "qwen2")
TL_FAMILIES = ("gemma", "gemma2", "qwen3", "olmo2", "mixtral")  # TransformerLens 3.9 has these
# Mistral's generation past its window: tests/test_generate.py; Qwen2 here for its always-on q/k/v biases
GENERATE_FAMILIES = (*TL_FAMILIES, "qwen2")
# the HF module (in each decoder layer) whose output is what the attention / MLP adds to the residual
HF_ATTN_OUT = {"gemma2": "post_attention_layernorm", "olmo2": "post_attention_layernorm"}
HF_MLP_OUT = {"gemma2": "post_feedforward_layernorm", "olmo2": "post_feedforward_layernorm"}
PER_HEAD_FLAGS = ("set_use_attn_result", "set_use_split_qkv_input", "set_use_attn_in")
# post-norm blocks normalise q/k over all heads and the attention output as a whole: the per-head flags
# are refused there (fxhook/passes/per_head.py), with an error that says what to hook instead
POST_NORM_REFUSED = {("olmo2", flag) for flag in PER_HEAD_FLAGS}


def tagged(families, *features):
    """(family, stratum) for every family and coverage stratum, marked with the support features."""
    return [pytest.param(f, stratum, marks=[pytest.mark.support(f, feat) for feat in features], id=f"{f}-{stratum}")
            for f in families for stratum in STRATA]


@functools.lru_cache(maxsize=2)
def built(spec: FamilySpec) -> tuple[torch.nn.Module, HookedTransformer]:
    hf = build_family_model(spec)
    return hf, HookedTransformer.from_pretrained_no_processing(hf_model=hf)


def expected_hook_shapes(spec: FamilySpec, b: int, p: int) -> dict[str, tuple[int, ...]]:
    """The contract table (design.md) plus each family's extra hooks, named as TransformerLens names them."""
    d, h, kv, dh, m = spec.d_model, spec.n_heads, spec.n_kv_heads, spec.d_head, spec.d_mlp
    shapes = {"hook_embed": (b, p, d), "ln_final.hook_scale": (b, p, 1), "ln_final.hook_normalized": (b, p, d),
              "unembed.hook_in": (b, p, d), "unembed.hook_out": (b, p, VOCAB)}
    for layer in range(spec.n_layers):
        x = f"blocks.{layer}."
        norms = ["ln1", "ln2"] + (["ln1_post", "ln2_post"] if spec.family == "gemma2" else [])
        for norm in norms:
            shapes.update({f"{x}{norm}.hook_scale": (b, p, 1), f"{x}{norm}.hook_normalized": (b, p, d)})
        shapes.update({
            x + "hook_resid_pre": (b, p, d), x + "hook_resid_mid": (b, p, d), x + "hook_resid_post": (b, p, d),
            x + "hook_attn_out": (b, p, d), x + "hook_mlp_out": (b, p, d),
            x + "attn.hook_q": (b, p, h, dh), x + "attn.hook_k": (b, p, kv, dh), x + "attn.hook_v": (b, p, kv, dh),
            x + "attn.hook_rot_q": (b, p, h, dh), x + "attn.hook_rot_k": (b, p, kv, dh),
            x + "attn.hook_attn_scores": (b, h, p, p), x + "attn.hook_pattern": (b, h, p, p),
            x + "attn.hook_z": (b, p, h, dh),
        })
        if spec.family == "mixtral":
            shapes.update({x + "mlp.hook_expert_weights": (b, p, spec.n_experts),
                           x + "mlp.hook_expert_indices": (b, p, spec.top_k)})
        else:
            shapes.update({x + "mlp.hook_pre": (b, p, m), x + "mlp.hook_pre_linear": (b, p, m),
                           x + "mlp.hook_post": (b, p, m)})
        if spec.family == "qwen3":  # per head
            shapes.update({x + "attn.q_norm.hook_scale": (b, p, h, 1), x + "attn.q_norm.hook_normalized": (b, p, h, dh),
                           x + "attn.k_norm.hook_scale": (b, p, kv, 1),
                           x + "attn.k_norm.hook_normalized": (b, p, kv, dh)})
        if spec.family == "olmo2":  # over all heads at once
            shapes.update({x + "attn.q_norm.hook_scale": (b, p, 1), x + "attn.q_norm.hook_normalized": (b, p, h * dh),
                           x + "attn.k_norm.hook_scale": (b, p, 1),
                           x + "attn.k_norm.hook_normalized": (b, p, kv * dh)})
    return shapes


def hf_run(hf, tokens, mask, paths: dict[str, str]) -> tuple[torch.Tensor, dict]:
    """HF's logits, and per layer its decoder layer's input and the outputs of the modules in `paths`."""
    store: dict[tuple[int, str], object] = {}
    handles = []

    def keep(key):
        return lambda _m, _a, out: store.__setitem__(key, out)

    for layer, block in enumerate(hf.model.layers):
        handles.append(block.register_forward_pre_hook(
            lambda _m, args, kw, layer=layer: store.__setitem__((layer, "resid_pre"), args[0] if args else
                                                                kw["hidden_states"]), with_kwargs=True))
        handles += [block.get_submodule(path).register_forward_hook(keep((layer, key))) for key, path in paths.items()]
    try:
        with torch.no_grad():
            logits = hf(input_ids=tokens, attention_mask=mask, position_ids=positions_for(mask)).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, store


def first(x):
    return x[0] if isinstance(x, tuple) else x


# --------------------------------------------------------------------- no processing
@pytest.mark.parametrize("family, stratum", tagged(FAMILIES, "exact", "hooks"))
@settings(max_examples=EXAMPLES, phases=NO_SHRINK)
@given(data=st.data())
def test_logits_exact_hooks_follow_the_contract_and_read_hf_values(family, stratum, data):
    spec = data.draw(family_specs(family, stratum), label="spec")
    tokens, mask = data.draw(BATCHES, label="batch")
    hf, model = built(spec)
    keep = mask.bool()
    paths = {"attn_out": HF_ATTN_OUT.get(family, "self_attn"), "mlp_out": HF_MLP_OUT.get(family, "mlp"),
             "q_proj": "self_attn.q_proj"}
    if family in QK_NORM:
        paths.update(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")
    if family == "gemma2":
        paths.update(ln1_post="post_attention_layernorm", ln2_post="post_feedforward_layernorm")
    if family == "mixtral":
        paths["router"] = "mlp.gate"
    ref, hf_values = hf_run(hf, tokens, mask, paths)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, attention_mask=mask)
    assert_close(logits[keep], ref[keep], atol=ATOL, rtol=0)

    expected = expected_hook_shapes(spec, *tokens.shape)
    assert set(model.hook_dict) == set(expected), (
        f"missing {sorted(set(expected) - set(model.hook_dict))}, extra {sorted(set(model.hook_dict) - set(expected))}")
    wrong = {n: (tuple(cache[n].shape), s) for n, s in expected.items() if tuple(cache[n].shape) != s}
    assert not wrong, f"hook shapes (got, contract): {wrong}"

    b, p = tokens.shape
    table = hf.model.embed_tokens.weight
    if family in ("gemma", "gemma2"):  # hook_embed is the embedding scaled by sqrt(d_model), as in TransformerLens
        scale = torch.tensor(spec.d_model ** 0.5, dtype=table.dtype)
        assert_close(cache["hook_embed"], table[tokens] * scale, atol=0, rtol=0)
    else:
        assert_close(cache["hook_embed"], table[tokens], atol=0, rtol=0)
    for layer in range(spec.n_layers):
        x = f"blocks.{layer}."

        def hf_value(key):
            return first(hf_values[(layer, key)])[keep] if key != "router" else None
        assert_close(cache[x + "hook_resid_pre"][keep], hf_value("resid_pre"), atol=ATOL, rtol=0)
        assert_close(cache[x + "hook_attn_out"][keep], hf_value("attn_out"), atol=ATOL, rtol=0)
        assert_close(cache[x + "hook_mlp_out"][keep], hf_value("mlp_out"), atol=ATOL, rtol=0)
        assert_close(cache[x + "hook_resid_mid"], cache[x + "hook_resid_pre"] + cache[x + "hook_attn_out"],
                     atol=ATOL, rtol=0)
        assert_close(cache[x + "hook_resid_post"], cache[x + "hook_resid_mid"] + cache[x + "hook_mlp_out"],
                     atol=ATOL, rtol=0)
        # relative to its size: Gemma 2's test models scale q by 30 (so the soft-cap bites)
        q_ref = hf_value("q_proj").unflatten(-1, (spec.n_heads, -1))
        assert_close(cache[x + "attn.hook_q"][keep], q_ref, atol=ATOL * max(1.0, float(q_ref.abs().max())), rtol=0)
        block = hf.model.layers[layer]
        if family in QK_NORM:  # hook_normalized is before the weight: HF's q_norm output is it times w
            for qk in ("q", "k"):
                w = getattr(block.self_attn, f"{qk}_norm").weight
                ours = cache[x + f"attn.{qk}_norm.hook_normalized"][keep] * w
                assert_close(ours, hf_value(f"{qk}_norm").reshape(ours.shape), atol=ATOL, rtol=0)
        if family == "gemma2":  # (1 + w) RMSNorms after attention and MLP
            for norm, hf_norm in (("ln1_post", block.post_attention_layernorm),
                                  ("ln2_post", block.post_feedforward_layernorm)):
                ours = cache[x + f"{norm}.hook_normalized"][keep] * (1 + hf_norm.weight)
                assert_close(ours, hf_value(norm), atol=ATOL, rtol=0)
        if family == "mixtral":  # routing: softmax over all experts, then HF's top-k choice
            router_logits, _, indices = hf_values[(layer, "router")]
            assert_close(cache[x + "mlp.hook_expert_weights"],
                         torch.softmax(router_logits.float(), -1).view(b, p, -1), atol=ATOL, rtol=0)
            assert torch.equal(cache[x + "mlp.hook_expert_indices"], indices.view(b, p, -1))
    if family == "gemma2":
        check_soft_caps_apply(spec, hf, model, cache, logits, keep)
    for flag in PER_HEAD_FLAGS:  # the flag-gated per-head hooks keep the logits
        if (family, flag) in POST_NORM_REFUSED or (flag == "set_use_attn_in" and spec.n_kv_heads != spec.n_heads):
            continue
        getattr(model, flag)(True)
        try:
            with torch.no_grad():
                assert_close(model(tokens, attention_mask=mask)[keep], ref[keep], atol=ATOL, rtol=0, msg=flag)
        finally:
            getattr(model, flag)(False)


def check_soft_caps_apply(spec, hf, model, cache, logits, keep):
    """hook_attn_scores are cap * tanh(raw / cap) as in TransformerLens, and both caps change the output
    on this model (so a dropped cap would fail the logit comparison)."""
    n, h, kv = spec.n_layers, spec.n_heads, spec.n_kv_heads
    with torch.no_grad():
        uncapped = hf.lm_head(hf.model.norm(cache[f"blocks.{n - 1}.hook_resid_post"]))
    cap = spec.logit_softcap
    assert_close(logits[keep], (cap * torch.tanh(uncapped / cap))[keep], atol=ATOL, rtol=0)
    assert (logits[keep] - uncapped[keep]).abs().max() > 1e-3
    q, k = cache["blocks.0.attn.hook_rot_q"], cache["blocks.0.attn.hook_rot_k"].repeat_interleave(h // kv, dim=2)
    raw = torch.einsum("bqhd,bkhd->bhqk", q, k) * spec.query_scale ** -0.5
    scores = cache["blocks.0.attn.hook_attn_scores"]
    finite = torch.isfinite(scores)
    capped = spec.attn_softcap * torch.tanh(raw / spec.attn_softcap)
    assert_close(scores[finite], capped[finite], atol=ATOL, rtol=0)
    assert (capped[finite] - raw[finite]).abs().max() > 1e-4


# ------------------------------------------------------------------------ processing
@pytest.mark.parametrize("family, stratum", tagged(TL_FAMILIES, "processing"))
@settings(max_examples=EXAMPLES, phases=NO_SHRINK)
@given(data=st.data())
def test_processing_keeps_log_probs(family, stratum, data):
    spec = data.draw(family_specs(family, stratum), label="spec")
    tokens, mask = data.draw(BATCHES, label="batch")
    hf = build_family_model(spec)
    if family in POST_NORM:
        with pytest.warns(UserWarning, match="fold_ln skipped.*post-norm"):
            model = HookedTransformer.from_pretrained(hf_model=hf)
        assert model.cfg.normalization_type == "RMS"
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Gemma 2: center_unembed is refused on soft-capped logits
            model = HookedTransformer.from_pretrained(hf_model=hf)
        assert model.cfg.normalization_type == "RMSPre"
        neutral = 0.0 if family.startswith("gemma") else 1.0
        for layer in range(spec.n_layers):
            for norm in ("ln1", "ln2"):
                w = getattr(model.blocks[layer], norm).w
                assert torch.equal(w, torch.full_like(w, neutral)), f"{norm} of block {layer} not folded"
    with torch.no_grad():
        ref = hf(input_ids=tokens, attention_mask=mask, position_ids=positions_for(mask)).logits
        out = model(tokens, attention_mask=mask)
    keep = mask.bool()
    assert_close(out.log_softmax(-1)[keep], ref.log_softmax(-1)[keep], atol=1e-4, rtol=0)


# ------------------------------------------------------------------- TransformerLens
def _comparable(cache_tl, cache_ours, names):
    for name in names:
        theirs, ours = cache_tl[name], cache_ours[name]
        yield name, theirs, ours.reshape(theirs.shape)  # TL flattens q/k-norm and routing hooks to [b*p*..., n]


@pytest.mark.parametrize("family, stratum", tagged(TL_FAMILIES, "hooks", "processing"))
@settings(max_examples=EXAMPLES, phases=NO_SHRINK)
@given(data=st.data())
def test_activations_match_transformer_lens(family, stratum, data):
    """Every hook TransformerLens 3.9 also has, unprocessed and processed (its converters drop attention
    biases, and its OLMo 2 is multi-head only)."""
    spec = data.draw(family_specs(family, stratum), label="spec")
    spec = dataclasses.replace(spec, bias=False, n_kv_heads=spec.n_heads if family == "olmo2" else spec.n_kv_heads)
    if spec.d_mlp == spec.d_model:  # TransformerLens's fold_ln finds W_in's d_model axis by shape (tests/test_processing_tl.py)
        spec = dataclasses.replace(spec, d_mlp=spec.d_mlp + 8)
    tokens = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(spec.seed))
    hf = build_family_model(spec)
    # what TransformerLens's from_pretrained does: no fold_ln on post-norm blocks, no center_unembed on capped logits
    flags = dict(fold_ln=family not in POST_NORM, center_writing_weights=False, center_unembed=family != "gemma2",
                 fold_value_biases=True)
    for processing in ({}, flags):
        reference = tl_model(hf, **processing)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = HookedTransformer.from_pretrained_no_processing(hf_model=copy.deepcopy(hf), **processing)
        with torch.no_grad():
            tl_logits, tl_cache = reference.run_with_cache(tokens)
            logits, cache = ours.run_with_cache(tokens)
        assert_close(logits, tl_logits, atol=1e-4, rtol=0)
        shared = set(tl_cache.keys()) & set(cache.keys())
        assert len(shared) == len(cache.keys()), sorted(set(cache.keys()) - shared)
        for name, theirs, mine in _comparable(tl_cache, cache, sorted(shared)):
            if name.endswith("hook_expert_indices"):
                assert torch.equal(mine, theirs), name
            else:
                assert_close(mine, theirs, atol=1e-4, rtol=1e-4, msg=name)


# ------------------------------------------------------------------------ generation
@pytest.mark.parametrize("family, stratum", tagged(GENERATE_FAMILIES, "generate"))
@settings(max_examples=EXAMPLES, phases=NO_SHRINK)
@given(data=st.data())
def test_greedy_generation_with_kv_cache_equals_hf_generate(family, stratum, data):
    """Prompts of 7 and 4 tokens plus 8 new ones run past every drawn sliding window (2 to 4)."""
    spec = data.draw(family_specs(family, stratum), label="spec")
    if family == "gemma2":  # a cap of order 1 squashes the logits into near-ties: keep the model decisive
        spec = dataclasses.replace(spec, logit_softcap=30.0)
    hf = sharpened(spec)
    model = HookedTransformer.from_pretrained_no_processing(hf_model=hf)
    g = torch.Generator().manual_seed(spec.seed)
    tokens = torch.full((2, 7), 1, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for row, n in enumerate((7, 4)):
        tokens[row, 7 - n:] = torch.randint(2, VOCAB, (n,), generator=g)
        mask[row, 7 - n:] = 1
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        expected = hf.generate(tokens, attention_mask=mask, do_sample=False, max_new_tokens=8, use_cache=True,
                               pad_token_id=0)
    ours = model.generate(tokens, max_new_tokens=8, do_sample=False, stop_at_eos=False, verbose=False,
                          attention_mask=mask)
    assert ours.tolist() == expected.tolist()
    if spec.window is not None:  # the window matters here: the same weights without it give other logits
        wide = sharpened(dataclasses.replace(spec, window=64))
        full_mask = torch.cat([mask, torch.ones_like(expected[:, 7:])], dim=1)
        with torch.no_grad():
            windowed = hf(expected, attention_mask=full_mask, position_ids=positions_for(full_mask)).logits
            unwindowed = wide(expected, attention_mask=full_mask, position_ids=positions_for(full_mask)).logits
        assert (windowed - unwindowed)[full_mask.bool()].abs().max() > 1e-3


def sharpened(spec: FamilySpec) -> torch.nn.Module:
    """As tests/test_generate.py: embeddings x30 (the input decides), final norm x10 (argmaxes well apart)."""
    hf = build_family_model(spec)
    with torch.no_grad():
        hf.get_input_embeddings().weight.mul_(30.0)
        hf.model.norm.weight.mul_(10.0)
    return hf


# ------------------------------------------------------------------ per-head hooks with post norms
def _per_head_logits(family: str, flag: str) -> tuple[torch.Tensor, torch.Tensor]:
    spec = FamilySpec(family, 2, 4, 4, 8, 16, False, False, 11, window=3, attn_softcap=1.0, logit_softcap=2.0,
                      query_scale=8)
    hf, model = built(spec)
    tokens = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    getattr(model, flag)(True)
    try:
        with torch.no_grad():
            return model(tokens), hf(tokens).logits
    finally:
        getattr(model, flag)(False)


@pytest.mark.support("gemma2", "hooks")
def test_attn_result_under_a_post_norm_keeps_the_logits():
    """Gemma 2: hook_result is each head's output before ln1_post; their sum goes through it."""
    ours, ref = _per_head_logits("gemma2", "set_use_attn_result")
    assert_close(ours, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family, flag", sorted(POST_NORM_REFUSED))
def test_post_norm_blocks_refuse_per_head_flags(family, flag):
    with pytest.raises(NotImplementedError, match="post-norm blocks.*hook_z"):
        _per_head_logits(family, flag)

