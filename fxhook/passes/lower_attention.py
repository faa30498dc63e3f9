"""Pass: lower each opaque `fxhook::attention` node.

"eager" writes the TransformerLens attention math into the graph with
`hook_attn_scores` and `hook_pattern` markers; "sdpa" uses the fused kernel
(no pattern is materialised). The choice is per layer, so only layers whose
internals are read pay for materialising the pattern.
"""
from __future__ import annotations

from typing import Callable, Collection, Literal

import torch
from torch import fx
from torch.fx.proxy import GraphAppendingTracer, Proxy

from fxhook.capture.ops import hook_op
from fxhook.passes.graph_utils import attention_nodes, finish
from fxhook.runtime.attention_math import eager_attention

Mode = Literal["eager", "sdpa"]
PATTERN_HOOKS = ("hook_attn_scores", "hook_pattern")  # what only the eager lowering can expose


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scaling: float, n_rep: int) -> torch.Tensor:
    """z [b, p_q, h, d_v] by the fused kernel, equal to `eager_attention`'s z.

    A query row with nothing to attend to (a left-pad position) would make SDPA return NaN: it attends
    to every key instead and its z is set to zero, as the eager math gives.
    """
    if mask is None:
        z = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=n_rep > 1)
        return z.transpose(1, 2)
    has_key = mask.any(dim=-1, keepdim=True)  # [b, 1, p_q, 1]
    z = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask | ~has_key, scale=scaling, enable_gqa=n_rep > 1)
    return z.masked_fill(~has_key, 0.0).transpose(1, 2)


def attention_modes(wanted_hooks: Collection[str] | None) -> Callable[[int], Mode]:
    """Per-layer choice: eager where scores or pattern are wanted (None: everything is), else fused."""
    if wanted_hooks is None:
        return lambda _layer: "eager"
    eager_layers = {int(name.split(".")[1]) for name in wanted_hooks
                    if name.startswith("blocks.") and name.endswith(PATTERN_HOOKS)}
    return lambda layer: "eager" if layer in eager_layers else "sdpa"


def lower_attention(gm: fx.GraphModule, mode_for_layer: Callable[[int], Mode] = lambda _layer: "eager"
                    ) -> fx.GraphModule:
    graph = gm.graph
    tracer = GraphAppendingTracer(graph)
    for node in attention_nodes(graph):
        q, k, v, mask, scaling, softcap, layer = node.args
        prefix = f"blocks.{layer}.attn."
        n_rep = q.meta["val"].shape[1] // k.meta["val"].shape[1]
        with graph.inserting_before(node):
            pq, pk, pv = (Proxy(x, tracer) for x in (q, k, v))
            pmask = None if mask is None else Proxy(mask, tracer)
            if mode_for_layer(layer) == "sdpa" and softcap is None:
                z = fused_attention(pq, pk, pv, pmask, scaling, n_rep)
            else:
                z, _, _ = eager_attention(
                    pq, pk, pv, pmask, scaling, softcap, n_rep,
                    hook_scores=lambda s: hook_op(s, prefix + "hook_attn_scores"),
                    hook_pattern=lambda p: hook_op(p, prefix + "hook_pattern"))
        node.replace_all_uses_with(z.node)
        graph.erase_node(node)
    return finish(gm)
