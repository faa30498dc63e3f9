"""Sampled generation against HF's sampling (issue #18).

The reference is HF's own logits processors (TemperatureLogitsWarper, TopKLogitsWarper,
TopPLogitsWarper) applied to the HF model's own logits, and HF's generate(do_sample=True) with its
processed step scores. Checked: on the steps of real generations (HF's and fxhook's), fxhook's
filtered distribution (fxhook.runtime.sampling.filter_logits, what generate draws from) equals HF's;
and fxhook.generate's sampled tokens follow HF's filtered distributions (a chi-square test over
thousands of seeded draws, at the first step and at the second step after the commonest first token).

HF's repetition_penalty (RepetitionPenaltyLogitsProcessor: a present token's positive logit divided,
a negative one multiplied, once whatever the count) is fxhook.utils.sample_logits's repetition_penalty
(TransformerLens's utils); generate has none. Compared with HF's processor the same way.

What has no counterpart, and how it is checked instead:
- freq_penalty (TransformerLens's generate: minus the penalty per occurrence of a token in the row,
  prompt included, padding not) has none in HF. Its draws are tested against that formula computed
  by hand from the HF model's logits.
- With both top_k and top_p, fxhook (as TransformerLens) applies top_k only; HF applies both.
- HF's generate applies top_k=50 unless told top_k=0; fxhook filters nothing unless asked.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from scipy.stats import chisquare
from torch.testing import assert_close
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, \
    TopKLogitsWarper, TopPLogitsWarper

from fxhook import HookedTransformer
from fxhook import utils
from fxhook.runtime.sampling import filter_logits
from fxhook.utils.lm import apply_repetition_penalty
from models import VOCAB, ModelSpec, build_hf_model, positions_for

SPEC = ModelSpec("llama", n_layers=2, n_heads=4, n_kv_heads=2, d_head=8, d_mlp=40, bias=True, tied=False, seed=13)
SETTINGS = {  # fxhook's generate keywords
    "temperature": dict(temperature=0.6),
    "top_k": dict(top_k=7),
    "top_p": dict(top_p=0.7),
    "top_k+temperature": dict(top_k=12, temperature=1.7),
    "top_p+temperature": dict(top_p=0.5, temperature=0.8),
}
DRAWS = 3000
P_MIN = 1e-3  # fixed seeds: a correct sampler passes this for good; a wrong one is rejected far below it


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, HookedTransformer]:
    """A tiny Llama whose final norm is scaled up, so its next-token distributions are far from uniform
    (top-k, top-p and temperature then change them a lot)."""
    hf = build_hf_model(SPEC)
    with torch.no_grad():
        hf.model.norm.weight.mul_(8.0)
    hf.generation_config.eos_token_id = None
    return hf, HookedTransformer.from_pretrained_no_processing(hf_model=hf)


def hf_processors(top_k: int | None = None, top_p: float | None = None, temperature: float = 1.0
                  ) -> LogitsProcessorList:
    """HF's warpers in HF's order (temperature, top-k, top-p), for the settings that have them."""
    chain = LogitsProcessorList()
    if temperature != 1.0:
        chain.append(TemperatureLogitsWarper(temperature))
    if top_k is not None:
        chain.append(TopKLogitsWarper(top_k))
    if top_p is not None:
        chain.append(TopPLogitsWarper(top_p))
    return chain


def hf_next_logits(hf, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """HF's logits [b, vocab] for the token after each row."""
    with torch.no_grad():
        return hf(input_ids=tokens, attention_mask=mask, position_ids=positions_for(mask)).logits[:, -1].float()


def padded_prompt(seed: int, rows: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts [rows, 6] whose rows after the first are left-padded by 2, with token 5 as the padding id
    (a real token: were padding attended to or counted, the distributions would change)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, VOCAB, (rows, 6), generator=g)
    tokens[:, -1] = tokens[:, -2]  # a repeated token, for the frequency penalty
    mask = torch.ones_like(tokens)
    mask[1:, :2] = 0
    tokens[1:, :2] = 5
    return tokens, mask


