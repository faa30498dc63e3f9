"""GPT-NeoX / Pythia, GPT-J, OPT and Phi against the HF models they wrap and TransformerLens 3.9.

Each property draws a random config of one family in each coverage stratum (models.STRATA: layers,
GQA where Phi has it, biases, tying, and per tests/families.py parallel or sequential NeoX blocks and
partial rotary; random norms and biases) and a left-padded batch.
References are the HF model's own modules and functions (its projections, its rotary code, its
generate) and TransformerLens's implementation of the family; no expected value comes from fxhook.
"""
from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close
from transformers import BloomConfig, BloomForCausalLM, OPTConfig, OPTForCausalLM, PhiConfig, PhiForCausalLM

from families import PARTS, hf_block, hf_qkv, hf_rotate, is_parallel
from fxhook import HookedTransformer
from models import NO_SHRINK, STRATA, VOCAB, ModelSpec, build_hf_model, left_padded_batches, model_specs, positions_for
from tl_reference_families import tl_model
from profiles import examples

FAMILIES = ("gpt_neox", "gptj", "opt", "phi")
ATOL = 1e-5
# examples per family, coverage stratum and property: 1 in the "ci" profile (6 examples), 10 in "thorough" (60)
# (models.STRATA; tests/test_coverage.py checks what the strata cover)
EXAMPLES = examples(1)
BATCHES = left_padded_batches()


def stratified(families):
    """(family, stratum) for every family and coverage stratum."""
    return [pytest.param(f, stratum, id=f"{f}-{stratum}") for f in families for stratum in STRATA]
PROCESSING = dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)


@functools.lru_cache(maxsize=4)
def built(spec: ModelSpec) -> tuple[torch.nn.Module, HookedTransformer]:
    hf = build_hf_model(spec)
    return hf, HookedTransformer.from_pretrained_no_processing(hf_model=hf)


def hf_logits(hf, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=tokens, attention_mask=mask, position_ids=positions_for(mask)).logits


def expected_hook_shapes(spec: ModelSpec, b: int, p: int) -> dict[str, tuple[int, ...]]:
    """The contract (design.md) for this family: no resid_mid in parallel blocks, rot_q/rot_k with
    rotary, hook_pos_embed with learned positions; no gated MLP in these families."""
    d, h, kv, dh, m = spec.d_model, spec.n_heads, spec.n_kv_heads, spec.d_head, spec.d_mlp
    shapes = {"hook_embed": (b, p, d), "ln_final.hook_scale": (b, p, 1), "ln_final.hook_normalized": (b, p, d),
              "unembed.hook_in": (b, p, d), "unembed.hook_out": (b, p, VOCAB)}
    if spec.family == "opt":
        shapes["hook_pos_embed"] = (b, p, d)
    for layer in range(spec.n_layers):
        x = f"blocks.{layer}."
        shapes.update({
            x + "hook_resid_pre": (b, p, d), x + "hook_resid_post": (b, p, d),
            x + "hook_attn_out": (b, p, d), x + "hook_mlp_out": (b, p, d),
            x + "ln1.hook_scale": (b, p, 1), x + "ln1.hook_normalized": (b, p, d),
            x + "ln2.hook_scale": (b, p, 1), x + "ln2.hook_normalized": (b, p, d),
            x + "attn.hook_q": (b, p, h, dh), x + "attn.hook_k": (b, p, kv, dh), x + "attn.hook_v": (b, p, kv, dh),
            x + "attn.hook_attn_scores": (b, h, p, p), x + "attn.hook_pattern": (b, h, p, p),
            x + "attn.hook_z": (b, p, h, dh), x + "mlp.hook_pre": (b, p, m), x + "mlp.hook_post": (b, p, m),
        })
        if not is_parallel(spec):
            shapes[x + "hook_resid_mid"] = (b, p, d)
        if spec.family != "opt":
            shapes[x + "attn.hook_rot_q"] = (b, p, h, dh)
            shapes[x + "attn.hook_rot_k"] = (b, p, kv, dh)
    return shapes


