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

import operator
from typing import Any

import torch
from torch import fx

from fxhook.core.attention_math import SDPA_FUNCTIONS, additive_mask
from fxhook.core.graph import finish, regenerate

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


_PURE_FUNCTIONS = {operator.invert, operator.or_, operator.and_, operator.neg, operator.getitem}
_PURE_METHODS = {"any", "all", "transpose", "unsqueeze", "to", "view", "reshape", "float", "bool"}
_COPIES = (aten.clone.default, aten._to_copy.default, aten.copy.default)  # asked-for distinct buffers
_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_INNER_RESHAPES = _RESHAPES + (aten.unflatten.int, aten.flatten.using_ints)


def _pure(node: fx.Node) -> bool:
    t = node.target
    if node.op == "call_method":
        return t in _PURE_METHODS
    if node.op != "call_function":
        return False
    if t in _PURE_FUNCTIONS:
        return True
    if not isinstance(t, torch._ops.OpOverload) or t in _COPIES:
        return False
    schema = t._schema
    return not schema.is_mutable and torch.Tag.nondeterministic_seeded not in t.tags


def _collapse_reshapes(graph: fx.Graph) -> None:
    """reshape(view(x)) -> reshape(x): a chain of shape changes is one shape change (same values)."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _RESHAPES:
            continue
        inner = node.args[0]
        if (isinstance(inner, fx.Node) and inner.op == "call_function" and inner.target in _INNER_RESHAPES
                and len(inner.users) == 1):
            with graph.inserting_before(node):
                new = graph.call_function(aten.reshape.default, (inner.args[0], node.args[1]))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            graph.erase_node(inner)


def _half_slices(cat: fx.Node):
    """(x, h) when `cat` is rotate_half's cat([-x[..., h:], x[..., :h]], -1) of a 2h-wide x, else None."""
    if cat.op != "call_function" or cat.target is not aten.cat.default or len(cat.args[0]) != 2:
        return None
    first, second = cat.args[0]
    if not (isinstance(first, fx.Node) and first.target is aten.neg.default):
        return None
    upper = first.args[0]
    for sl in (upper, second):
        if not (isinstance(sl, fx.Node) and sl.target is aten.slice.Tensor and len(sl.users) == 1):
            return None
    x, val = upper.args[0], _val(cat)
    if second.args[0] is not x or not isinstance(val, torch.Tensor):
        return None
    last = val.dim() - 1
    dim = cat.args[1] if len(cat.args) > 1 else 0
    width = val.shape[-1]
    if not isinstance(width, int) or width % 2 or dim % val.dim() != last:
        return None
    h = width // 2
    if (upper.args[1] % val.dim(), upper.args[2], upper.args[3]) != (last, h, upper.args[3]) or upper.args[3] < width:
        return None
    if (second.args[1] % val.dim(), second.args[2], second.args[3]) != (last, 0, h):
        return None
    return x, h


def _fold_rotate_half(graph: fx.Graph) -> None:
    """rotate_half(x) * s -> roll(x, h) * s_signed, s_signed = cat([-s[..., :h], s[..., h:]]).

    rotate_half(x) = cat([-x2, x1]) = roll(x, h) times the sign pattern [-1]*h + [1]*h, which moves
    onto s (the rotary sine, shared by all layers, so CSE keeps one s_signed): 4 ops per rotated
    tensor instead of 7, bit-identical results.
    """
    for cat in list(graph.nodes):
        found = _half_slices(cat)
        if found is None or len(cat.users) != 1:
            continue
        (mul,) = cat.users
        if mul.target is not aten.mul.Tensor or mul.args[0] is not cat or not isinstance(mul.args[1], fx.Node):
            continue
        sine, (x, h) = mul.args[1], found
        sine_val = _val(sine)
        if not isinstance(sine_val, torch.Tensor) or sine_val.shape[-1] != 2 * h:
            continue
        with graph.inserting_before(mul):
            rolled = graph.call_function(aten.roll.default, (x, [h], [-1]))
            low = graph.call_function(aten.slice.Tensor, (sine, -1, 0, h))
            high = graph.call_function(aten.slice.Tensor, (sine, -1, h, _FULL))
            signed = graph.call_function(aten.cat.default, ([graph.call_function(aten.neg.default, (low,)), high],
                                                            -1))
            new = graph.call_function(aten.mul.Tensor, (rolled, signed))
        new.meta = dict(mul.meta)
        mul.replace_all_uses_with(new)
        neg, second = cat.args[0]
        for dead in (mul, cat, neg, neg.args[0], second):
            graph.erase_node(dead)


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


def _share_additive_masks(graph: fx.Graph) -> None:
    """Convert each boolean SDPA mask once for all layers instead of inside every SDPA call."""
    made: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}
    for node in list(graph.nodes):
        mask = node.kwargs.get("attn_mask") if node.op == "call_function" and node.target in SDPA_FUNCTIONS else None
        query = _val(node.args[0]) if node.args else None
        if not isinstance(mask, fx.Node) or not isinstance(query, torch.Tensor):
            continue
        mask_val = _val(mask)
        if mask_val is not None and mask_val.dtype != torch.bool:
            continue
        if mask_val is None and not (mask.op == "call_function" and mask.target in (operator.or_, operator.and_)):
            continue  # only masks known to be boolean
        key = (mask, query.dtype)
        if key not in made:
            with graph.inserting_after(mask):
                made[key] = graph.call_function(additive_mask, (mask, query.dtype))
        node.kwargs = {**node.kwargs, "attn_mask": made[key]}


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
    _collapse_reshapes(graph)
    _fold_rotate_half(graph)
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
    _share_additive_masks(graph)
    return finish(gm)


def flat_attributes(gm: fx.GraphModule) -> fx.GraphModule:
    """Read parameters and buffers as plain instance attributes of `gm` (same tensor objects).

    A get_attr of "hf.model.layers.0.self_attn.q_proj.weight" costs one nn.Module.__getattr__ per
    dotted level at every call; a flat attribute costs a dict lookup. For graphs run eagerly only
    (torch.compile should see registered parameters).
    """
    names: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or "." not in node.target:
            continue
        if node.target not in names:
            flat = f"_flat_{len(names)}"
            value = gm
            for part in node.target.split("."):
                value = getattr(value, part)
            object.__setattr__(gm, flat, value)  # not registered: a plain attribute
            names[node.target] = flat
        node.target = names[node.target]
    return regenerate(gm)
