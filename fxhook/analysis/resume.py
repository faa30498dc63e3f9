"""Resume the forward from any hook point with cached activations (`model.run_from`).

    _, cache = model.run_with_cache(tokens, names_filter=resume_inputs(model.hook_graph(), name))
    logits = model.run_from(name, cache, tokens=tokens)      # == model(tokens), computing only after `name`

The graph that runs is built by the `resume_from` pass (fxhook/passes/resume_from.py): only what
depends on the start is computed; the other activations it reads come from `activations`. Patching
sweeps use it to pay, per patch, only for the part of the model after the patched hook.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

import torch

from fxhook.analysis.cache import ActivationCache
from fxhook.core import hook_names
from fxhook.passes.resume_from import RESUME_INPUTS
from fxhook.pipeline import ACTIVATION_NAMES, GraphSpec

if TYPE_CHECKING:
    from fxhook.model import HookedTransformer
    from fxhook.runtime.hooks import HookSpec, NameOrFilter


def resume_spec(model: HookedTransformer, starts: frozenset[str], keep: frozenset[str] = frozenset(),
                **flags: bool) -> GraphSpec:
    """The spec of the graph resuming from `starts` under the model's flags (or `flags` overriding them,
    e.g. use_split_qkv_input=True for path patching), keeping the live hooks and returning `keep`."""
    spec = GraphSpec.from_cfg(model.cfg, live_hooks=model.live_hooks(), outputs=keep)
    return dataclasses.replace(spec, resume_from=starts, **flags)


def required_inputs(model: HookedTransformer, starts: frozenset[str],
                    live_hooks: frozenset[str] | None | Literal["now"] = "now", **flags: bool) -> tuple[str, ...]:
    """The activations a run resuming from `starts` reads, in the order the graph takes them.

    They depend on which hooks are live (a layer whose pattern nobody reads runs fused attention and reads
    q, k and v instead of the pattern): by default those live now plus the starts, as a sweep that hooks
    its starts runs; live_hooks=None: every hook point and attention materialised everywhere, as the hook
    graph sees the model."""
    live = model.live_hooks() | starts if live_hooks == "now" else live_hooks
    spec = dataclasses.replace(GraphSpec.from_cfg(model.cfg, live_hooks=live), resume_from=starts, **flags)
    return model.graphs.forward(spec).gm.meta[RESUME_INPUTS]


def _batch_and_length(name: str, value: Any) -> tuple[int, int]:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"activations[{name!r}] must be a tensor, got {type(value).__name__}")
    axis = hook_names.position_axis(name)
    axes = hook_names.describe(name)[0].split()
    if axis is None or ("..." not in axes and value.dim() != len(axes)) or value.dim() <= axis:
        raise ValueError(f"activations[{name!r}] has shape {tuple(value.shape)} but must be [{', '.join(axes)}], "
                         f"batch axis included (a cache made with remove_batch_dim=True does not have it)")
    return value.shape[0], value.shape[axis]


def run_resumed(model: HookedTransformer, starts: frozenset[str], activations: Mapping[str, torch.Tensor],
                tokens: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                keep: frozenset[str] = frozenset(), **flags: bool
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """(logits, kept activations, attention mask used) of the forward resumed from `starts`.

    `activations` must hold every name `required_inputs` lists, all for the same [batch, pos];
    `attention_mask` [batch, pos] is the one of the run they came from (default: no padding).
    """
    entry = model.graphs.forward(resume_spec(model, starts, keep, **flags))
    needed = entry.gm.meta[RESUME_INPUTS]
    missing = [name for name in needed if name not in activations]
    if missing:
        raise KeyError(f"resuming from {sorted(starts)} needs the activations {list(needed)}; missing {missing}. "
                       f"Cache them with model.run_with_cache(tokens, names_filter={list(needed)!r})")
    values = [activations[name] for name in needed]
    shapes = {_batch_and_length(name, value) for name, value in zip(needed, values)}
    if len(shapes) != 1:
        raise ValueError(f"the activations {list(needed)} disagree on [batch, pos]: {sorted(shapes)}; they must "
                         "come from one run")
    ((batch, length),) = shapes
    device = values[0].device
    for name, given in (("tokens", tokens), ("attention_mask", attention_mask)):
        if given is not None and (not isinstance(given, torch.Tensor) or tuple(given.shape) != (batch, length)):
            shape = tuple(given.shape) if isinstance(given, torch.Tensor) else type(given).__name__
            raise ValueError(f"{name} must be a [batch, pos] = [{batch}, {length}] tensor, as the activations, "
                             f"got {shape}")
    tokens = torch.zeros(batch, length, dtype=torch.long, device=device) if tokens is None else tokens
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, dtype=torch.long, device=device)
    out = model.graphs.run(entry, tokens, attention_mask, *values)
    kept: dict[str, torch.Tensor] = {}
    if keep:
        out, exposed = out
        kept = dict(zip(entry.gm.meta[ACTIVATION_NAMES], exposed))
    return out, kept, attention_mask


def run_with_flags(model: HookedTransformer, tokens: torch.Tensor, attention_mask: torch.Tensor,
                   keep: frozenset[str], **flags: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(logits, kept activations) of a whole forward under the model's flags, or `flags` overriding them for
    this call only (the model's config is not touched: other calls keep seeing its own flags)."""
    spec = dataclasses.replace(GraphSpec.from_cfg(model.cfg, live_hooks=model.live_hooks(), outputs=keep), **flags)
    entry = model.graphs.forward(spec)
    out = model.graphs.run(entry, tokens, attention_mask)
    if not keep:
        return out, {}
    out, exposed = out
    return out, dict(zip(entry.gm.meta[ACTIVATION_NAMES], exposed))


def run_from(model: HookedTransformer, hook_name: str | Sequence[str], activations: Mapping[str, torch.Tensor],
             *, tokens: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
             return_type: str | None = "logits", loss_per_token: bool = False,
             fwd_hooks: Sequence[HookSpec] = (), names_filter: NameOrFilter | None = None):
    """The forward resumed at `hook_name` (or several names), as `forward` would finish it.

    The value at `hook_name` is read from `activations` (an ActivationCache or a dict), passed through that
    hook point (its hooks, and `fwd_hooks`, fire on it), and only what depends on it is computed; every other
    value needed is read from `activations` too (which: `resume_inputs(model.hook_graph(), hook_name)`).
    Hooks on points upstream of `hook_name` do not run: their values are the given ones. `tokens` are
    needed for a loss; `attention_mask` must be the one of the run the activations came from when it had
    padding. With `names_filter`, returns (output, ActivationCache of the selected points that were
    recomputed).
    """
    starts = frozenset([hook_name] if isinstance(hook_name, str) else hook_name)
    if not starts:
        raise ValueError("run_from needs at least one hook name to resume from")
    model.hook_registry.select(sorted(starts))  # unknown names fail here, with suggestions
    if return_type in ("loss", "both") and tokens is None:
        raise ValueError(f"return_type={return_type!r} needs the input tokens: pass tokens=")
    keep = frozenset()
    if names_filter is not None:
        selected = model._cache_selection(names_filter)
        keep = frozenset(name for name in model.hook_dict if selected(name))
    with model.hooks(fwd_hooks):
        logits, kept, mask = run_resumed(model, starts, activations, tokens, attention_mask, keep)
    out = model._shaped_output(logits, tokens, mask, return_type, loss_per_token)
    if names_filter is None:
        return out
    return out, ActivationCache({name: value.detach() for name, value in kept.items()}, model)
