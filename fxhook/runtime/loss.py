"""The language-model loss forward returns (TransformerLens's lm_cross_entropy_loss)."""
from __future__ import annotations

import torch


def lm_cross_entropy_loss(
    logits: torch.Tensor,  # [batch, pos, d_vocab]
    tokens: torch.Tensor,  # [batch, pos]
    attention_mask: torch.Tensor | None = None,  # [batch, pos]
    per_token: bool = False,
) -> torch.Tensor:
    """Next-token cross entropy; padded positions (mask 0) are left out of the mean."""
    log_probs = logits[:, :-1].float().log_softmax(dim=-1)
    nll = -log_probs.gather(-1, tokens[:, 1:, None].to(log_probs.device))[..., 0]  # [batch, pos - 1]
    if attention_mask is not None:
        keep = (attention_mask[:, 1:] * attention_mask[:, :-1]).to(nll.dtype).to(nll.device)
        if per_token:
            return nll * keep
        return (nll * keep).sum() / keep.sum()
    return nll if per_token else nll.mean()
