"""Pass: lower each opaque `fxhook::attention` node.

"eager" writes the TransformerLens attention math into the graph with
`hook_attn_scores` and `hook_pattern` markers; "sdpa" uses the fused kernel
(no pattern is materialised). The choice is per layer, so only layers whose
internals are read pay for materialising the pattern.
"""
from __future__ import annotations

from typing import Callable, Collection, Literal

from torch import fx
from torch.fx.proxy import GraphAppendingTracer, Proxy

from fxhook.core import hook_names
from fxhook.core.ops import hook_op
from fxhook.core.graph import attention_nodes, finish
from fxhook.core.attention_math import eager_attention, fused_attention

Mode = Literal["eager", "sdpa"]


def attention_modes(wanted_hooks: Collection[str] | None) -> Callable[[int], Mode]:
    """Per-layer choice: eager where scores or pattern are wanted (None: everything is), else fused."""
    if wanted_hooks is None:
        return lambda _layer: "eager"
    eager_layers = {hook_names.layer_of(name) for name in wanted_hooks if hook_names.is_pattern_hook(name)}
    return lambda layer: "eager" if layer in eager_layers else "sdpa"


def lower_attention(gm: fx.GraphModule, mode_for_layer: Callable[[int], Mode] = lambda _layer: "eager"
                    ) -> fx.GraphModule:
    graph = gm.graph
    tracer = GraphAppendingTracer(graph)
    for node in attention_nodes(graph):
        q, k, v, mask, scaling, softcap, layer, *alibi = node.args
        alibi_slopes = alibi[0] if alibi else node.kwargs.get("alibi_slopes")
        n_rep = q.meta["val"].shape[1] // k.meta["val"].shape[1]
        with graph.inserting_before(node):
            pq, pk, pv = (Proxy(x, tracer) for x in (q, k, v))
            pmask = None if mask is None else Proxy(mask, tracer)
            if mode_for_layer(layer) == "sdpa" and softcap is None and alibi_slopes is None:
                z = fused_attention(pq, pk, pv, pmask, scaling, n_rep)
            else:  # ALiBi's per-head bias always takes the explicit form, as a soft cap does
                z, _, _ = eager_attention(
                    pq, pk, pv, pmask, scaling, softcap, n_rep,
                    hook_scores=lambda s: hook_op(s, hook_names.block_hook(layer, "attn.hook_attn_scores")),
                    hook_pattern=lambda p: hook_op(p, hook_names.block_hook(layer, "attn.hook_pattern")),
                    alibi_slopes=alibi_slopes)
        node.replace_all_uses_with(z.node)
        graph.erase_node(node)
    return finish(gm)
