"""Pass: run only blocks[start:stop] (TransformerLens's start_at_layer / stop_at_layer).

With `start`, the residual stream entering block `start` becomes a new graph
input `residual`; with `stop`, the graph returns the residual entering block
`stop`. Dead-code elimination then drops every layer outside the slice, so a
sliced graph does not compute what it does not return.
"""
from __future__ import annotations

from torch import fx

from fxhook.core.hook_names import block_hook
from fxhook.core.graph import finish, hook_point_nodes, output_node


def _resid_entering(nodes: dict[str, fx.Node], layer: int, n_layers: int) -> fx.Node:
    """The value of the residual stream entering block `layer` (layer == n_layers: leaving the last)."""
    if layer == n_layers:
        return nodes[block_hook(n_layers - 1, "hook_resid_post")]
    return nodes[block_hook(layer, "hook_resid_pre")].args[0]


def slice_layers(gm: fx.GraphModule, n_layers: int, start: int | None, stop: int | None) -> fx.GraphModule:
    nodes = hook_point_nodes(gm)
    graph = gm.graph
    if stop is not None:
        output_node(graph).args = (_resid_entering(nodes, stop, n_layers),)
    if start is not None:
        last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1]
        with graph.inserting_after(last_placeholder):
            residual = graph.placeholder("residual")
        entry = nodes[block_hook(start, "hook_resid_pre")] if start < n_layers else None
        if entry is None:
            raise ValueError(f"start_at_layer={start} is past the last block")
        entry.args = (residual,)
    return finish(gm)
