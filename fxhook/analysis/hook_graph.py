"""The hook dependency graph: which hook point's value is computed directly from which, read from fx.

    graph = model.hook_graph()                       # networkx.DiGraph over hook names
    graph.edges["blocks.0.attn.hook_rot_k", "blocks.0.attn.hook_attn_scores"]["path"]   # "k"
    downstream(graph, "blocks.3.attn.hook_z")        # what a patch there can change
    resume_inputs(graph, "blocks.3.attn.hook_z")     # what must be supplied to recompute all of that

An edge A -> B means B's value is computed from A's with no other hook point in between (edges
through a tensor's shape or dtype alone carry no value and are left out). Each edge has a `path`:
"residual" (the stream and what is added to it), "q" / "k" / "v" (inside attention, along the query,
key or value branch), "attention" (scores, pattern, head outputs), "mlp", or "unembed" (the final norm).
"""
from __future__ import annotations

import operator
from pathlib import Path
from typing import TYPE_CHECKING

import networkx as nx
import torch
from torch import fx

from fxhook.core import hook_names
from fxhook.core.graph import hook_point_nodes

if TYPE_CHECKING:
    from fxhook.model import HookedTransformer

_BRANCH_KEYS = {  # hook keys on the query / key / value branch of attention, before the branches meet
    "q": ("hook_q_input", "attn.hook_q", "attn.hook_rot_q", "attn.q_norm.hook_scale", "attn.q_norm.hook_normalized"),
    "k": ("hook_k_input", "attn.hook_k", "attn.hook_rot_k", "attn.k_norm.hook_scale", "attn.k_norm.hook_normalized"),
    "v": ("hook_v_input", "attn.hook_v"),
}
_BRANCH_OF = {key: branch for branch, keys in _BRANCH_KEYS.items() for key in keys}
_ATTENTION_KEYS = ("ln1.hook_scale", "ln1.hook_normalized", "hook_attn_in", "attn.hook_attn_scores",
                   "attn.hook_pattern", "attn.hook_z", "attn.hook_result", "ln1_post.hook_scale",
                   "ln1_post.hook_normalized", "hook_attn_out")
_RESIDUAL_KEYS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")
_METADATA_OPS = (getattr, torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default,
                 torch.ops.aten.sym_stride.int, operator.getitem)


def _carries_value(node: fx.Node) -> bool:
    """False for a read of a tensor's shape, size or dtype: an edge through it carries no activation."""
    if node.op == "call_method" and node.target in ("size", "dim"):
        return False
    if node.op != "call_function" or node.target not in _METADATA_OPS:
        return True
    if node.target is operator.getitem:  # indexing a tuple of sizes is metadata, of tensors is not
        return not isinstance(node.meta.get("val"), (int, torch.SymInt))
    return False


def _path_kind(source: str, target: str) -> str:
    """The path label of the edge source -> target (module doc)."""
    key, source_key = hook_names.key_of(target), hook_names.key_of(source)
    if key in _BRANCH_OF:
        return _BRANCH_OF[key]
    if key == "attn.hook_attn_scores" and source_key in _BRANCH_OF:
        return _BRANCH_OF[source_key]
    if key == "attn.hook_z" and _BRANCH_OF.get(source_key) == "v":
        return "v"
    if key in _ATTENTION_KEYS:
        return "attention"
    if key in _RESIDUAL_KEYS or hook_names.layer_of(target) is None and key.startswith("hook_"):
        return "residual"
    if key.startswith("ln_final."):
        return "unembed"
    return "mlp"


def hook_graph_of(gm: fx.GraphModule) -> nx.DiGraph:
    """The direct data dependencies between the hook points of a hooked GraphModule.

    Takes any graph with HookPoint calls (normally the full forward graph); gives a DiGraph whose nodes
    are hook names (attributes: layer, role, axes) and whose edges carry `path` (module doc).
    """
    points = set(hook_point_nodes(gm))
    nearest: dict[fx.Node, frozenset[str]] = {}  # node -> the hook points it is computed from directly
    graph = nx.DiGraph()
    for node in gm.graph.nodes:  # topological order
        sources: set[str] = set()
        for arg in node.all_input_nodes:
            if not _carries_value(arg):
                continue
            if arg.op == "call_module" and arg.target in points:
                sources.add(arg.target)
            else:
                sources.update(nearest.get(arg, ()))
        if node.op == "call_module" and node.target in points:
            name = node.target
            if name not in graph:
                kind = hook_names.kind_of(name)
                graph.add_node(name, layer=hook_names.layer_of(name), role=kind.role if kind else None,
                               axes=kind.axes if kind else "")
            for source in sources - {name}:
                graph.add_edge(source, name, path=_path_kind(source, name))
        nearest[node] = frozenset(sources)
    return graph


