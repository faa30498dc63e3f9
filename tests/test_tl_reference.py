"""fxhook against TransformerLens 3.9 (no weight processing): every shared hook's activation.

TransformerLens is built offline from the same HF weights (tests/tl_reference.py)
and run with the same left-padded batch and attention mask; TransformerLens then
derives positions from the mask, as fxhook does.

Note on norms: TransformerLens 3.9 hooks hook_normalized BEFORE the weight (and
bias) for LayerNorm as well as RMSNorm (TransformerLens <= 2.x hooked LayerNorm's
after w and b); this test holds fxhook to 3.9.
"""
from __future__ import annotations

import functools

import torch
from hypothesis import given, settings
from torch.testing import assert_close

from fxhook import HookedTransformer
from models import NO_SHRINK, ModelSpec, build_hf_model, model_specs, token_batches
from tl_reference import tl_model
from profiles import examples


TOL = dict(atol=1e-4, rtol=1e-4)
ATTENTION_HOOKS = ("hook_attn_scores", "hook_pattern")


@functools.lru_cache(maxsize=2)
def models(spec: ModelSpec):
    hf = build_hf_model(spec, tl_compatible=True)
    return hf, HookedTransformer.from_pretrained_no_processing(hf_model=hf), tl_model(hf)


def real_part(name: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Entries at non-pad (query) positions: padded positions are not part of the contract."""
    if name.endswith(ATTENTION_HOOKS):  # [b h q k]: every key of each real query row
        x = x.transpose(1, 2)
    return x[mask.bool()]


def both_caches(spec, tokens, mask):
    hf, ours, tl = models(spec)
    with torch.no_grad():
        our_logits, our_cache = ours.run_with_cache(tokens, attention_mask=mask)
        tl_logits, tl_cache = tl.run_with_cache(tokens, attention_mask=mask)
    return our_logits, our_cache, tl_logits, tl_cache


def mismatches(our_cache, tl_cache, mask, names) -> dict[str, str]:
    bad = {}
    for name in sorted(names):
        ours, theirs = our_cache[name], tl_cache[name]
        if ours.shape != theirs.shape:
            bad[name] = f"shape {tuple(ours.shape)} vs TransformerLens {tuple(theirs.shape)}"
            continue
        a, b = real_part(name, ours, mask), real_part(name, theirs, mask)
        try:
            assert_close(a, b, **TOL)  # -inf == -inf for masked scores
        except AssertionError:
            if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
                bad[name] = "masked (non-finite) entries differ"
            else:
                bad[name] = f"max abs difference {(a - b)[torch.isfinite(a)].abs().max().item():.3g}"
    return bad


@settings(max_examples=examples(6), phases=NO_SHRINK)
@given(spec=model_specs(), batch=token_batches())
def test_every_shared_hook_matches_transformer_lens(spec, batch):
    tokens, mask = batch
    our_logits, our_cache, tl_logits, tl_cache = both_caches(spec, tokens, mask)
    ours, theirs = set(our_cache.keys()), set(tl_cache.keys())
    assert ours <= theirs, f"hooks TransformerLens does not have: {sorted(ours - theirs)}"
    # TransformerLens 3.9 also hooks the unembedding's input and output; fxhook has every other hook
    assert all(name.startswith("unembed.") for name in theirs - ours), sorted(theirs - ours)
    bad = mismatches(our_cache, tl_cache, mask, ours)
    assert not bad, f"activations that differ from TransformerLens's: {bad}"
    keep = mask.bool()
    assert_close(our_logits[keep], tl_logits[keep], **TOL)
