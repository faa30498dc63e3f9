"""Language-model metrics and sampling with TransformerLens's signatures."""
from __future__ import annotations

from typing import Any

import torch

from fxhook.runtime import sampling
from fxhook.runtime.loss import lm_cross_entropy_loss


def lm_accuracy(logits: torch.Tensor, tokens: torch.Tensor, per_token: bool = False) -> torch.Tensor:
    """Top-1 next-token accuracy of logits [batch, pos, d_vocab] on tokens [batch, pos]: a scalar, or the
    hits [batch, pos - 1] with per_token (the first token has no prediction)."""
    hits = logits.argmax(dim=-1)[:, :-1] == tokens[:, 1:].to(logits.device)
    return hits if per_token else hits.sum() / hits.numel()


def apply_repetition_penalty(logits: torch.Tensor, tokens: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [batch, d_vocab] of the tokens that occur in each row of tokens [batch, pos] made less likely:
    divided by `penalty` where positive, multiplied where negative (the CTRL paper's rule, as HF applies it)."""
    if penalty <= 0:
        raise ValueError(f"repetition_penalty must be positive (1.0 switches it off), got {penalty}")
    seen = logits.gather(-1, tokens.long())
    penalised = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(-1, tokens.long(), penalised)


def sample_logits(final_logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None,
                  temperature: float = 1.0, freq_penalty: float = 0.0, repetition_penalty: float = 1.0,
                  tokens: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of final_logits [batch, d_vocab]: the repetition penalty, then temperature (0:
    argmax), the frequency penalty, top-k (or else top-p), then a draw (torch's global RNG)."""
    if repetition_penalty != 1.0:
        if tokens is None:
            raise ValueError("repetition_penalty needs tokens= (the tokens so far, [batch, pos])")
        final_logits = apply_repetition_penalty(final_logits, tokens, repetition_penalty)
    return sampling.sample_logits(final_logits, top_k=top_k, top_p=top_p, temperature=temperature,
                                  freq_penalty=freq_penalty, tokens=tokens)


def logits_to_df(logits: torch.Tensor, tokenizer: Any = None, top_k: int | None = None):
    """A pandas DataFrame of one position's logits [d_vocab], most likely first: token_index,
    token_string (with a tokenizer), logit, log_prob, probability; top_k keeps that many rows."""
    import pandas as pd

    if logits.ndim != 1:
        raise ValueError(f"logits_to_df takes one position's logits [d_vocab], got shape {tuple(logits.shape)}: "
                         "index the batch and position first, e.g. logits[0, -1]")
    log_probs = logits.float().log_softmax(dim=-1)
    order = log_probs.argsort(descending=True)
    if top_k is not None:
        order = order[:top_k]
    rows: dict[str, list] = {"token_index": order.tolist()}
    if tokenizer is not None:
        rows["token_string"] = [tokenizer.decode([i]) for i in rows["token_index"]]
    rows["logit"] = logits[order].detach().cpu().tolist()
    rows["log_prob"] = log_probs[order].detach().cpu().tolist()
    rows["probability"] = log_probs[order].exp().detach().cpu().tolist()
    return pd.DataFrame(rows)


__all__ = ["lm_accuracy", "lm_cross_entropy_loss", "sample_logits", "logits_to_df", "apply_repetition_penalty"]
