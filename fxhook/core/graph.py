"""Small helpers shared by the graph passes."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
from torch import fx

from fxhook.core.ops import attention_op, hook_op


def hook_markers(graph: fx.Graph) -> Iterator[fx.Node]:
    return (n for n in list(graph.nodes) if n.op == "call_function" and n.target is hook_op)


def attention_nodes(graph: fx.Graph) -> Iterator[fx.Node]:
    return (n for n in list(graph.nodes) if n.op == "call_function" and n.target is attention_op)


def hook_point_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """name -> the call_module node of each HookPoint in `gm`."""
    from fxhook.core.hook_point import HookPoint

    out = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), HookPoint):
            out[n.target] = n
    return out


def output_node(graph: fx.Graph) -> fx.Node:
    return next(n for n in reversed(graph.nodes) if n.op == "output")


def plain_codegen(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop export's pytree in/out handling so passes can add or remove placeholders freely."""
    gm.graph._codegen = fx.graph.CodeGen()
    gm._forward_pre_hooks.clear()
    for node in list(gm.graph.nodes):
        # export's input-guard module and metadata assertions check nothing we rely on, and as impure
        # nodes they would keep dead code (layers a sliced graph does not run) alive
        if (node.op == "call_module" and node.target == "_guards_fn") or \
                (node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default):
            gm.graph.erase_node(node)
        elif node.op == "call_function" and node.target is torch.ops.aten.dropout.default and not node.args[2]:
            node.replace_all_uses_with(node.args[0])  # eval-mode dropout: the identity (but impure to fx)
            gm.graph.erase_node(node)
    output = output_node(gm.graph)
    (result,) = output.args
    if isinstance(result, (tuple, list)) and len(result) == 1:
        output.args = (result[0],)
    gm.recompile()
    return gm


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of the graph, sharing gm's submodules and parameters."""
    graph = fx.Graph()
    value_map: dict[fx.Node, fx.Node] = {}
    result = graph.graph_copy(gm.graph, value_map)
    graph.output(result)
    new = fx.GraphModule(gm, graph)
    new.meta = dict(gm.meta)
    return new


# set by `deferred_code()`: passes leave a graph's Python code to be regenerated once, at the end
_DEFER_CODE: contextvars.ContextVar[bool] = contextvars.ContextVar("fxhook_defer_code", default=False)


@contextlib.contextmanager
def deferred_code() -> Iterator[None]:
    """Within the block, `finish` and `regenerate` leave a GraphModule's code stale: a list of passes, none of
    which runs the module, regenerates it once at its end (`run_passes`). Regenerating a 12-layer graph's
    source takes ~50 ms, once per pass otherwise: most of the building of a resumed graph."""
    token = _DEFER_CODE.set(True)
    try:
        yield
    finally:
        _DEFER_CODE.reset(token)


def regenerate(gm: fx.GraphModule) -> fx.GraphModule:
    """gm with its code regenerated from its graph (not within `deferred_code()`)."""
    if not _DEFER_CODE.get():
        gm.recompile()
    return gm


def finish(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    return regenerate(gm)