# ------------------------------------------------------------ no processing: HF's logits and hooks
@pytest.mark.support("*", "exact")
@pytest.mark.support("*", "hooks")
@pytest.mark.parametrize("family, stratum", stratified(FAMILIES))
@settings(max_examples=EXAMPLES, phases=NO_SHRINK)
@given(data=st.data())
def test_unprocessed_equals_hf_and_hooks_follow_the_contract(family, stratum, data):
    spec = data.draw(model_specs(families=(family,), stratum=stratum), label="spec")
    tokens, mask = data.draw(BATCHES, label="batch")
    hf, model = built(spec)
    keep = mask.bool()
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, attention_mask=mask)
    assert_close(logits[keep], hf_logits(hf, tokens, mask)[keep], atol=ATOL, rtol=0)
    for row in range(tokens.shape[0]):  # a left-padded row is the prompt alone, and HF's own default positions
        alone = tokens[row, keep[row]][None]
        with torch.no_grad():
            assert_close(model(alone)[0], hf(input_ids=alone).logits[0], atol=ATOL, rtol=0)

    expected = expected_hook_shapes(spec, *tokens.shape)
    assert set(model.hook_dict) == set(expected), (
        f"missing {sorted(set(expected) - set(model.hook_dict))}, extra {sorted(set(model.hook_dict) - set(expected))}")
    wrong = {n: (tuple(cache[n].shape), s) for n, s in expected.items() if tuple(cache[n].shape) != s}
    assert not wrong, f"hook shapes (got, contract): {wrong}"
    check_residual_stream(spec, hf, cache, logits, tokens, mask)
    check_attention(spec, hf, cache, mask)
    layer = data.draw(st.integers(0, spec.n_layers - 1), label="layer")
    check_hook_edits_and_per_head_flags(spec, hf, model, tokens, mask, cache, layer,
                                        data.draw(st.integers(0, spec.n_heads - 1), label="head"))


