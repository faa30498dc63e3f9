"""Pass: drop the arithmetic that weight processing made neutral (canonicalisation in the graph).

After `fold_ln` every folded norm (ln1, ln2, ln_final) multiplies by a weight of ones and adds a bias of
zeros (Gemma's (1 + w) norm adds a weight of zeros, then multiplies): the weights moved into the
projections, but the graph still runs their multiply and add on every activation. This pass removes
such a `mul` / `add` / `sub` when its parameter operand (or a constant computed from parameters only:
`(1.0 + w.float()).to(dtype)`) is exactly the identity element, and the op neither broadcasts nor
changes the dtype of its other operand. `x * 1`, `x + 0` and `x - 0` return x bit for bit, so every
activation and every hook keeps its value exactly (TransformerLens's LNPre has no weight either).

Which parameters: only those named in `candidates`, the norm weights and biases that fold_ln set to the
neutral value (`folded_norm_params`). Parameters a user may still train (an unprocessed model's norms,
b_V, which TransformerLens keeps) keep their ops and so their gradients.

Safety: a user may edit a removed parameter later (`model.blocks[0].ln1.w.data += 1`, which bumps no
version counter, or a new state dict). The pass records a `NeutralGuard` in `gm.meta["neutral_guard"]`:
the parameters it assumed neutral and their values. `GraphStore` checks it whenever it hands out the
graph (one concatenation and one comparison, ~0.1 ms for 60 norms) and rebuilds a graph whose
assumption broke; the rebuilt graph keeps the op of every parameter that is no longer neutral.

Not removed: the centring `x - x.mean(-1)` of a LayerNorm whose input center_writing_weights made
mean-zero. (1) A hook may write anything into the residual stream (a steering vector, an activation
patched from another model); TransformerLens's LNPre still centres it, so the centring is part of the
hooks' contract, not a no-op. (2) Even unhooked, the residual's mean is zero only up to rounding
(a sum of d_model products per layer), so hook_scale and hook_normalized would move by rounding: not
exact, whereas this pass changes no value at all.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx

from fxhook.adapter import Adapter
from fxhook.config import HookedTransformerConfig
from fxhook.core.graph import finish
from fxhook.passes.graph_params import HF_ROOT

aten = torch.ops.aten
GUARD_KEY = "neutral_guard"
# ops that map constants to constants; a chain of them over candidate parameters is evaluated at build time
_CONSTANT_OPS = frozenset({aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default,
                           aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.rsub.Scalar,
                           aten.mul.Tensor, aten.mul.Scalar})
_IDENTITY = {aten.mul.Tensor: 1.0, aten.add.Tensor: 0.0, aten.sub.Tensor: 0.0}  # op -> its identity element
_COMMUTES = (aten.mul.Tensor, aten.add.Tensor)  # the identity may be either operand


@dataclass(frozen=True, eq=False)
class NeutralGuard:
    """The parameters a graph assumed neutral and the values it assumed: per device, the parameters (1-D,
    the Parameter objects themselves, so `.data` edits and replaced data are seen) and their values then,
    concatenated."""

    targets: tuple[str, ...]
    groups: tuple[tuple[torch.Tensor, ...], ...]  # the parameters, one group per device
    expected: tuple[torch.Tensor, ...]  # [sum of the group's numels] per group

    @classmethod
    def of(cls, assumed: dict[str, torch.Tensor]) -> "NeutralGuard":
        targets = tuple(sorted(assumed))
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for target in targets:
            by_device.setdefault(assumed[target].device, []).append(assumed[target])
        groups = tuple(tuple(group) for group in by_device.values())
        with torch.no_grad():
            expected = tuple(torch.cat(group).clone() for group in groups)
        return cls(targets, groups, expected)

    def holds(self) -> bool:
        """Whether every parameter still has the value the graph assumed: one concatenation and one
        comparison per device (a parameter moved to another device or dtype does not hold)."""
        try:
            with torch.no_grad():
                return all(torch.equal(torch.cat(group), expected)
                           for group, expected in zip(self.groups, self.expected))
        except RuntimeError:  # tensors of one group on different devices now
            return False


def folded_norm_params(adapter: Adapter, cfg: HookedTransformerConfig) -> frozenset[str]:
    """The get_attr targets of the norm weights and biases that fold_ln made neutral (ln1, ln2 of every
    block and the final norm); empty when the model's norms were not folded."""
    if not cfg.layer_norm_folding or adapter.norms.post_norm:
        return frozenset()
    paths = [f"{HF_ROOT}.{adapter.final_norm}"]
    for layer in range(cfg.n_layers):
        for norm in (adapter.norms.ln1, adapter.norms.ln2):
            if norm is not None:
                paths.append(f"{HF_ROOT}.{adapter.blocks}.{layer}.{norm}")
    return frozenset(f"{path}.{leaf}" for path in paths for leaf in ("weight", "bias"))


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    """The tensor a get_attr target (a dotted module path) names, or None."""
    try:
        return operator.attrgetter(target)(gm)
    except AttributeError:
        return None


