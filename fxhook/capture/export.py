"""Capture: a HF causal LM -> `torch.fx.GraphModule` with hook markers.

`torch.export` (non-strict) is the only tracer that captures HF models
exactly (design page). We export under no_grad (a grad-mode node would break
fullgraph compile) with dynamic batch and sequence length.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim

from fxhook.adapter import Adapter
from fxhook.capture.instrument import instrumented


class CausalLMRoot(nn.Module):
    """The function we capture: tokens and a padding mask in, logits out.

    Positions come from the padding mask, so a left-padded row gives the same
    result as the same prompt unpadded.
    """

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False)
        return out.logits


def capture(hf_model: nn.Module, adapter: Adapter, n_heads: int, n_kv_heads: int) -> torch.fx.GraphModule:
    """Export `hf_model` with markers; returns the exported module's GraphModule.

    The GraphModule holds the HF parameters (shared, under `hf.`) in a module
    tree of its own; `gm.meta["norm_eps"]` keeps each norm's epsilon.
    """
    was_training = hf_model.training
    hf_model.eval()
    root = CausalLMRoot(hf_model)
    device = next(hf_model.parameters()).device
    ids = torch.zeros((2, 8), dtype=torch.long, device=device)
    mask = torch.ones((2, 8), dtype=torch.long, device=device)
    dims = {0: Dim.DYNAMIC, 1: Dim.DYNAMIC}
    try:
        with torch.no_grad(), instrumented(hf_model, adapter, n_heads, n_kv_heads) as norm_eps:
            ep = torch.export.export(root, (ids, mask), dynamic_shapes=(dims, dims), strict=False)
    finally:
        hf_model.train(was_training)
    gm = ep.module()
    gm.meta["norm_eps"] = dict(norm_eps)
    return gm