def check_residual_stream(spec, hf, cache, logits, tokens, mask):
    keep = mask.bool()
    parts = PARTS[spec.family]
    with torch.no_grad():
        assert_close(cache["hook_embed"], hf.get_submodule(parts.embed)(tokens), atol=0, rtol=0)
        entering = cache["hook_embed"]
        if spec.family == "opt":  # learned positions, stored two rows down: HF's own lookup
            pos = hf.get_submodule(parts.pos_embed)(mask, 0, position_ids=positions_for(mask))
            assert_close(cache["hook_pos_embed"][keep], pos[keep], atol=0, rtol=0)
            entering = entering + cache["hook_pos_embed"]
        assert_close(cache["blocks.0.hook_resid_pre"][keep], entering[keep], atol=ATOL, rtol=0)
        for layer in range(spec.n_layers):
            x = f"blocks.{layer}."
            pre, attn, mlp = cache[x + "hook_resid_pre"], cache[x + "hook_attn_out"], cache[x + "hook_mlp_out"]
            mlp_reads = pre if is_parallel(spec) else cache[x + "hook_resid_mid"]
            if not is_parallel(spec):
                assert_close(mlp_reads, pre + attn, atol=ATOL, rtol=0)
            assert_close(cache[x + "hook_resid_post"], mlp_reads + mlp if not is_parallel(spec) else pre + attn + mlp,
                         atol=ATOL, rtol=0)
            # each norm's hooks: the pure normalised input and its scale (LayerNorm), ln2 reading what the MLP reads
            for norm, source in (("ln1.", pre), ("ln2.", mlp_reads)):
                centred = source - source.mean(-1, keepdim=True)
                scale = cache[x + norm + "hook_scale"]
                assert_close(scale, (centred.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt(), atol=ATOL, rtol=1e-5)
                assert_close(cache[x + norm + "hook_normalized"], centred / scale, atol=ATOL, rtol=0)
        last = cache[f"blocks.{spec.n_layers - 1}.hook_resid_post"]
        through_hf = hf.get_submodule(parts.unembed)(hf.get_submodule(parts.final_norm)(last))
        assert_close(through_hf[keep], logits[keep], atol=ATOL, rtol=0)


def check_attention(spec, hf, cache, mask):
    """hook_q/k/v are HF's projections of ln1's output before rotary, rot_q/rot_k HF's own rotation,
    the scores are built from them, the pattern is their masked softmax and z the pattern times v."""
    keep = mask.bool()
    b, p = mask.shape
    h, kv, dh = spec.n_heads, spec.n_kv_heads, spec.d_head
    allowed = torch.ones(p, p, dtype=torch.bool).tril() & keep[:, None, None, :]  # [b, 1, q, k]
    sel = (allowed & keep[:, None, :, None]).expand(b, h, p, p)
    with torch.no_grad():
        for layer in range(spec.n_layers):
            x = f"blocks.{layer}.attn."
            q, k, v = hf_qkv(hf, spec, layer, cache[f"blocks.{layer}.hook_resid_pre"])
            for name, ref in (("q", q), ("k", k), ("v", v)):
                assert_close(cache[x + "hook_" + name][keep], ref[keep], atol=ATOL, rtol=0)
            q, k = cache[x + "hook_q"], cache[x + "hook_k"]
            if spec.family != "opt":
                rot_q, rot_k = hf_rotate(hf, spec, q, k, positions_for(mask))
                assert_close(cache[x + "hook_rot_q"][keep], rot_q[keep], atol=ATOL, rtol=0)
                assert_close(cache[x + "hook_rot_k"][keep], rot_k[keep], atol=ATOL, rtol=0)
                q, k = cache[x + "hook_rot_q"], cache[x + "hook_rot_k"]
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(h // kv, dim=2)) * dh ** -0.5
            assert_close(cache[x + "hook_attn_scores"][sel], scores[sel], atol=ATOL, rtol=1e-5)
            assert torch.isneginf(cache[x + "hook_attn_scores"][~allowed.expand(b, h, p, p)]).all()
            pattern = cache[x + "hook_pattern"]
            assert_close(pattern[sel], torch.softmax(scores.masked_fill(~allowed, -torch.inf), -1)[sel],
                         atol=ATOL, rtol=0)
            z = torch.einsum("bhqk,bkhd->bqhd", pattern, cache[x + "hook_v"].repeat_interleave(h // kv, dim=2))
            assert_close(cache[x + "hook_z"][keep], z[keep], atol=ATOL, rtol=0)


def check_hook_edits_and_per_head_flags(spec, hf, model, tokens, mask, cache, layer: int, head: int):
    """Zeroing a head's z equals the same edit at HF's output projection; hook_mlp_in is what the MLP
    norm reads; per-head results sum to attn_out; split q/k/v inputs leave the logits unchanged."""
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
        ours = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero_head)])
        clean = model(tokens, attention_mask=mask)
    handle = hf_block(hf, spec, layer).get_submodule(PARTS[spec.family].o).register_forward_pre_hook(hf_zero_head)
    try:
        assert_close(ours[keep], hf_logits(hf, tokens, mask)[keep], atol=ATOL, rtol=0)
    finally:
        handle.remove()
    assert (ours[keep] - clean[keep]).abs().max() > 1e-6

    try:
        model.set_use_hook_mlp_in(True)
        model.set_use_attn_result(True)
        with torch.no_grad():
            flagged_logits, flagged = model.run_with_cache(tokens, attention_mask=mask)
        x = f"blocks.{layer}."
        reads = flagged[x + "hook_resid_pre"] if is_parallel(spec) else flagged[x + "hook_resid_mid"]
        assert_close(flagged[x + "hook_mlp_in"], reads, atol=0, rtol=0)
        b_o = model.blocks[layer].attn.b_O
        assert_close(flagged[x + "attn.hook_result"].sum(2) + b_o, cache[x + "hook_attn_out"], atol=ATOL, rtol=0)
        assert_close(flagged_logits[keep], clean[keep], atol=ATOL, rtol=0)
        model.set_use_split_qkv_input(True)
        with torch.no_grad():
            split_logits, split = model.run_with_cache(tokens, attention_mask=mask)
        assert split[x + "hook_q_input"].shape == (*tokens.shape, spec.n_heads, spec.d_model)
        assert_close(split_logits[keep], clean[keep], atol=ATOL, rtol=0)
    finally:
        model.set_use_hook_mlp_in(False)
        model.set_use_attn_result(False)
        model.set_use_split_qkv_input(False)


# ------------------------------------------------------------------------------------ processing
@pytest.mark.support("*", "processing")
@pytest.mark.parametrize("family, stratum", stratified(["gpt_neox", "opt"]))
@settings(max_examples=EXAMPLES, phases=NO_SHRINK)
@given(data=st.data())
def test_processing_without_attention_biases_keeps_hf_log_probs(family, stratum, data):
    """fold_ln with LayerNorm biases creates q/k/v biases the HF model lacks (in NeoX's fused
    projection, a bias for the whole fused output); log-probs stay HF's. (Biased configs of every
    family are checked against HF and TransformerLens in the next test.)"""
    spec = ModelSpec(**dict(data.draw(model_specs(families=(family,), stratum=stratum), label="spec").__dict__,
                            bias=False))
    tokens, mask = data.draw(BATCHES, label="batch")
    hf = build_hf_model(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer.from_pretrained(hf_model=hf)
    keep = mask.bool()
    with torch.no_grad():
        ours = model(tokens, attention_mask=mask).log_softmax(-1)
    assert_close(ours[keep], hf_logits(hf, tokens, mask).log_softmax(-1)[keep], atol=1e-4, rtol=0)
    assert model.cfg.normalization_type == "LNPre"


def _tl_comparable(spec: ModelSpec) -> ModelSpec:
    """TransformerLens's converters need the attention biases (NeoX, OPT), its Phi is multi-head only (its
    converter splits k/v into n_heads), and its fold_ln picks the d_model axis of W_in by shape, folding
    along the wrong one when d_mlp == d_model."""
    fields = dict(spec.__dict__, bias=True, n_kv_heads=spec.n_heads)
    if spec.d_mlp == spec.d_model:
        fields["d_mlp"] = spec.d_mlp + 8
    return ModelSpec(**fields)


WEIGHTS = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in", "W_out", "b_in", "b_out", "W_E", "W_U",
           "b_U")


@pytest.mark.support("*", "processing")
@pytest.mark.support("*", "hooks")
@pytest.mark.parametrize("family, stratum", stratified(FAMILIES))
@settings(max_examples=EXAMPLES, phases=NO_SHRINK)
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_weights_and_activations_match_transformer_lens(family, stratum, data, seed):
    """Unprocessed and processed (all four flags), every weight view and every hook TransformerLens
    also has equal TransformerLens 3.9's implementation of the family; processed log-probs equal HF's."""
    spec = _tl_comparable(data.draw(model_specs(families=(family,), stratum=stratum), label="spec"))
    hf = build_hf_model(spec)
    tokens = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))
    padded, mask = data.draw(BATCHES, label="batch")
    ours = HookedTransformer.from_pretrained_no_processing(hf_model=copy.deepcopy(hf))
    for flags in ({}, PROCESSING):
        reference = tl_model(hf, **flags)
        if flags:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ours.process_weights_(**flags)
        for name in WEIGHTS:
            assert_close(getattr(ours, name), getattr(reference, name), atol=1e-4, rtol=0, msg=name)
        if family == "opt":
            assert_close(ours.W_pos, reference.W_pos, atol=1e-4, rtol=0)
        with torch.no_grad():
            their_logits, theirs = reference.run_with_cache(tokens)
            my_logits, mine = ours.run_with_cache(tokens)
        assert_close(my_logits, their_logits, atol=1e-4, rtol=0)
        shared = set(theirs.keys()) & set(mine.keys())
        assert set(mine.keys()) <= set(theirs.keys()), sorted(set(mine.keys()) - set(theirs.keys()))
        assert len(shared) >= 15 * spec.n_layers
        for name in sorted(shared):
            assert_close(mine[name], theirs[name], atol=1e-4, rtol=0, msg=name)
    with torch.no_grad():
        processed = ours(padded, attention_mask=mask).log_softmax(-1)
    keep = mask.bool()
    assert_close(processed[keep], hf_logits(hf, padded, mask).log_softmax(-1)[keep], atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------ generation
def sharpened(spec: ModelSpec) -> tuple[torch.nn.Module, HookedTransformer]:
    """Embeddings x30 and the final norm x10, so greedy argmaxes are decided by the input and well
    separated (random tiny models otherwise predict nearly tied logits; see test_generate.py)."""
    hf = build_hf_model(spec)
    norm = hf.get_submodule(PARTS[spec.family].final_norm)
    with torch.no_grad():
        hf.get_input_embeddings().weight.mul_(30.0)
        norm.weight.mul_(10.0)
        norm.bias.mul_(10.0)
    return hf, HookedTransformer.from_pretrained_no_processing(hf_model=hf)


@pytest.mark.support("*", "generate")
@pytest.mark.parametrize("family, stratum", stratified(FAMILIES))
@settings(max_examples=EXAMPLES, phases=NO_SHRINK)
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_greedy_generation_with_kv_cache_equals_hf_generate(family, stratum, data, seed):
    spec = data.draw(model_specs(families=(family,), stratum=stratum), label="spec")
    hf, model = sharpened(spec)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, VOCAB, (2, 7), generator=g)
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0  # the second prompt is 4 tokens, left-padded
    tokens[1, :3] = 1
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        expected = hf.generate(tokens, attention_mask=mask, do_sample=False, max_new_tokens=6, use_cache=True,
                               pad_token_id=1)
    ours = model.generate(tokens, max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False,
                          attention_mask=mask)
    assert ours.tolist() == expected.tolist()


