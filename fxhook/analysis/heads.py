"""Per-head outputs from the cache: what each attention head writes to the residual stream."""
from __future__ import annotations

import warnings

import torch

from fxhook.analysis.resid import _n_layers_if_default
from fxhook.analysis.slicing import SliceInput, as_slice
from fxhook.core.hook_names import block_hook


class HeadsMixin:
    """compute_head_results and stack_head_results (labels "L{layer}H{head}")."""

    def compute_head_results(self) -> None:
        """Fill `blocks.L.attn.hook_result` [*b, pos, head, d_model] from hook_z and W_O.

        So per-head attribution works without re-running with use_attn_result; hook_attn_out is
        the sum of these over heads plus b_O.
        """
        n = self.model.cfg.n_layers
        if all(block_hook(l, "attn.hook_result") in self.cache_dict for l in range(n)):
            warnings.warn("the cache already holds the head results (hook_result): nothing recomputed",
                          stacklevel=2)
            return
        for l in range(n):
            z = self[("z", l)]  # [*b, pos, head, d_head]
            w_o = self.model.blocks[l].attn.W_O  # [head, d_head, d_model]
            result = torch.einsum("...hd,hdm->...hm", z, w_o.to(z.dtype))
            self.cache_dict[block_hook(l, "attn.hook_result")] = result

    def stack_head_results(self, layer: int = -1, return_labels: bool = False, incl_remainder: bool = False,
                           pos_slice: SliceInput = None, apply_ln: bool = False):
        """[layer * n_heads (+1), *bp, d_model]: every head's output in the blocks before `layer`,
        heads in order L0H0, L0H1, ...; incl_remainder adds "remainder", the rest of the residual
        stream leaving block layer - 1 (biases, embeddings, MLPs), so the stack sums to it."""
        layer = _n_layers_if_default(self.model, layer)
        pos = as_slice(pos_slice)
        if any(block_hook(l, "attn.hook_result") not in self.cache_dict for l in range(layer)):
            self.compute_head_results()
        n_heads = self.model.cfg.n_heads
        labels = [f"L{l}H{h}" for l in range(layer) for h in range(n_heads)]
        per_layer = [pos.apply(self[("result", l)], dim=-3) for l in range(layer)]  # [*bp, head, d_model]
        if per_layer:
            stack = torch.cat(per_layer, dim=-2).movedim(-2, 0)
        else:
            like = pos.apply(self["hook_embed"], dim=-2)
            stack = like.new_zeros((0, *like.shape))
        if incl_remainder:
            if layer == 0:
                raise ValueError("incl_remainder needs a block before `layer`: the remainder of layer 0 is "
                                 "the embedding, see decompose_resid(layer=0)")
            rest = pos.apply(self[("resid_post", layer - 1)], dim=-2) - stack.sum(dim=0)
            stack = torch.cat([stack, rest[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos)
        return (stack, labels) if return_labels else stack
