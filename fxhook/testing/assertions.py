"""Assertions that a loaded model equals its Hugging Face original, for a user's own pytest files.

Each returns the `Check`s it made (the worst difference of each and its tolerance) and raises
`PropertyFailure` (an AssertionError) when one fails: the message names the property, the worst
difference, the input, and the first hook whose value diverges from the reference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fxhook.model import HookedTransformer
from fxhook.testing.compare import Difference, Divergence, cache_divergence, difference, first_hf_divergence, \
    first_run_divergence, hf_logits_difference
from fxhook.testing.reference import is_processed
from fxhook.testing.strategies import TokenBatch
from fxhook.testing.tolerance import DEFAULT_FACTOR, tolerance

Batch = TokenBatch | torch.Tensor


@dataclass(frozen=True)
class Check:
    """One comparison made: what, its worst difference, and the tolerance it was held to."""

    name: str
    difference: Difference

    @property
    def worst(self) -> float:
        return self.difference.worst


class PropertyFailure(AssertionError):
    """A property does not hold: which, by how much, on what input, and where it first diverges."""

    def __init__(self, prop: str, detail: str, batch: TokenBatch, worst: float, divergence: Divergence | None):
        self.property, self.batch, self.worst, self.divergence = prop, batch, worst, divergence
        where = f"first diverging hook: {divergence}" if divergence is not None else \
            "first diverging hook: none found (every hook agrees; the difference is after the last one)"
        super().__init__(f"{prop}: {detail}\n  input: {batch!r}\n  {where}")


def as_batch(model: HookedTransformer, tokens: Batch, attention_mask: torch.Tensor | None = None) -> TokenBatch:
    """A TokenBatch from a TokenBatch, or token ids [pos] / [batch, pos] with an optional padding mask."""
    if isinstance(tokens, TokenBatch):
        if attention_mask is not None:
            raise ValueError("a TokenBatch carries its own attention_mask: do not pass another")
        return tokens
    if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.long, torch.int, torch.int32):
        raise TypeError(f"tokens must be a TokenBatch or an integer tensor [batch, pos], got "
                        f"{getattr(tokens, 'dtype', type(tokens).__name__)}")
    tokens = tokens[None] if tokens.dim() == 1 else tokens
    if tokens.dim() != 2 or 0 in tokens.shape:
        raise ValueError(f"tokens must have shape [batch, pos] with both at least 1, got {tuple(tokens.shape)}")
    mask = torch.ones_like(tokens) if attention_mask is None else attention_mask
    if mask.shape != tokens.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but tokens have {tuple(tokens.shape)}")
    if bool((mask[:, -1] == 0).any()):
        raise ValueError("attention_mask must be left padding (every row ends with a real token)")
    return TokenBatch(tokens.long(), mask.long())


def assert_matches_hf(model: HookedTransformer, hf_model: nn.Module, tokens: Batch,
                      attention_mask: torch.Tensor | None = None, *, processed: bool | None = None,
                      factor: float = DEFAULT_FACTOR) -> list[Check]:
    """The model's logits (log-probabilities when its weights were processed) equal hf_model's on
    tokens [batch, pos] at every real position, within the dtype's tolerance (fxhook.testing.tolerance).
    processed: None works it out by comparing the two models' embedding and unembedding weights."""
    batch = as_batch(model, tokens, attention_mask)
    processed = is_processed(model, hf_model) if processed is None else processed
    with torch.no_grad():
        actual = model(batch.tokens, attention_mask=batch.attention_mask)
    what = "log-probabilities" if processed else "logits"
    found = hf_logits_difference(model, hf_model, actual, batch.tokens, batch.attention_mask, processed, factor)
    if not found.holds:
        raise PropertyFailure("matches_hf", f"{what} differ from the HF model's by {found}", batch, found.worst,
                              first_hf_divergence(model, hf_model, batch.tokens, batch.attention_mask, processed,
                                                  factor))
    return [Check(f"matches_hf ({what})", found)]


# ------------------------------------------------------------------ generation
def hf_greedy(hf_model: nn.Module, batch: TokenBatch, max_new_tokens: int) -> torch.Tensor:
    """HF generate's greedy new tokens [b, max_new_tokens], with no stop token."""
    pad = hf_model.generation_config.pad_token_id
    with torch.no_grad():
        out = hf_model.generate(input_ids=batch.tokens, attention_mask=batch.attention_mask,
                                max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=None,
                                pad_token_id=int(batch.tokens[0, 0]) if pad is None else pad)
    if out.shape[1] != batch.tokens.shape[1] + max_new_tokens:
        raise RuntimeError(f"HF generate stopped after {out.shape[1] - batch.tokens.shape[1]} of {max_new_tokens} "
                           f"new tokens although no stop token was given")
    return out[:, batch.tokens.shape[1]:]


