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
from fxhook.core.kv_ops import positions_from_mask
from fxhook.passes.resume_from import RESUME_INPUTS
from fxhook.pipeline import ACTIVATION_NAMES, DecodeKind, GraphSpec
from fxhook.runtime.decode import check_context_length, refuse_hooks_after_blocks
from fxhook.runtime.kv_cache import KVCache

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
                    live_hooks: frozenset[str] | None | Literal["now"] = "now", after_cache: bool = False,
                    last_position: bool = False, **flags: bool) -> tuple[str, ...]:
    """The activations a run resuming from `starts` reads, in the order the graph takes them.

    They depend on which hooks are live (a layer whose pattern nobody reads runs fused attention and reads
    q, k and v instead of the pattern): by default those live now plus the starts, as a sweep that hooks
    its starts runs; live_hooks=None: every hook point and attention materialised everywhere, as the hook
    graph sees the model. after_cache: those of a run of the positions after a KV cache (`run_resumed_after`,
    with its `last_position`)."""
    live = model.live_hooks() | starts if live_hooks == "now" else live_hooks
    spec = dataclasses.replace(GraphSpec.from_cfg(model.cfg, live_hooks=live), resume_from=starts, **flags)
    kind = DecodeKind(last_position=last_position)
    entry = model.graphs.decode(spec, kind) if after_cache else model.graphs.forward(spec)
    return entry.gm.meta[RESUME_INPUTS]


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
    values, tokens, attention_mask = _resume_arguments(entry.gm.meta[RESUME_INPUTS], starts, activations, tokens,
                                                       attention_mask)
    out = model.graphs.run(entry, tokens, attention_mask, *values)
    kept: dict[str, torch.Tensor] = {}
    if keep:
        out, exposed = out
        kept = dict(zip(entry.gm.meta[ACTIVATION_NAMES], exposed))
    return out, kept, attention_mask


def _resume_arguments(needed: Sequence[str], starts: frozenset[str], activations: Mapping[str, torch.Tensor],
                      tokens: torch.Tensor | None, attention_mask: torch.Tensor | None
                      ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(the activations a resumed graph reads, in its order; tokens; attention mask), checked to be one run's
    [batch, pos] (tokens default to zeros, the mask to no padding)."""
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
    return values, tokens, attention_mask


def run_resumed_after(model: HookedTransformer, starts: frozenset[str], activations: Mapping[str, torch.Tensor],
                      past: KVCache, tokens: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                      last_position: bool = False) -> torch.Tensor:
    """Logits [batch, pos, d_vocab] of the positions after `past`, resumed from `starts`.

    Attention is causal: a change at position p leaves every position before p as it was. So a run
    resumed at a hook point whose change starts at position p needs only positions p onwards, with the
    keys and values of the earlier ones from a KV cache of the unchanged run (`past`: [batch, kv_heads,
    p, d_head] per layer and its mask [batch, p]). `activations` are those `required_inputs(...,
    after_cache=True)` lists, for the new positions only ([batch, pos - p, ...]); tokens and
    attention_mask too. Runs the model's growing-cache decode graph resumed from `starts` (eager).
    last_position: the final norm and unembedding run for the last position only (logits [batch, 1,
    d_vocab]; passes/last_position.py), for runs with no hook live after the last block.
    """
    spec = dataclasses.replace(GraphSpec.from_cfg(model.cfg, live_hooks=model.live_hooks()), resume_from=starts)
    if last_position:
        refuse_hooks_after_blocks(spec.live_hooks)
    if not isinstance(past, KVCache):
        raise TypeError(f"past must be a KVCache (model.init_kv_cache filled by a run), got {type(past).__name__}")
    heads = model.decoder.kv_heads(spec)
    if len(past.keys) != model.cfg.n_layers or (past.keys and past.keys[0].shape[1] != heads):
        raise ValueError(f"past holds {len(past.keys)} layers of keys with "
                         f"{past.keys[0].shape[1] if past.keys else 0} heads; this model has {model.cfg.n_layers} "
                         f"layers of {heads} key/value heads under its current flags: make the cache with it")
    entry = model.graphs.decode(spec, DecodeKind(last_position=last_position))
    values, tokens, attention_mask = _resume_arguments(entry.gm.meta[RESUME_INPUTS], starts, activations, tokens,
                                                       attention_mask)
    if past.batch_size != tokens.shape[0]:
        raise ValueError(f"past holds a batch of {past.batch_size} but the activations a batch of {tokens.shape[0]}")
    full_mask = torch.cat([past.attention_mask, attention_mask.to(past.attention_mask)], dim=1)
    check_context_length(model.cfg, full_mask.shape[1])
    return entry.gm(tokens, positions_from_mask(full_mask, tokens.shape[1]), full_mask, *past.keys, *past.values,
                    *values)


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
             fwd_hooks: Sequence[HookSpec] = (), names_filter: NameOrFilter | None = None,
             past_kv_cache: KVCache | None = None):
    """The forward resumed at `hook_name` (or several names), as `forward` would finish it.

    The value at `hook_name` is read from `activations` (an ActivationCache or a dict), passed through that
    hook point (its hooks, and `fwd_hooks`, fire on it), and only what depends on it is computed; every other
    value needed is read from `activations` too (which: `resume_inputs(model.hook_graph(), hook_name)`).
    Hooks on points upstream of `hook_name` do not run: their values are the given ones. `tokens` are
    needed for a loss; `attention_mask` must be the one of the run the activations came from when it had
    padding. With `names_filter`, returns (output, ActivationCache of the selected points that were
    recomputed). With `past_kv_cache` (a KVCache of the run up to some position p), only the positions
    after it are computed: `activations`, tokens and attention_mask then hold those positions alone, and so
    do the logits returned (the cache is read, not extended).
    """
    starts = frozenset([hook_name] if isinstance(hook_name, str) else hook_name)
    if not starts:
        raise ValueError("run_from needs at least one hook name to resume from")
    model.hook_registry.select(sorted(starts))  # unknown names fail here, with suggestions
    if return_type in ("loss", "both") and tokens is None:
        raise ValueError(f"return_type={return_type!r} needs the input tokens: pass tokens=")
    if past_kv_cache is not None:
        if names_filter is not None:
            raise ValueError("run_from cannot both resume after past_kv_cache and return a cache (names_filter); "
                             "pass one of them")
        with model.hooks(fwd_hooks):
            logits = run_resumed_after(model, starts, activations, past_kv_cache, tokens, attention_mask)
        mask = attention_mask if attention_mask is not None or tokens is None else torch.ones_like(tokens)
        return model._shaped_output(logits, tokens, mask, return_type, loss_per_token)
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
