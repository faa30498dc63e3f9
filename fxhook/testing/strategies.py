"""Hypothesis strategies for a loaded model: token batches, hook sets, ablations, generation settings.

    from hypothesis import given
    from fxhook.testing import strategies as fst

    @given(batch=fst.token_batches(model))
    def test_mine(batch):
        assert_matches_hf(model, hf_model, batch)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

try:
    from hypothesis import strategies as st
except ImportError as err:  # a test dependency, not a runtime one
    raise ImportError("fxhook.testing needs hypothesis: pip install hypothesis") from err

from fxhook.core.hook_names import block_hook
from fxhook.model import HookedTransformer


@dataclass(frozen=True, eq=False)
class TokenBatch:
    """Left-padded token ids [batch, pos] and their padding mask [batch, pos] (1: a real token)."""

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    text: tuple[str, ...] | None = field(default=None)  # the texts the tokens came from, if any

    @property
    def rows(self) -> list[torch.Tensor]:
        """Each row's real tokens [1, n], its padding removed."""
        return [t[m.bool()][None] for t, m in zip(self.tokens, self.attention_mask)]

    def __repr__(self) -> str:  # what a failure report shows: short enough to read, enough to rerun
        rows = [r[0].tolist() for r in self.rows]
        pads = (self.attention_mask == 0).sum(-1).tolist()
        text = f", text={list(self.text)!r}" if self.text is not None else ""
        return f"TokenBatch(rows={rows}, left_padding={pads}{text})"


def _vocabulary(model: HookedTransformer) -> int:
    """How many ids are real tokens: the tokenizer's vocabulary where there is one (embedding tables
    are often padded past it), else the model's."""
    tokenizer = model.tokenizer
    size = model.cfg.d_vocab
    if tokenizer is not None:
        size = min(size, len(tokenizer))
    return size


def _pad_id(model: HookedTransformer) -> int:
    tokenizer = model.tokenizer
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    return int(pad) if pad is not None else 0


def _bos_id(model: HookedTransformer) -> int | None:
    tokenizer = model.tokenizer
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if bos is None:
        bos = getattr(model.hf_model.config, "bos_token_id", None)
    return int(bos) if isinstance(bos, int) else None


def padded_batch(model: HookedTransformer, rows: list[list[int]], texts: tuple[str, ...] | None = None) -> TokenBatch:
    """A TokenBatch of token-id rows of any lengths, the shorter ones left-padded (with the model's pad id)."""
    length = max(len(r) for r in rows)
    tokens = torch.full((len(rows), length), _pad_id(model), dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, length - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, length - len(row):] = 1
    device = model.cfg.device or "cpu"
    return TokenBatch(tokens.to(device), mask.to(device), texts)


def _check_sizes(max_batch: int, min_length: int, max_length: int) -> None:
    if max_batch < 1 or min_length < 1 or max_length < min_length:
        raise ValueError(f"need max_batch >= 1 and 1 <= min_length <= max_length, got max_batch={max_batch}, "
                         f"min_length={min_length}, max_length={max_length}")


@st.composite
def token_batches(draw, model: HookedTransformer, max_batch: int = 3, min_length: int = 1, max_length: int = 12,
                  left_padding: bool = True, bos: bool | None = None) -> TokenBatch:
    """Batches of token ids drawn from the model's real vocabulary: 1..max_batch rows of
    min_length..max_length tokens, shorter rows left-padded (left_padding=False: one length for all),
    a BOS token first or not (bos=None: drawn per batch)."""
    _check_sizes(max_batch, min_length, max_length)
    vocab = _vocabulary(model)
    bos_id = _bos_id(model)
    use_bos = draw(st.booleans()) if bos is None else bos
    if use_bos and bos_id is None:
        raise ValueError("bos=True but the model has no BOS token id (tokenizer or config)")
    n = draw(st.integers(1, max_batch))
    longest = draw(st.integers(min_length, max_length))
    rows = []
    for _ in range(n):
        length = draw(st.integers(min_length, longest)) if left_padding else longest
        row = draw(st.lists(st.integers(0, vocab - 1), min_size=length, max_size=length))
        if use_bos:
            row[0] = bos_id
        rows.append(row)
    return padded_batch(model, rows)


@st.composite
def text_batches(draw, model: HookedTransformer, max_batch: int = 3, max_length: int = 12,
                 bos: bool | None = None) -> TokenBatch:
    """Batches of text (printable, with spaces and some non-ASCII letters) tokenised by the model's
    tokenizer, cut to max_length tokens, left-padded; BOS first or not (None: drawn)."""
    if model.tokenizer is None:
        raise ValueError("text_batches needs a model with a tokenizer: use token_batches for a model without one")
    _check_sizes(max_batch, 1, max_length)
    use_bos = draw(st.booleans()) if bos is None else bos
    bos_id = _bos_id(model)
    alphabet = st.characters(codec="utf-8", categories=("L", "N", "P", "Zs"))
    texts = draw(st.lists(st.text(alphabet, min_size=1, max_size=4 * max_length), min_size=1, max_size=max_batch))
    rows = []
    for text in texts:
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = ([bos_id] if use_bos and bos_id is not None else []) + list(ids)
        rows.append(ids[:max_length] or [_pad_id(model)])
    return padded_batch(model, rows, tuple(texts))


def hook_sets(model: HookedTransformer, max_size: int = 4) -> st.SearchStrategy[tuple[str, ...]]:
    """Non-empty sets of the model's hook names (under its current flags), in the model's order."""
    names = list(model.hook_dict)
    return st.lists(st.sampled_from(names), min_size=1, max_size=max_size, unique=True).map(
        lambda chosen: tuple(n for n in names if n in chosen))


def ablations(model: HookedTransformer) -> st.SearchStrategy[str]:
    """A hook whose output a block writes to the residual stream (hook_attn_out, hook_mlp_out), to zero."""
    return st.builds(block_hook, st.integers(0, model.cfg.n_layers - 1),
                     st.sampled_from(["hook_attn_out", "hook_mlp_out"]))


@dataclass(frozen=True)
class GenerationSettings:
    """Keyword arguments for model.generate (greedy unless do_sample)."""

    max_new_tokens: int
    use_past_kv_cache: bool = True
    do_sample: bool = False
    top_k: int | None = None
    top_p: float | None = None
    temperature: float = 1.0
    freq_penalty: float = 0.0

    def kwargs(self) -> dict:
        return dict(max_new_tokens=self.max_new_tokens, use_past_kv_cache=self.use_past_kv_cache,
                    do_sample=self.do_sample, top_k=self.top_k, top_p=self.top_p, temperature=self.temperature,
                    freq_penalty=self.freq_penalty)


@st.composite
def generation_settings(draw, max_new_tokens: int = 6, sampling: bool = False) -> GenerationSettings:
    """Generation settings: 1..max_new_tokens new tokens, with or without the KV cache; with
    sampling=True also top_k, top_p, temperature and a frequency penalty (drawn, each may be off)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    base = dict(max_new_tokens=draw(st.integers(1, max_new_tokens)), use_past_kv_cache=draw(st.booleans()))
    if not sampling:
        return GenerationSettings(**base)
    return GenerationSettings(
        **base, do_sample=True, top_k=draw(st.none() | st.integers(1, 50)),
        top_p=draw(st.none() | st.floats(0.05, 1.0)), temperature=draw(st.floats(0.2, 2.0)),
        freq_penalty=draw(st.sampled_from([0.0, 0.5, 1.0])))
