"""Pass: lower each opaque `fxhook::attention` node.

"eager" writes the TransformerLens attention math into the graph with
`hook_attn_scores` and `hook_pattern` markers; "sdpa" uses the fused kernel
(no pattern is materialised). The choice is per layer, so only layers whose
internals are read pay for materialising the pattern.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import fx
from torch.fx.proxy import GraphAppendingTracer, Proxy

from fxhook.capture.ops import hook_op
from fxhook.passes.graph_utils import attention_nodes, finish
from fxhook.runtime.attention_math import eager_attention, repeat_kv

Mode = Literal["eager", "sdpa"]


def _sdpa(q, k, v, mask, scaling: float, n_rep: int):
    z = torch.nn.functional.scaled_dot_product_attention(
        q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask, scale=scaling)
    return z.transpose(1, 2)


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
                z = _sdpa(pq, pk, pv, pmask, scaling, n_rep)
            else:
                z, _, _ = eager_attention(
                    pq, pk, pv, pmask, scaling, softcap, n_rep,
                    hook_scores=lambda s: hook_op(s, prefix + "hook_attn_scores"),
                    hook_pattern=lambda p: hook_op(p, prefix + "hook_pattern"))
        node.replace_all_uses_with(z.node)
        graph.erase_node(node)
    return finish(gm)
