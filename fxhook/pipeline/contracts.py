"""Pass contracts: what form of graph a pass takes and what it guarantees, checked as the pipeline runs.

A graph's form is the set of fxhook node kinds it contains:

- "marker": `fxhook::hook` identity ops naming hook sites (capture's output);
- "hook_point": calls of HookPoint modules (after `insert_hook_points`);
- "attention": opaque `fxhook::attention` ops (before `lower_attention`);
- "kv_op": opaque `fxhook::kv_append` / `fxhook::decode_mask` ops (captured decode graphs, before a
  cache lowering).

A `Pass` declares the kinds it accepts (the graph may contain no other kind when it starts) and the
kinds it removes (none may be left when it ends). `run_passes` checks both around every pass, so a
pass list in the wrong order fails at build time with the pass's name, never as a wrong graph.
Like torch.fx's pass manager, a pass is a function GraphModule -> GraphModule; unlike it, the
contract is data that a reader (and tests/test_pipeline.py) can see.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from torch import fx

from fxhook.core.graph import deferred_code, hook_point_nodes
from fxhook.core.kv_ops import DECODE_MASK, KV_APPEND
from fxhook.core.ops import attention_op, hook_op

MARKER, HOOK_POINT, ATTENTION, KV_OP = "marker", "hook_point", "attention", "kv_op"
ALL_KINDS = frozenset({MARKER, HOOK_POINT, ATTENTION, KV_OP})


class PassContractError(RuntimeError):
    """A pass got a graph of a form it does not take, or left one it promised to remove."""


def form_of(gm: fx.GraphModule) -> frozenset[str]:
    """The fxhook node kinds present in `gm`."""
    kinds = set()
    for node in gm.graph.nodes:
        if node.op == "call_function":
            if node.target is hook_op:
                kinds.add(MARKER)
            elif node.target is attention_op:
                kinds.add(ATTENTION)
            elif node.target in (KV_APPEND, DECODE_MASK):
                kinds.add(KV_OP)
    if hook_point_nodes(gm):
        kinds.add(HOOK_POINT)
    return frozenset(kinds)


@dataclass(frozen=True)
class Pass:
    """One graph pass with its contract. `run` may carry its arguments (a closure over the spec)."""

    name: str
    run: Callable[[fx.GraphModule], fx.GraphModule]
    accepts: frozenset[str] = ALL_KINDS
    removes: frozenset[str] = frozenset()
    # an extra guarantee, checked after the pass: returns a message when it does not hold
    ensures: Callable[[fx.GraphModule], str | None] | None = field(default=None, compare=False)


def run_passes(gm: fx.GraphModule, passes: Iterable[Pass], graph_kind: str = "graph") -> fx.GraphModule:
    """Apply `passes` in order, checking each one's contract before and after it runs; the module's code is
    regenerated once, after the last (no pass runs the module: they read and rewrite its graph)."""
    with deferred_code():
        gm = _run_checked(gm, passes, graph_kind)
    gm.recompile()
    return gm


def _run_checked(gm: fx.GraphModule, passes: Iterable[Pass], graph_kind: str) -> fx.GraphModule:
    for p in passes:
        extra = form_of(gm) - p.accepts
        if extra:
            raise PassContractError(f"{graph_kind}: pass {p.name!r} takes graphs with only {sorted(p.accepts)} "
                                    f"nodes, but this one still has {sorted(extra)}: the pass list is out of order")
        gm = p.run(gm)
        left = form_of(gm) & p.removes
        if left:
            raise PassContractError(f"{graph_kind}: pass {p.name!r} promises to remove {sorted(p.removes)} "
                                    f"nodes but left {sorted(left)}")
        problem = p.ensures(gm) if p.ensures is not None else None
        if problem:
            raise PassContractError(f"{graph_kind}: pass {p.name!r} broke its guarantee: {problem}")
    return gm