def hook_graph(model: HookedTransformer) -> nx.DiGraph:
    """`model.hook_graph()`: the dependency graph of the model's hook points under its current flags (an edge
    A -> B when B is computed from A with no hook point between, labelled `path`: module doc)."""
    return hook_graph_of(model.graph_module)


def _known(graph: nx.DiGraph, hook_name: str) -> None:
    if hook_name not in graph:
        raise KeyError(f"{hook_name!r} is not a hook point of this graph (it has {graph.number_of_nodes()}, "
                       f"e.g. {sorted(graph)[:3]}); check the name and the flags that gate it")


def downstream(graph: nx.DiGraph, hook_name: str) -> set[str]:
    """The hook points whose values a change at `hook_name` can reach (itself excluded)."""
    _known(graph, hook_name)
    return set(nx.descendants(graph, hook_name))


def resume_inputs(graph: nx.DiGraph, hook_name: str) -> set[str]:
    """The hook points whose values must be supplied to recompute everything after `hook_name`: the
    point itself and every point outside its downstream that feeds a point inside it (a cut)."""
    _known(graph, hook_name)
    below = downstream(graph, hook_name)
    return {hook_name} | {source for target in below for source in graph.predecessors(target)
                          if source not in below and source != hook_name}


_COLOURS = {"residual": "#444444", "q": "#1f77b4", "k": "#2ca02c", "v": "#9467bd", "attention": "#ff7f0e",
            "mlp": "#d62728", "unembed": "#8c564b"}


def _layout(graph: nx.DiGraph) -> dict[str, tuple[float, float]]:
    """Embeddings at the bottom, one row per block above them, the final norm on top; a row's points
    left to right in computation order."""
    order = {name: i for i, name in enumerate(nx.topological_sort(graph))}
    top = 1 + max((layer for _, layer in graph.nodes(data="layer") if layer is not None), default=-1)
    rows: dict[int, list[str]] = {}
    for name, layer in graph.nodes(data="layer"):
        row = layer if layer is not None else (-1 if graph.nodes[name]["role"] == "embedding" else top)
        rows.setdefault(row, []).append(name)
    return {name: (float(i), float(row)) for row, names in rows.items()
            for i, name in enumerate(sorted(names, key=order.__getitem__))}


def draw_hook_graph(graph: nx.DiGraph, path: str | Path | None = None, title: str = "hook dependency graph"):
    """A picture of the graph (small models: each block is a row), edges coloured by path kind; saved as
    PNG to `path` when given. Needs matplotlib (the `analysis` extra). Returns the matplotlib Figure."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("drawing the hook graph needs matplotlib: pip install 'fxhook[analysis]'") from error
    pos = _layout(graph)
    width = max(x for x, _ in pos.values()) + 1
    height = len({y for _, y in pos.values()})
    fig, ax = plt.subplots(figsize=(max(8.0, 1.1 * width), max(3.0, 1.6 * height)))
    kinds = sorted({data["path"] for _, _, data in graph.edges(data=True)})
    for kind in kinds:
        edges = [(a, b) for a, b, data in graph.edges(data=True) if data["path"] == kind]
        nx.draw_networkx_edges(graph, pos, edgelist=edges, edge_color=_COLOURS.get(kind, "black"), ax=ax,
                               arrows=True, arrowsize=8, width=1.0, connectionstyle="arc3,rad=0.15")
    nx.draw_networkx_nodes(graph, pos, node_size=60, node_color="#dddddd", edgecolors="black", ax=ax)
    labels = {name: hook_names.key_of(name).replace("hook_", "") for name in graph}
    nx.draw_networkx_labels(graph, pos, labels, font_size=6, ax=ax, verticalalignment="bottom")
    ax.set_yticks(sorted({y for _, y in pos.values()}))
    ax.set_title(title)
    from matplotlib.lines import Line2D

    ax.legend([Line2D([], [], color=_COLOURS.get(kind, "black")) for kind in kinds], kinds, loc="upper left",
              fontsize=7, title="path")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