# ------------------------------------------------------------------------------------ refusals
def test_bloom_is_refused_with_the_reason():
    bloom = BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=16, n_head=2, vocab_size=50))
    with pytest.raises(NotImplementedError, match="Bloom \\(ALiBi\\) is not supported.*adapters/bloom.py"):
        HookedTransformer.from_pretrained_no_processing(hf_model=bloom)


def test_family_configs_the_adapter_cannot_run_are_refused():
    post_norm = OPTForCausalLM(OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                                         vocab_size=50, word_embed_proj_dim=16, do_layer_norm_before=False))
    with pytest.raises(NotImplementedError, match="do_layer_norm_before=False.*adapters/opt.py"):
        HookedTransformer.from_pretrained_no_processing(hf_model=post_norm)
    projected = OPTForCausalLM(OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                                         vocab_size=50, word_embed_proj_dim=8))
    with pytest.raises(NotImplementedError, match="word_embed_proj_dim"):
        HookedTransformer.from_pretrained_no_processing(hf_model=projected)
    qk_norm = PhiForCausalLM(PhiConfig(hidden_size=16, num_hidden_layers=1, intermediate_size=32,
                                       num_attention_heads=2, vocab_size=50, qk_layernorm=True))
    with pytest.raises(NotImplementedError, match="qk_layernorm.*adapters/phi.py"):
        HookedTransformer.from_pretrained_no_processing(hf_model=qk_norm)
