"""Pass: return chosen activations as extra graph outputs (a cache without Python hooks).

`run_with_cache(names_filter=...)` asks for some activations. Returning them
from the graph, instead of saving them from Python callbacks, lets a compiled
graph produce the cache in one call and keeps nothing else alive.
"""
from __future__ import annotations

from torch import fx

from fxhook.core.graph import finish, hook_point_nodes, output_node

ACTIVATION_NAMES = "activation_names"  # gm.meta key: the names of the extra outputs, in order


def expose_activations(gm: fx.GraphModule, names: frozenset[str], keep_points: frozenset[str]
                       ) -> fx.GraphModule:
    """gm(*args) -> (out, (activation, ...)) for the hook points in `names` that the graph has.

    A point in `keep_points` still runs its hooks and its output (what later layers read) is returned;
    any other exposed point's call is removed. Names the graph lacks (layers a slice does not run) are
    left out; gm.meta[ACTIVATION_NAMES] lists what is returned, in execution order. A point called more
    than once (a norm recomputed per head) exposes its last call; its other calls go too when it is not kept.
    """
    exposed: list[str] = []
    values: list[fx.Node] = []
    last_calls = hook_point_nodes(gm)
    for node in list(gm.graph.nodes):
        if (node.op == "call_module" and node.target in names and node.target not in keep_points
                and node.target in last_calls and node is not last_calls[node.target]):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    for name, node in last_calls.items():
        if name not in names:
            continue
        if name in keep_points:
            values.append(node)
        else:
            values.append(node.args[0])
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        exposed.append(name)
    output = output_node(gm.graph)
    output.args = ((output.args[0], tuple(values)),)
    gm.meta[ACTIVATION_NAMES] = tuple(exposed)
    return finish(gm)