def chi_square_p(drawn: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of tokens `drawn` [n] being draws from `probs` [vocab] (bins expecting under 5 pooled);
    a token the distribution excludes fails at once."""
    counts = torch.bincount(drawn, minlength=probs.numel()).double()
    excluded = probs == 0
    assert counts[excluded].sum() == 0, f"drew tokens the distribution excludes: {excluded.nonzero().flatten()}"
    expected = probs.double() / probs.double().sum() * drawn.numel()
    big = expected >= 5
    observed_bins, expected_bins = [counts[big]], [expected[big]]
    if (~big & ~excluded).any():
        observed_bins.append(counts[~big].sum()[None])
        expected_bins.append(expected[~big].sum()[None])
    return float(chisquare(torch.cat(observed_bins).numpy(), torch.cat(expected_bins).numpy()).pvalue)


# ---------------------------------------------------------- filtered distributions on real generations
@pytest.mark.parametrize("name", SETTINGS)
def test_filtered_step_distributions_equal_hfs(pair, name):
    """On every step of HF's own sampled generation (its processed scores) and of fxhook's (HF's warpers on
    HF's logits of fxhook's prefixes), fxhook's filtered distribution is HF's."""
    hf, model = pair
    setting = SETTINGS[name]
    tokens, mask = padded_prompt(seed=1)
    with torch.no_grad(), torch.random.fork_rng():  # HF samples with the global RNG: seed it, then restore it
        torch.manual_seed(0)
        theirs = hf.generate(tokens, attention_mask=mask, do_sample=True, max_new_tokens=6, pad_token_id=0,
                             top_k=setting.get("top_k", 0), top_p=setting.get("top_p", 1.0),
                             temperature=setting.get("temperature", 1.0), output_scores=True,
                             return_dict_in_generate=True)
    for step, scores in enumerate(theirs.scores):
        prefix = theirs.sequences[:, :tokens.shape[1] + step]
        prefix_mask = torch.cat([mask, torch.ones_like(prefix[:, tokens.shape[1]:])], dim=1)
        with torch.no_grad():
            ours = filter_logits(model(prefix, attention_mask=prefix_mask)[:, -1], **setting)
        assert torch.equal(torch.isinf(ours), torch.isinf(scores)), f"step {step}: other tokens filtered out"
        assert_close(ours.softmax(-1), scores.softmax(-1), atol=1e-5, rtol=0, msg=f"step {step}")
        kept = (scores.softmax(-1) > 0).sum(-1)
        assert (kept < VOCAB).all() or name == "temperature", f"step {step}: the filter kept every token"

    out = model.generate(tokens, attention_mask=mask, max_new_tokens=6, stop_at_eos=False, verbose=False,
                         generator=torch.Generator().manual_seed(1), output_logits=True, **setting)
    chain = hf_processors(**setting)
    for step, step_logits in enumerate(out.logits):
        prefix = out.sequences[:, :tokens.shape[1] + step]
        prefix_mask = torch.cat([mask, torch.ones_like(prefix[:, tokens.shape[1]:])], dim=1)
        expected = chain(prefix, hf_next_logits(hf, prefix, prefix_mask)).softmax(-1)
        assert_close(filter_logits(step_logits, **setting).softmax(-1), expected, atol=1e-5, rtol=0)
        chosen = out.sequences[:, tokens.shape[1] + step]
        assert (expected.gather(-1, chosen[:, None]) > 0).all(), f"step {step}: drew a filtered-out token"


def test_top_p_at_its_boundary_is_hfs():
    """Probabilities 1/2, 1/4, 1/8, 1/8 (exact in float32): when the most likely tokens reach top_p exactly,
    the next one is dropped, as HF's TopPLogitsWarper does (fxhook kept it until issue #18). (Which of two
    equally likely tokens survives at the boundary is a tie order, and differs: not compared.)"""
    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0]]) * torch.log(torch.tensor(2.0))
    for top_p in (0.25, 0.5, 0.6, 0.75, 0.9, 1.0):
        theirs = TopPLogitsWarper(top_p)(None, logits.clone())
        assert torch.equal(torch.isinf(filter_logits(logits, top_p=top_p)), torch.isinf(theirs)), top_p


def test_top_k_wins_over_top_p_as_in_transformer_lens(pair):
    """Documented difference: fxhook (as TransformerLens) ignores top_p when top_k is given; HF applies both."""
    hf, model = pair
    tokens, mask = padded_prompt(seed=2)
    logits = hf_next_logits(hf, tokens, mask)
    ours = filter_logits(model(tokens, attention_mask=mask)[:, -1].detach(), top_k=20, top_p=0.3)
    assert torch.equal(torch.isinf(ours), torch.isinf(hf_processors(top_k=20)(tokens, logits)))
    assert not torch.equal(torch.isinf(ours), torch.isinf(hf_processors(top_k=20, top_p=0.3)(tokens, logits)))


# ---------------------------------------------------------------------------- sampled tokens
def _draws(model, tokens, mask, **setting) -> torch.Tensor:
    """DRAWS copies of one (left-padded) prompt, two sampled tokens each: [DRAWS, 2]."""
    rows, masks = tokens.expand(DRAWS, -1), mask.expand(DRAWS, -1)
    out = model.generate(rows, attention_mask=masks, max_new_tokens=2, stop_at_eos=False, verbose=False,
                         generator=torch.Generator().manual_seed(0), **setting)
    return out[:, tokens.shape[1]:]


def _second_step(drawn: torch.Tensor, tokens, mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The second tokens of the rows whose first token was the commonest, and that prefix [1, p+1] with its mask."""
    first = int(torch.bincount(drawn[:, 0]).argmax())
    prefix = torch.cat([tokens, torch.tensor([[first]])], dim=1)
    return drawn[drawn[:, 0] == first, 1], prefix, torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)


