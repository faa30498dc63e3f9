"""Sampling as TransformerLens does it: temperature, then the frequency penalty, then top-k (or else
top-p), then a draw from the softmax with torch's global RNG (`torch.manual_seed` makes it
reproducible), or from `generator` when one is given.

Temperature, top-k and top-p filter as HF's TemperatureLogitsWarper, TopKLogitsWarper and
TopPLogitsWarper do (tests/test_sampling_hf.py). Where they differ, by design: with both top_k and
top_p only top_k applies (TransformerLens; HF applies both), and freq_penalty (TransformerLens's,
subtracted once per occurrence) has no HF counterpart (HF's repetition_penalty, which divides or
multiplies the logit of every token present once, is fxhook.utils.sample_logits's)."""
from __future__ import annotations

import torch


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be positive (use do_sample=False for greedy), got {temperature}")
    return logits / temperature


def apply_freq_penalty(logits: torch.Tensor, tokens: torch.Tensor, freq_penalty: float,
                       token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """logits [b, vocab] minus freq_penalty times how often each token occurs in its row of `tokens`
    (positions where token_mask is 0, i.e. padding, are not counted)."""
    if not freq_penalty:
        return logits
    weights = torch.ones_like(tokens, dtype=logits.dtype) if token_mask is None else token_mask.to(logits.dtype)
    counts = torch.zeros_like(logits).scatter_add_(-1, tokens.long(), weights)
    return logits - freq_penalty * counts


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the top_k largest logits of each row (ties with the k-th kept), -inf elsewhere."""
    if top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (always the top one)."""
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_p == 1:  # every token (a cumulative sum rounded up to 1 must not drop the least likely ones)
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative >= top_p  # a token is dropped once the more likely ones reach top_p
    remove[..., 1:] = remove[..., :-1].clone()  # keep the token that reaches the threshold
    remove[..., 0] = False
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None,
                  temperature: float = 1.0, freq_penalty: float = 0.0, tokens: torch.Tensor | None = None,
                  token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The logits [b, vocab] (float32, -inf where filtered out) whose softmax sample_logits draws from."""
    logits = apply_temperature(logits.float(), temperature)
    if freq_penalty:
        if tokens is None:
            raise ValueError("freq_penalty needs the tokens generated so far")
        logits = apply_freq_penalty(logits, tokens, freq_penalty, token_mask)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    elif top_p is not None:
        logits = top_p_filter(logits, top_p)
    return logits


def sample_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None,
                  temperature: float = 1.0, freq_penalty: float = 0.0, tokens: torch.Tensor | None = None,
                  token_mask: torch.Tensor | None = None, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
    """Sample one token per row of logits [b, vocab]; temperature 0 means argmax."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, top_k, top_p, temperature, freq_penalty, tokens, token_mask).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
