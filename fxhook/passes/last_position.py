"""Pass: compute the final norm and the unembedding for the last position only (a prompt's logits).

Generation reads a prompt's logits at its last position only, yet a graph run over the prompt
normalises and unembeds every position: on SmolLM2 (vocab 49152, d_model 576) the unembedding of an
8-position prompt is a large share of the prompt's work. HF's `generate` avoids it with
`logits_to_keep`; this pass does the same in the graph.

Where to cut is found from the hook markers, not from module names: the residual stream leaving the
last block (the `hook_resid_post` marker with the highest layer) is what the final norm and the
unembedding read, and everything after it works position by position (norm, unembedding, soft cap).
Its readers get `resid[:, -1:]` instead, so the graph returns logits [b, 1, vocab]; the marker itself
still sees every position. HF code may reshape with the prompt's length after the norm (GPT-2's
`view(-1, length, d_model)`): such a size becomes 1. The shapes after the cut are propagated again
(fake tensors), which checks every reshape at build time and keeps the shape metadata later passes
read true. The hooks after the cut (ln_final.*, unembed.*) would see one position, so the runtime uses
this graph only where none of them is live (the compiled prompt runs with no hook live).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch.fx.node import map_arg

from fxhook.core.graph import finish, hook_markers
from fxhook.core.hook_names import key_of, layer_of

_RESID_POST = "hook_resid_post"
_POSITION_AXIS = 1  # [batch, pos, d_model]


def last_resid_post(gm: fx.GraphModule) -> fx.Node:
    """The marker of the residual stream leaving the last block (form: markers present)."""
    markers = [m for m in hook_markers(gm.graph) if key_of(m.args[1]) == _RESID_POST]
    if not markers:
        raise ValueError("last_position_logits needs the graph's hook_resid_post markers (run it before "
                         "insert_hook_points, on a graph that runs every block)")
    return max(markers, key=lambda m: layer_of(m.args[1]))


def _after(graph: fx.Graph, start: fx.Node) -> list[fx.Node]:
    """The nodes that depend on `start`, in graph order (the output excluded)."""
    reached, order = {start}, []
    for node in graph.nodes:
        if node.op != "output" and node not in reached and any(i in reached for i in node.all_input_nodes):
            reached.add(node)
            order.append(node)
    return order


def _propagate_shapes(gm: fx.GraphModule, nodes: list[fx.Node], fake_mode: Any) -> None:
    """Recompute the fake value (meta "val") of `nodes`, in order, from their inputs' values."""
    def value(node: fx.Node) -> Any:
        if "val" in node.meta:
            return node.meta["val"]
        if node.op == "get_attr":
            return fake_mode.from_tensor(getattr(gm, node.target), static_shapes=True)
        raise ValueError(f"last_position_logits: {node.name} has no shape metadata")

    with fake_mode:
        for node in nodes:
            if node.op != "call_function":
                raise ValueError(f"last_position_logits: {node.op} {node.target} after the last block's residual "
                                 f"is not a function call; this pass only takes captured (aten-level) graphs")
            args, kwargs = map_arg((node.args, node.kwargs), value)
            try:
                node.meta["val"] = node.target(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - reported with the node that cannot take one position
                raise ValueError(f"last_position_logits: {node.name} ({node.target}) cannot run on the last "
                                 f"position alone: {type(error).__name__}: {error}") from error
            node.meta.pop("tensor_meta", None)


def last_position_logits(gm: fx.GraphModule) -> fx.GraphModule:
    """A captured graph with markers and shape metadata (logits [b, q, vocab]) -> the same graph returning
    logits [b, 1, vocab]: the last position's, computed from the last block's residual at that position
    only. Every other output (KV caches) and every value up to the last block's residual is unchanged."""
    resid = last_resid_post(gm)
    resid_val = resid.meta.get("val")
    length = getattr(resid_val, "shape", (None, None))[_POSITION_AXIS]
    if not isinstance(length, torch.SymInt):
        raise ValueError("last_position_logits needs a graph captured with a dynamic position axis (its shape "
                         "metadata says which sizes are the prompt's length)")
    graph = gm.graph
    with graph.inserting_after(resid):
        last = graph.call_function(torch.ops.aten.slice.Tensor, (resid, _POSITION_AXIS, -1, None))
    last.meta.update({k: v for k, v in resid.meta.items() if k in ("nn_module_stack", "stack_trace")})
    resid.replace_all_uses_with(last, delete_user_cb=lambda user: user is not last)

    def one_position(arg: fx.Node) -> Any:  # a size equal to the prompt's length: now 1
        size = arg.meta.get("val")
        return 1 if isinstance(size, torch.SymInt) and size.node.expr == length.node.expr else arg

    downstream = _after(graph, last)
    for node in downstream:
        node.args, node.kwargs = map_arg((node.args, node.kwargs), one_position)
    _propagate_shapes(gm, [last, *downstream], resid_val.fake_mode)
    return finish(gm)