@pytest.mark.parametrize("name", ["temperature", "top_k", "top_p+temperature"])
def test_sampled_tokens_follow_hfs_filtered_distributions(pair, name):
    hf, model = pair
    setting = SETTINGS[name]
    tokens, mask = padded_prompt(seed=3)
    tokens, mask = tokens[1:2], mask[1:2]  # the left-padded row
    drawn = _draws(model, tokens, mask, **setting)
    chain = hf_processors(**setting)
    expected = chain(tokens, hf_next_logits(hf, tokens, mask)).softmax(-1)[0]
    assert chi_square_p(drawn[:, 0], expected) > P_MIN
    # the test has power: the unfiltered distribution is rejected on the same draws
    unfiltered = hf_next_logits(hf, tokens, mask).softmax(-1)[0]
    assert chi_square_p(drawn[:, 0], unfiltered) < 1e-6
    second, prefix, prefix_mask = _second_step(drawn, tokens, mask)
    assert second.numel() >= 200
    expected = chain(prefix, hf_next_logits(hf, prefix, prefix_mask)).softmax(-1)[0]
    assert chi_square_p(second, expected) > P_MIN


def test_sampled_tokens_follow_the_frequency_penalty_computed_by_hand(pair):
    """freq_penalty (no HF counterpart): the draws follow softmax(HF logits / T - penalty * count), the counts
    taken by hand over the real prompt tokens (not the padding) and the first sampled token."""
    hf, model = pair
    penalty, temperature = 1.5, 0.8
    tokens, mask = padded_prompt(seed=4)
    tokens, mask = tokens[1:2], mask[1:2]
    drawn = _draws(model, tokens, mask, freq_penalty=penalty, temperature=temperature)

    def by_hand(prefix, prefix_mask) -> torch.Tensor:
        counts = Counter(t for t, m in zip(prefix[0].tolist(), prefix_mask[0].tolist()) if m)
        penalties = torch.tensor([penalty * counts[t] for t in range(VOCAB)])
        return (hf_next_logits(hf, prefix, prefix_mask)[0] / temperature - penalties).softmax(-1)

    expected = by_hand(tokens, mask)
    assert chi_square_p(drawn[:, 0], expected) > P_MIN
    assert chi_square_p(drawn[:, 0], hf_next_logits(hf, tokens, mask)[0].div(temperature).softmax(-1)) < 1e-6
    second, prefix, prefix_mask = _second_step(drawn, tokens, mask)
    assert chi_square_p(second, by_hand(prefix, prefix_mask)) > P_MIN


def test_repetition_penalty_is_hfs(pair):
    """fxhook.utils's repetition_penalty against HF's RepetitionPenaltyLogitsProcessor on every step of an HF
    sampled generation, and utils.sample_logits's draws (temperature 0.7 after the penalty, as HF orders
    them) follow HF's processed distribution."""
    hf, _ = pair
    penalty = 1.8
    tokens, mask = padded_prompt(seed=5, rows=1)  # unpadded (HF's generate leaves left padding unpenalised)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        theirs = hf.generate(tokens, attention_mask=mask, do_sample=True, max_new_tokens=4, pad_token_id=0,
                             top_k=0, repetition_penalty=penalty, output_scores=True, output_logits=True,
                             return_dict_in_generate=True)
    for step, (raw, scores) in enumerate(zip(theirs.logits, theirs.scores)):
        seen = theirs.sequences[:, :tokens.shape[1] + step]
        assert_close(apply_repetition_penalty(raw, seen, penalty), scores, atol=1e-6, rtol=0, msg=f"step {step}")
    row = theirs.logits[0][:1]
    row_tokens = row.topk(8, dim=-1).indices  # a history holding the 8 likeliest tokens: the penalty bites
    expected = TemperatureLogitsWarper(0.7)(row_tokens, RepetitionPenaltyLogitsProcessor(penalty)(row_tokens, row))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        drawn = utils.sample_logits(row.expand(DRAWS, -1), temperature=0.7, repetition_penalty=penalty,
                                    tokens=row_tokens.expand(DRAWS, -1))
    assert chi_square_p(drawn, expected.softmax(-1)[0]) > P_MIN
    assert chi_square_p(drawn, (row / 0.7).softmax(-1)[0]) < 1e-6  # the penalty mattered
