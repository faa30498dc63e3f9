"""Pass: turn `fxhook::hook` markers into calls of named HookPoint modules."""
from __future__ import annotations

from typing import Callable

from torch import fx

from fxhook.core.hook_names import is_residual_site
from fxhook.core.graph import finish, hook_markers
from fxhook.core.hook_point import HookPoint


def _hoist(node: fx.Node) -> None:
    source = node.args[0]
    source.append(node)  # move the marker right after its input
    source.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)


def insert_hook_points(gm: fx.GraphModule, make_point: Callable[[str], HookPoint] = HookPoint
                       ) -> fx.GraphModule:
    for marker in hook_markers(gm.graph):
        x, name = marker.args
        if is_residual_site(name):  # every use of the marked value reads the hooked one (resid_mid reaches
            _hoist(marker)          # both the MLP and the residual add)
        if not _has_submodule(gm, name):
            gm.add_submodule(name, make_point(name))
        with gm.graph.inserting_after(marker):
            call = gm.graph.call_module(name, (marker.args[0],))
        call.meta = dict(marker.meta)
        marker.replace_all_uses_with(call)
        gm.graph.erase_node(marker)
    return finish(gm)


def prune_hook_points(gm: fx.GraphModule, keep: frozenset[str]) -> fx.GraphModule:
    """Drop the calls of hook points not in `keep`: a hook nobody uses costs nothing."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target not in keep and \
                isinstance(gm.get_submodule(node.target), HookPoint):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    return finish(gm)


def _has_submodule(gm: fx.GraphModule, name: str) -> bool:
    try:
        gm.get_submodule(name)
        return True
    except AttributeError:
        return False
