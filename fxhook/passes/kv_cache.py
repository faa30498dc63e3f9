"""Passes on the captured decode graph (fxhook/capture/kv.py): how the KV cache is kept.

The captured graph holds two opaque ops per layer, `fxhook::kv_append(past, new)`
and `fxhook::decode_mask(full_mask, query, window)`. One of two lowerings
replaces them:

- `lower_growing_cache`: the cache grows by concatenation (eager decode; any
  length, shapes change every step). Inputs (input_ids, position_ids,
  attention_mask [b, past + q], *past_keys, *past_values); outputs (logits,
  *keys, *values).
- `lower_static_cache`: fixed buffers [b, kv, max_len, d] written in place at
  `cache_position` [q] (a tensor input, so the shapes never change from one
  token to the next: compiled decode does not recompile). Attention runs over
  the whole buffer; key j is visible to the query at cache position c when
  j <= c and attention_mask[j] is set (and c - j < window on sliding-window
  layers), so unwritten slots are never read. Inputs (input_ids, position_ids,
  attention_mask [b, max_len], *key_buffers, *value_buffers, cache_position);
  output: the logits.

The mask of each window size is built once for all layers, not per layer.
`embeds_input` makes a variant that starts from the token embeddings instead of
the embedding lookup.
"""
from __future__ import annotations

import torch
from torch import fx

from fxhook.core.attention_math import SDPA_FUNCTIONS, grouped_attention
from fxhook.core.kv_ops import DECODE_MASK, KV_APPEND, growing_mask, static_mask
from fxhook.core.ops import hook_op
from fxhook.core.hook_names import model_hook
from fxhook.core.graph import finish, output_node


def _placeholders(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "placeholder"]


def _replace_masks(gm: fx.GraphModule, make_mask) -> None:
    """Replace every decode_mask node by one shared mask per window size, made right after the inputs."""
    graph = gm.graph
    made: dict[int | None, fx.Node] = {}
    last_input = _placeholders(graph)[-1]
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target is DECODE_MASK]:
        window = node.args[2] if len(node.args) > 2 else node.kwargs.get("sliding_window")
        if window not in made:
            with graph.inserting_after(last_input):
                made[window] = make_mask(window)
        node.replace_all_uses_with(made[window])
        graph.erase_node(node)


def _cache_ops(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function" and n.target is KV_APPEND]


def lower_growing_cache(gm: fx.GraphModule) -> fx.GraphModule:
    graph = gm.graph
    input_ids, _positions, full_mask = _placeholders(graph)[:3]
    for node in _cache_ops(graph):
        past, new = node.args[0], node.args[1]
        with graph.inserting_before(node):
            cat = graph.call_function(torch.ops.aten.cat.default, ([past, new], 2))
        cat.meta = dict(node.meta)
        node.replace_all_uses_with(cat)
        graph.erase_node(node)
    _replace_masks(gm, lambda window: graph.call_function(growing_mask, (full_mask, input_ids, window)))
    return finish(gm)


def lower_static_cache(gm: fx.GraphModule) -> fx.GraphModule:
    graph = gm.graph
    full_mask = _placeholders(graph)[2]
    with graph.inserting_after(_placeholders(graph)[-1]):
        cache_position = graph.placeholder("cache_position")
    for node in _cache_ops(graph):
        buffer, new = node.args[0], node.args[1]
        with graph.inserting_before(node):
            write = graph.call_function(torch.ops.aten.index_copy_.default, (buffer, 2, cache_position, new))
        write.meta = {"val": buffer.meta["val"]} if "val" in buffer.meta else {}
        node.replace_all_uses_with(write)  # index_copy_ returns the buffer: attention reads all of it
        graph.erase_node(node)
    _replace_masks(gm, lambda window: graph.call_function(static_mask, (full_mask, cache_position, window)))
    out = output_node(graph)
    results = out.args[0]
    out.args = (results[0] if isinstance(results, (tuple, list)) else results,)  # the writes are in place
    return finish(gm)


def embeds_input(gm: fx.GraphModule) -> fx.GraphModule:
    """The graph with a new last input `input_embeds` [b, q, d_model] in place of the embedding lookup:
    hook_embed (and everything after it, positional embeddings included) sees the given embeddings.
    input_ids stays an input (it only gives shapes; pass zeros)."""
    graph = gm.graph
    markers = [n for n in graph.nodes if n.op == "call_function" and n.target is hook_op
               and n.args[1] == model_hook("hook_embed")]
    if len(markers) != 1:
        raise NotImplementedError("generating from embeddings needs the hook_embed site, which this "
                                  "model's graph does not have")
    with graph.inserting_after(_placeholders(graph)[-1]):
        embeds = graph.placeholder("input_embeds")
    markers[0].args = (embeds, *markers[0].args[1:])
    return finish(gm)


def logits_only(gm: fx.GraphModule) -> fx.GraphModule:
    """Takes a growing-cache decode graph (..) -> (logits, *keys, *values); gives the same graph returning the
    logits alone. A run resumed from a hook point (passes/resume_from.py) computes only the layers after it:
    the cache it could return is not whole, and without these outputs the earlier layers are dead code."""
    out = output_node(gm.graph)
    results = out.args[0]
    if not isinstance(results, (tuple, list)):
        raise ValueError("logits_only takes a growing-cache decode graph returning (logits, *keys, *values)")
    out.args = (results[0],)
    gm.graph.eliminate_dead_code()
    return finish(gm)


def ungrouped_sdpa(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace SDPA calls with enable_gqa by `grouped_attention` (for the compiled static-cache graph)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in SDPA_FUNCTIONS and node.kwargs.get("enable_gqa"):
            node.target = grouped_attention
    return finish(gm)
