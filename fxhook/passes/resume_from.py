"""Pass: resume the forward from chosen hook points (generalises start_at_layer to every hook point).

Patching one activation changes only what is computed from it. This pass keeps exactly that part
of the graph: the hook points named as starts become fed from new graph inputs (their HookPoint
calls stay, so hooks attached there still fire on the fed value), every other hook point upstream
of or beside them is replaced by an input too, and dead-code elimination then drops whatever the
remaining graph does not read. Values derived from the graph's own inputs alone (causal and padding
masks, rotary tables, position ids) are still computed from `input_ids` / `attention_mask`, so
padding keeps working.
"""
from __future__ import annotations

from torch import fx

from fxhook.core.graph import finish, hook_point_nodes

RESUME_INPUTS = "resume_inputs"  # gm.meta key: the hook names fed as extra inputs, in placeholder order


def downstream_nodes(roots: list[fx.Node]) -> set[fx.Node]:
    """Every node computed from one of `roots` (the roots included)."""
    seen: set[fx.Node] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.users)
    return seen


def _point_calls(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """name -> every call of that HookPoint (a norm recomputed per head is called more than once)."""
    names = set(hook_point_nodes(gm))
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in names:
            calls.setdefault(node.target, []).append(node)
    return calls


def resume_from(gm: fx.GraphModule, starts: frozenset[str]) -> fx.GraphModule:
    """Takes a hooked graph (input_ids, attention_mask) -> out with a HookPoint call at every site; gives
    (input_ids, attention_mask, *values) -> out computing only what depends on a hook point in `starts`.

    `values` are activations, named in order by gm.meta[RESUME_INPUTS]: those of the starts (fed into
    their HookPoint calls) and of every other hook point the kept part reads without computing it (the
    residual stream a patched head's output is added to, the values a patched pattern weighs, ...). A
    start computed from another start is computed, not fed. Raises ValueError for a name the graph lacks.
    """
    calls = _point_calls(gm)
    unknown = sorted(starts - set(calls))
    if unknown:
        raise ValueError(f"cannot resume from {unknown}: the graph has no such hook point")
    computed = set()  # starts that another start's value reaches: they are computed, not fed
    for name in starts:
        others = [user for other in starts - {name} for node in calls[other] for user in node.users]
        if set(calls[name]) & downstream_nodes(others):
            computed.add(name)
    fed_starts = starts - computed
    roots = [node for name in fed_starts for node in calls[name]]
    kept = downstream_nodes(roots)
    graph = gm.graph
    last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1]
    fed: dict[str, fx.Node] = {}
    for name, nodes in calls.items():  # in graph order: placeholders come out in execution order
        if name not in fed_starts and all(node in kept for node in nodes):
            continue
        with graph.inserting_after(last_placeholder):
            value = graph.placeholder("resume_" + name.replace(".", "_"))
        last_placeholder = value
        fed[name] = value
        for node in nodes:
            if name in fed_starts:
                node.args = (value,)  # the start's hooks still fire, on the fed value
            elif node not in kept:
                node.replace_all_uses_with(value)
    graph.eliminate_dead_code()
    for name, value in list(fed.items()):
        if not value.users:
            graph.erase_node(value)
            del fed[name]
    gm.meta[RESUME_INPUTS] = tuple(fed)
    return finish(gm)
