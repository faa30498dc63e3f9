"""Attribution patching: every activation patch estimated at once, to first order.

    scores = attribution_patch(model, clean, corrupted, metric, hooks=["z", "resid_pre"], per="head")

Patching index i of activation A moves the metric by about (clean_A - corrupted_A)[i] . d metric / d A[i],
the gradient taken on the corrupted run. One clean forward, one corrupted forward and one backward pass give
the estimate for every hook, layer, position and head together (Nanda's attribution patching). The results
have the shapes of the actual sweeps in patching.py (TransformerLens's), summed over the batch as a patch
applies to every batch item:

| hooks | per="layer" | per="pos" | per="head" | per="neuron" | per="dest_src_pos" |
|---|---|---|---|---|---|
| resid_pre, resid_mid, resid_post, attn_out, mlp_out | [layer] | [layer, pos] | | | |
| z, q, k, v (k and v: kv heads), result | [layer] | [layer, pos, head] | [layer, head] | | |
| pattern, attn_scores | [layer] | [layer, head, dest_pos] | [layer, head] | | [layer, head, dest_pos, src_pos] |
| pre, post, pre_linear (MLP neurons) | [layer] | [layer, pos, d_mlp] | | [layer, d_mlp] | |
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Literal, Sequence

import einops
import torch

from fxhook.core import hook_names

if TYPE_CHECKING:
    from fxhook.model import HookedTransformer

Per = Literal["layer", "pos", "head", "neuron", "dest_src_pos"]
# per role: what each `per` keeps of the activation's axes (schema names; "head" matches kv_head too)
_KEPT: dict[str, dict[str, tuple[str, ...]]] = {
    "residual": {"layer": (), "pos": ("pos",)},
    "head": {"layer": (), "pos": ("pos", "head"), "head": ("head",)},
    "pattern": {"layer": (), "pos": ("head", "query_pos"), "head": ("head",),
                "dest_src_pos": ("head", "query_pos", "key_pos")},
    "neuron": {"layer": (), "pos": ("pos", "d_mlp"), "neuron": ("d_mlp",)},
}


def _block_kind(short: str) -> tuple[str, hook_names.HookKind]:
    """(short name, schema row) of a per-block activation `attribution_patch` can score."""
    if not isinstance(short, str) or "." in short or short.startswith("hook_"):
        raise ValueError(f"hooks are TransformerLens short names such as 'z' or 'resid_pre' (every layer is "
                         f"scored), got {short!r}")
    name = hook_names.get_act_name(short, 0)
    kind = hook_names.kind_of(name)
    if kind is None or kind.role not in _KEPT or kind.scope != "block":
        scorable = sorted(k.short for k in hook_names.KINDS if k.short and k.role in _KEPT and k.scope == "block")
        raise ValueError(f"attribution_patch scores per-block activations {scorable}, not {short!r}")
    return short, kind


def _reduction(kind: hook_names.HookKind, per: str) -> str:
    """The einops pattern summing [layer, batch, *axes] down to what `per` keeps."""
    options = _KEPT[kind.role]
    if per not in options:
        raise ValueError(f"per={per!r} does not apply to {kind.key} (a {kind.role} activation): use one of "
                         f"{sorted(options)}")
    axes = [("head" if axis == "kv_head" else axis) for axis in kind.axes.split()]
    return f"layer {' '.join(axes)} -> layer {' '.join(options[per])}"


def attribution_patch(model: HookedTransformer, clean_tokens: torch.Tensor | str,
                      corrupted_tokens: torch.Tensor | str, metric: Callable[[torch.Tensor], torch.Tensor],
                      hooks: str | Sequence[str] = ("resid_pre",), per: Per = "pos"
                      ) -> torch.Tensor | dict[str, torch.Tensor]:
    """First-order estimate of every activation patch of `hooks` (short names, module table), shaped by `per`.

    metric(logits [batch, pos, d_vocab]) must return a scalar tensor (differentiable). Returns one tensor
    for a single short name, else {short name: tensor}. The model's parameters get no .grad.
    """
    shorts = [hooks] if isinstance(hooks, str) else list(hooks)
    if not shorts:
        raise ValueError("attribution_patch needs at least one hook short name, e.g. hooks=['z']")
    kinds = dict(_block_kind(short) for short in shorts)
    patterns = {short: _reduction(kind, per) for short, kind in kinds.items()}
    layers = range(model.cfg.n_layers)
    names = {hook_names.get_act_name(short, layer): short for short in shorts for layer in layers}
    clean_tokens = model.to_tokens(clean_tokens) if isinstance(clean_tokens, str) else clean_tokens
    corrupted_tokens = model.to_tokens(corrupted_tokens) if isinstance(corrupted_tokens, str) else corrupted_tokens
    if clean_tokens.shape != corrupted_tokens.shape:
        raise ValueError(f"clean and corrupted inputs must have the same shape, got {tuple(clean_tokens.shape)} "
                         f"and {tuple(corrupted_tokens.shape)}")
    with torch.no_grad(), model.graphs.eager():
        _, clean = model.run_with_cache(clean_tokens, names_filter=list(names))
    corrupted: dict[str, torch.Tensor] = {}

    def keep(activation: torch.Tensor, hook) -> None:
        corrupted[hook.name] = activation

    with torch.enable_grad(), model.graphs.eager(), model.hooks([(list(names), keep)]):
        value = metric(model(corrupted_tokens))
        if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.requires_grad:
            raise ValueError("metric must return a scalar tensor computed from the logits (differentiably), "
                             f"got {value!r}")
        grads = torch.autograd.grad(value.reshape(()), [corrupted[name] for name in names], allow_unused=True)
    results: dict[str, list[torch.Tensor]] = {short: [] for short in shorts}
    for (name, short), grad in zip(names.items(), grads):
        act = corrupted[name].detach()
        grad = torch.zeros_like(act) if grad is None else grad
        results[short].append((clean[name] - act) * grad)
    out = {short: einops.reduce(torch.stack(parts), patterns[short], "sum") for short, parts in results.items()}
    return out[hooks] if isinstance(hooks, str) else out
