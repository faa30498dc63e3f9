"""Pass: split a forward graph into regions (the embedding side, each block, the final side) so that
every block is compiled once, however many layers the model has.

A flat graph has every layer inlined: torch.compile traces, lowers and schedules each layer anew, so
compile time grows with depth although the layers are the same code. Split into one submodule per
block, with every tensor the graph reads (parameters, buffers, constants) lifted to an input, the
blocks of a model become the same graph, with different tensors passed in: `region_signature` says
which submodules are the same, and the runtime (runtime/regional.py) compiles each signature once.

Regions, in graph order (the order the HF code ran):
- a node names its region when it can: its hook point's name, or its HF module path (block L, or the
  final norm and unembedding); model-level code (masks, positions, rotary tables) belongs to the
  region the graph is in when it runs, the embedding side before the first block;
- a node that names nothing (what the passes inserted: lowered attention, per-head splits) belongs to
  the region of the node before it;
- no node is placed in a region before one of its inputs' regions, so regions only feed later ones;
- a live hook point is a region of its own (its hooks run as Python between compiled regions, as
  they do under torch.compile of the whole graph), and splits its block there: a block hooked at a
  point becomes two compiled regions, and every other block keeps the one they share.
"""
from __future__ import annotations

import hashlib
from typing import Any

from torch import fx
from torch.fx.node import _get_qualified_name
from torch.fx.passes.split_module import split_module

from fxhook.adapter import Adapter
from fxhook.core.hook_point import HookPoint
from fxhook.passes.placement import _explicit_region, _Regions

LIFTED = "region_tensors"  # split gm.meta key: the paths of the tensors passed after the graph's own inputs
HOOK_REGIONS = "hook_regions"  # split gm.meta key: the submodules that call hook points (run eagerly)
LIFTED_PREFIX = "lifted_"  # the name of every lifted tensor's placeholder, in the split graph and its regions


def lift_tensors(gm: fx.GraphModule) -> tuple[fx.GraphModule, tuple[str, ...]]:
    """GraphModule reading tensors with get_attr -> the same graph taking them as inputs after its own
    (in the order of the returned paths). The original is not changed; submodules (hook points) are shared."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.node_copy(node, env.__getitem__)
    paths: list[str] = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            env[node] = graph.placeholder(f"{LIFTED_PREFIX}{len(paths)}")
            env[node].meta = dict(node.meta)
            paths.append(str(node.target))
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "get_attr"):
            env[node] = graph.node_copy(node, env.__getitem__)
    return fx.GraphModule(gm, graph), tuple(paths)


def _is_hook_call(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), HookPoint)


def region_keys(gm: fx.GraphModule, adapter: Adapter, n_layers: int) -> dict[fx.Node, tuple[int, int]]:
    """(region, segment) of every computing node (see the module docstring): region -1 is the embedding
    side, L block L, n_layers the final side; segment 2k is the code after the k-th hook point of the
    region, 2k+1 that hook point's call. Keys never decrease along an edge, so split partitions form a DAG."""
    regions = _Regions(adapter, n_layers)
    keys: dict[fx.Node, tuple[int, int]] = {}
    hooks_seen: dict[int, int] = {}
    cursor = -1
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        own = _explicit_region(node, regions)
        inputs = [keys[i] for i in node.all_input_nodes if i in keys]
        region = max([cursor if own is None else own, *(k[0] for k in inputs)])
        cursor = max(cursor, region)
        seen = hooks_seen.get(region, 0)
        if _is_hook_call(gm, node):
            keys[node] = (region, 2 * seen + 1)
            hooks_seen[region] = seen + 1
            continue
        key = max([(region, 2 * seen), *inputs])
        keys[node] = (key[0], key[1] + 1) if key[1] % 2 else key  # never inside a hook point's region
    return keys


def split_regions(gm: fx.GraphModule, adapter: Adapter, n_layers: int) -> fx.GraphModule:
    """Pass: a hooked forward graph (hook points inserted; any flags, slicing, exposed outputs) -> a
    GraphModule taking (*the graph's inputs, *lifted tensors) whose graph calls one submodule per region
    (`region_keys`), with the same outputs. gm.meta[LIFTED] lists the lifted tensors' paths in `gm`;
    gm.meta[HOOK_REGIONS] the submodules that call hook points; the rest read no attribute of their own."""
    lifted, paths = lift_tensors(gm)
    keys = region_keys(lifted, adapter, n_layers)
    order = {key: i for i, key in enumerate(sorted(set(keys.values())))}
    split = split_module(lifted, lifted, lambda node: order[keys[node]])
    placeholders = [n.target for n in split.graph.nodes if n.op == "placeholder"]
    expected = [n.target for n in lifted.graph.nodes if n.op == "placeholder"]
    if placeholders != expected:  # split_module keeps the inputs in order; the runtime passes them so
        raise AssertionError(f"split_regions reordered the graph's inputs: {placeholders[:4]} ...")
    split.meta = dict(gm.meta)
    split.meta[LIFTED] = paths
    split.meta[HOOK_REGIONS] = frozenset(
        name for name, sub in split.named_children()
        if any(isinstance(m, HookPoint) for m in sub.modules()))
    return split


def _target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    try:
        return _get_qualified_name(target)
    except (RuntimeError, AttributeError, TypeError):
        return repr(target)


def region_signature(region: fx.GraphModule) -> str:
    """A hash of what `region` computes: its op sequence, targets and constant arguments, with nodes named
    by position (so block 3's region and block 7's have the same signature when they run the same code
    on different inputs). Input shapes and dtypes are not part of it: the compiled code checks those."""
    index: dict[fx.Node, int] = {}
    lines = []
    for i, node in enumerate(region.graph.nodes):
        index[node] = i
        args = fx.node.map_arg((node.args, node.kwargs), lambda n: f"%{index[n]}")
        target = "" if node.op == "placeholder" else _target_name(node.target)
        lines.append(repr((node.op, target, args)))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def regions_of(split: fx.GraphModule) -> list[tuple[str, fx.GraphModule]]:
    """The compiled regions of a split graph (its submodules that call no hook point), in call order."""
    hooked = split.meta.get(HOOK_REGIONS, frozenset())
    return [(name, sub) for name, sub in split.named_children()
            if name not in hooked and isinstance(sub, fx.GraphModule)]