def _constant(node: Any, gm: fx.GraphModule, candidates: frozenset[str], leaves: dict[str, torch.Tensor],
              memo: dict[fx.Node, tuple[Any, dict[str, torch.Tensor]]]) -> Any:
    """The value of `node` when it is computed from candidate parameters and literals only, else None.
    Literals (non-nodes) are returned as they are; `leaves` collects the parameters read."""
    if not isinstance(node, fx.Node):
        return node
    if node in memo:  # a node read twice (a shared norm's weight): its value and the parameters it read
        value, read = memo[node]
        leaves.update(read)
        return value
    value, read = None, {}
    if node.op == "get_attr" and node.target in candidates:
        tensor = _fetch(gm, node.target)
        if isinstance(tensor, torch.Tensor) and tensor.dim() == 1:  # norm weights and biases (the guard's form)
            read[node.target] = tensor
            value = tensor.detach()
    elif node.op == "call_function" and node.target in _CONSTANT_OPS:
        args = [_constant(a, gm, candidates, read, memo) for a in node.args]
        kwargs = {k: _constant(v, gm, candidates, read, memo) for k, v in node.kwargs.items()}
        if all(a is not None for a in (*args, *kwargs.values())):
            with torch.no_grad():
                value = node.target(*args, **kwargs)
    memo[node] = (value, read)
    leaves.update(read)
    return value


def _same_layout(a: Any, b: Any) -> bool:
    """Two fake tensors (node.meta['val']) of the same dtype, device and shape (symbolic sizes by name)."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return False
    if a.dtype != b.dtype or a.device != b.device or a.dim() != b.dim():
        return False
    return all(str(x) == str(y) for x, y in zip(a.shape, b.shape))


def _kept_operand(node: fx.Node, gm: fx.GraphModule, candidates: frozenset[str], memo: dict,
                  assumed: dict[str, torch.Tensor]) -> fx.Node | None:
    """The operand `node` returns unchanged (the other one being the identity element), else None."""
    if node.op != "call_function" or node.target not in _IDENTITY or len(node.args) != 2:
        return None
    if node.kwargs.get("alpha", 1) != 1:
        return None
    orders = [(0, 1), (1, 0)] if node.target in _COMMUTES else [(0, 1)]
    for keep, drop in orders:
        kept, dropped = node.args[keep], node.args[drop]
        if not isinstance(kept, fx.Node) or not isinstance(dropped, fx.Node):
            continue
        leaves: dict[str, torch.Tensor] = {}
        value = _constant(dropped, gm, candidates, leaves, memo)
        if not isinstance(value, torch.Tensor) or not leaves:
            continue
        if not _same_layout(kept.meta.get("val"), node.meta.get("val")):
            continue  # the op broadcasts or promotes its input: removing it would change the result's form
        if bool((value == _IDENTITY[node.target]).all()):
            assumed.update(leaves)
            return kept
    return None


def remove_neutral_ops(gm: fx.GraphModule, candidates: frozenset[str]) -> fx.GraphModule:
    """Form taken: any graph (parameters read by get_attr). Form given: the same graph without the mul / add /
    sub whose other operand is a candidate parameter (or a constant of candidates) equal to the op's identity,
    and a `NeutralGuard` over the parameters assumed in `gm.meta["neutral_guard"]` (absent if none)."""
    if not candidates:
        return gm
    memo: dict[fx.Node, tuple[Any, dict[str, torch.Tensor]]] = {}
    assumed: dict[str, torch.Tensor] = {}
    for node in list(gm.graph.nodes):
        kept = _kept_operand(node, gm, candidates, memo, assumed)
        if kept is not None:
            node.replace_all_uses_with(kept)
            gm.graph.erase_node(node)
    if assumed:
        previous = gm.meta.get(GUARD_KEY)
        if previous is not None:  # a second run keeps the first run's assumptions too
            assumed = {**{t: _fetch(gm, t) for t in previous.targets}, **assumed}
        gm.meta = {**gm.meta, GUARD_KEY: NeutralGuard.of(assumed)}
    return finish(gm)


def neutral_guard(gm: fx.GraphModule) -> NeutralGuard | None:
    """The assumption `remove_neutral_ops` recorded in `gm`, if it removed anything."""
    return gm.meta.get(GUARD_KEY)


def no_neutral_op_left(candidates: frozenset[str]) -> Callable[[fx.GraphModule], str | None]:
    """The pass's guarantee, as a check for its `Pass` contract: no op of `gm` that the pass would remove is
    left (none applies a candidate parameter equal to its identity element)."""
    def check(gm: fx.GraphModule) -> str | None:
        memo: dict = {}
        left = [n.name for n in gm.graph.nodes if _kept_operand(n, gm, candidates, memo, {}) is not None]
        return f"{left[:3]} still apply a neutral parameter" if left else None
    return check