def fx_greedy(model: HookedTransformer, tokens: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
              use_past_kv_cache: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fxhook's greedy new tokens [b, n] and the logits [b, n, vocab] each was chosen from."""
    out = model.generate(tokens, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         stop_at_eos=False, use_past_kv_cache=use_past_kv_cache, verbose=False,
                         return_type="tokens", output_logits=True)
    return out.sequences[:, tokens.shape[1]:], torch.stack(out.logits, dim=1)


def _first_real_disagreement(actual: torch.Tensor, expected: torch.Tensor, logits: torch.Tensor, tol: float
                             ) -> tuple[int, int, float] | None:
    """(row, step, logit margin) of the first token where two greedy runs [b, n] disagree and the
    chosen logit beats the expected one by more than tol (a near tie is not a failure, but ends the
    comparison of that row: the continuations differ from there)."""
    for row in range(actual.shape[0]):
        for step in range(actual.shape[1]):
            if actual[row, step] != expected[row, step]:
                step_logits = logits[row, step].double()
                margin = float(step_logits[actual[row, step]] - step_logits[expected[row, step]])
                if margin > tol:
                    return row, step, margin
                break
    return None


def assert_generation_matches(model: HookedTransformer, hf_model: nn.Module, tokens: Batch,
                              attention_mask: torch.Tensor | None = None, *, max_new_tokens: int = 4,
                              factor: float = DEFAULT_FACTOR) -> list[Check]:
    """Greedy generation with and without the KV cache gives HF generate's tokens, and each padded row
    gives what it gives alone. Where top logits tie within the tolerance, either token is accepted."""
    batch = as_batch(model, tokens, attention_mask)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    cfg = model.cfg
    expected = hf_greedy(hf_model, batch, max_new_tokens)
    checks = []
    for cached in (True, False):
        actual, logits = fx_greedy(model, batch.tokens, batch.attention_mask, max_new_tokens, cached)
        tol = tolerance(cfg.dtype, cfg.n_layers, logits, factor)
        wrong = _first_real_disagreement(actual, expected, logits, tol)
        label = "with KV cache" if cached else "without KV cache"
        if wrong is not None:
            row, step, margin = wrong
            sequence = torch.cat([batch.rows[row], actual[row:row + 1, :step + 1]], dim=1)
            divergence = cache_divergence(model, sequence, factor) if cached else None
            if divergence is None:
                prefix = torch.cat([batch.rows[row], actual[row:row + 1, :step]], dim=1)
                divergence = first_hf_divergence(model, hf_model, prefix, torch.ones_like(prefix),
                                                 is_processed(model, hf_model), factor)
            raise PropertyFailure(
                "generation_matches", f"greedy generation {label}: row {row} step {step} chose token "
                f"{int(actual[row, step])}, HF generate {int(expected[row, step])} (logit margin {margin:.3g}, "
                f"tolerance {tol:.3g}); fxhook {actual[row].tolist()}, HF {expected[row].tolist()}", batch, margin,
                divergence)
        checks.append(Check(f"greedy {label} == HF generate", Difference(0.0, tol)))
    alone_checks = _rows_alone(model, batch, max_new_tokens, factor)
    return checks + alone_checks


def _rows_alone(model: HookedTransformer, batch: TokenBatch, max_new_tokens: int, factor: float) -> list[Check]:
    """Each left-padded row generates what it generates alone."""
    if batch.tokens.shape[0] == 1 or bool(batch.attention_mask.all()):
        return []
    cfg = model.cfg
    together, logits = fx_greedy(model, batch.tokens, batch.attention_mask, max_new_tokens, True)
    for row, tokens in enumerate(batch.rows):
        alone, _ = fx_greedy(model, tokens, torch.ones_like(tokens), max_new_tokens, True)
        tol = tolerance(cfg.dtype, cfg.n_layers, logits, factor)
        wrong = _first_real_disagreement(together[row:row + 1], alone, logits[row:row + 1], tol)
        if wrong is not None:
            _, step, margin = wrong
            prefix = torch.cat([tokens, alone[:, :step]], dim=1)
            pad = int(batch.tokens.shape[1] - tokens.shape[1])
            padded = torch.cat([batch.tokens[row:row + 1, :pad], prefix], dim=1)
            padded_mask = torch.cat([batch.attention_mask[row:row + 1, :pad], torch.ones_like(prefix)], dim=1)
            with torch.no_grad():
                _, in_batch = model.run_with_cache(padded, attention_mask=padded_mask)
                _, on_its_own = model.run_with_cache(prefix)
            real = {n: v[:, pad:] if v.dim() >= 2 and v.shape[1] == padded.shape[1] else v
                    for n, v in in_batch.items() if "attn_scores" not in n and "pattern" not in n}
            divergence = first_run_divergence(model, real, dict(on_its_own.items()), "the row run alone", factor)
            raise PropertyFailure(
                "generation_matches", f"row {row} generates {together[row].tolist()} in the padded batch but "
                f"{alone[0].tolist()} alone (step {step}, logit margin {margin:.3g})", batch, margin, divergence)
    return [Check("padded rows == rows alone", Difference(0.0, tolerance(cfg.dtype, cfg.n_layers)))]


# ------------------------------------------------------------------ compiled
def assert_compiled_matches(model: HookedTransformer, tokens: Batch, attention_mask: torch.Tensor | None = None,
                            *, names: tuple[str, ...] | None = None, factor: float = DEFAULT_FACTOR) -> list[Check]:
    """The model through torch.compile gives the eager model's logits and hook values (`names`,
    default all) within tolerance. The model's compile setting is left as it was."""
    batch = as_batch(model, tokens, attention_mask)
    cfg = model.cfg
    kept = list(names) if names is not None else None
    before = model.compile_options
    try:
        if before is None:
            model.compile()
        with torch.no_grad():
            compiled_logits, compiled = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask,
                                                             names_filter=kept)
            with model.graphs.eager():
                eager_logits, eager = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask,
                                                           names_filter=kept)
    finally:
        if before is None:
            model.compile(False)
    found = difference(compiled_logits, eager_logits, cfg.n_layers, cfg.dtype, batch.attention_mask, factor=factor)
    divergence = first_run_divergence(model, dict(compiled.items()), dict(eager.items()), "the eager run", factor,
                                      batch.attention_mask)
    if not found.holds or divergence is not None:
        raise PropertyFailure("compiled_matches", f"compiled logits differ from eager ones by {found}", batch,
                              max(found.worst, divergence.difference.worst if divergence else 0.0), divergence)
    return [Check("compiled == eager", found)]
