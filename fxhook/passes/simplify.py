"""Pass: drop the no-op nodes export leaves behind and share repeated computations.

Eager decode runs the graph node by node, one dispatch each, so on a small
model per-token time is mostly node count. Export leaves many nodes that do
nothing at run time: `_assert_tensor_metadata` checks, `to` a dtype/device the
tensor already has, full slices `x[:, 0:INT_MAX]`, and a transpose undone by
the next one (around hook sites whose hook point was pruned). Layers also
repeat work that does not depend on the layer (the rotary cos/sin reshapes):
common-subexpression elimination keeps one copy.

Only pure aten ops are touched, never HookPoint calls or in-place writes, and
every replacement is by a tensor equal in value (a view that the removed op
would also have returned), so hooks see the same activations.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx

from fxhook.passes.graph_utils import finish

aten = torch.ops.aten
_FULL = 2 ** 62  # a slice end at least this large means "to the end"
_TO_OPS = (aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default)


def _val(node: Any):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _same_tensor_kind(node: fx.Node) -> bool:
    """`node` (a `to`) returns its input unchanged: same dtype, device and layout, no copy asked for."""
    src, out = _val(node.args[0]), _val(node)
    if node.target is aten._to_copy.default or node.kwargs.get("copy", False):
        return False
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
        return False
    return src.dtype == out.dtype and src.device == out.device and src.layout == out.layout


def _is_noop(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    t = node.target
    if t in _TO_OPS:
        return _same_tensor_kind(node)
    if t is aten.slice.Tensor:
        args = list(node.args) + [None] * (5 - len(node.args))
        _x, _dim, start, end, step = args[:5]
        return start in (0, None) and isinstance(end, int) and end >= _FULL and step in (1, None)
    if t is aten.transpose.int:
        inner = node.args[0]
        return (isinstance(inner, fx.Node) and inner.op == "call_function" and inner.target is aten.transpose.int
                and sorted(inner.args[1:3]) == sorted(node.args[1:3]) and len(inner.users) == 1)
    return False


def _pure(node: fx.Node) -> bool:
    t = node.target
    if node.op != "call_function" or not isinstance(t, torch._ops.OpOverload):
        return False
    schema = t._schema
    return not schema.is_mutable and torch.Tag.nondeterministic_seeded not in t.tags


def _key(node: fx.Node):
    def freeze(a):
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, tuple(freeze(x) for x in a))
        if isinstance(a, dict):
            return tuple(sorted((k, freeze(v)) for k, v in a.items()))
        if isinstance(a, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
            return str(a)
        return a
    return node.target, freeze(node.args), freeze(node.kwargs)


def simplify(gm: fx.GraphModule) -> fx.GraphModule:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten._assert_tensor_metadata.default:
            graph.erase_node(node)
        elif _is_noop(node):
            source = node.args[0]
            if node.target is aten.transpose.int:  # transpose(transpose(x)) == x
                inner, source = source, source.args[0]
                node.replace_all_uses_with(source)
                graph.erase_node(node)
                graph.erase_node(inner)
                continue
            node.replace_all_uses_with(source)
            graph.erase_node(node)
    seen: dict[Any, fx.Node] = {}
    for node in list(graph.nodes):
        if not _pure(node):
            continue
        try:
            key = _key(node)
            hash(key)
        except TypeError:
            continue
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
        else:
            seen[key] = node
    return finish(gm)
