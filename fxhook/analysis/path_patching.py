"""Path patching (Wang et al., IOI): patch senders' effect on receivers' inputs only.

    value = path_patch(model, corrupted_tokens, clean_cache, metric, senders=[(9, 6)], receivers=[(10, 7, "q")])
    grid = get_path_patch_head_to_receivers(model, corrupted_tokens, clean_cache, metric, [(10, 7, "q")])

On the corrupted run, the sender heads' outputs (hook_z) take their clean values and reach the receiver
heads' query, key or value inputs (the per-head input hooks of use_split_qkv_input) along the residual
stream and nothing else: every other head's output and every MLP's output in between are held at their
corrupted values. Those receiver inputs are then put into a corrupted run (only there), which runs on to
the metric. Both runs use the per-head input hooks for this call only (the model's flags are untouched)
and start at the first hook they change (`resume_from`), so only the layers from there on are computed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Literal, Sequence

import contextlib
import dataclasses

import networkx as nx
import torch
from tqdm.auto import tqdm

from fxhook.analysis.hook_graph import hook_graph_of
from fxhook.analysis.patch_runs import copies as _copies
from fxhook.analysis.resume import required_inputs, run_resumed, run_with_flags
from fxhook.core.graph import hook_point_nodes
from fxhook.core.hook_point import HookEntry, call_hooks
from fxhook.core.hook_names import block_hook, layer_of
from fxhook.pipeline import GraphSpec

if TYPE_CHECKING:
    from fxhook.analysis.cache import ActivationCache
    from fxhook.model import HookedTransformer

Head = tuple[int, int]  # (layer, head)
Receiver = tuple[int, int, Literal["q", "k", "v"]]  # (layer, head, which input)
SPLIT = {"use_split_qkv_input": True}
_INPUT_KEY = {"q": "hook_q_input", "k": "hook_k_input", "v": "hook_v_input"}


def _split_graph(model: HookedTransformer):
    """The full forward graph with the per-head input hooks, whatever the model's flags say."""
    return model.graph_for(dataclasses.replace(GraphSpec.from_cfg(model.cfg), **SPLIT))


def _checked(model: HookedTransformer, sender_sets: list[Sequence[Head]], receivers: Sequence[Receiver]) -> None:
    """Senders and receivers name real heads, and every sender has a path to some receiver."""
    cfg = model.cfg
    if not receivers:
        raise ValueError("path patching needs at least one receiver (layer, head, 'q' | 'k' | 'v')")
    for layer, head, which in receivers:
        heads = cfg.n_heads if which == "q" else cfg.n_kv_heads
        if which not in _INPUT_KEY or not (0 <= layer < cfg.n_layers and 0 <= head < heads):
            raise ValueError(f"receiver {(layer, head, which)!r} is not (layer < {cfg.n_layers}, head, 'q'|'k'|'v') "
                             f"with head < {cfg.n_heads} for q, < {cfg.n_kv_heads} for k and v")
    graph = hook_graph_of(_split_graph(model))
    targets = {block_hook(layer, _INPUT_KEY[which]) for layer, _, which in receivers}
    for layer, head in {sender for senders in sender_sets for sender in senders}:
        if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads):
            raise ValueError(f"sender {(layer, head)!r} is not a head (layer < {cfg.n_layers}, head < {cfg.n_heads})")
        source = block_hook(layer, "attn.hook_z")
        if not any(nx.has_path(graph, source, target) for target in targets):
            raise ValueError(f"sender head {(layer, head)} has no path to any receiver {list(receivers)}: a sender "
                             "must come before its receivers")


def _sender_inputs_run(model: HookedTransformer, tokens: torch.Tensor, mask: torch.Tensor,
                       corrupted: dict[str, torch.Tensor], clean_cache: ActivationCache,
                       sender_sets: list[Sequence[Head]], receivers: Sequence[Receiver]) -> dict[str, torch.Tensor]:
    """Run 1, one copy of the input per sender set: the receivers' inputs [copies * batch, ...] when the
    senders are clean and every other head and MLP output between them is held corrupted."""
    batch, copies = tokens.shape[0], len(sender_sets)
    first = min(layer for senders in sender_sets for layer, _ in senders)
    last = max(layer for layer, _, _ in receivers)
    recorded: dict[str, torch.Tensor] = {}

    def hold_z(activation: torch.Tensor, hook) -> torch.Tensor:
        held = _copies(corrupted[hook.name], copies).clone()
        layer = layer_of(hook.name)
        for copy, senders in enumerate(sender_sets):
            for sender_layer, head in senders:
                if sender_layer == layer:
                    held[copy * batch:(copy + 1) * batch, :, head] = clean_cache[hook.name][:, :, head]
        return held

    def hold(activation: torch.Tensor, hook) -> torch.Tensor:
        return _copies(corrupted[hook.name], copies)

    def record(activation: torch.Tensor, hook) -> None:
        recorded[hook.name] = activation

    hooks = [(block_hook(layer, "attn.hook_z"), hold_z) for layer in range(first, last)]
    hooks += [(block_hook(layer, "hook_mlp_out"), hold) for layer in range(first, last)]
    hooks += [(name, record) for name in sorted({block_hook(layer, _INPUT_KEY[w]) for layer, _, w in receivers})]
    start = frozenset([block_hook(first, "attn.hook_z")])
    with _attached(model, hooks):
        values = {n: _copies(corrupted[n], copies) for n in required_inputs(model, start, **SPLIT)}
        run_resumed(model, start, values, _copies(tokens, copies), _copies(mask, copies), **SPLIT)
    return recorded


def _attached(model: HookedTransformer, hooks: list[tuple[str, Callable]]) -> contextlib.AbstractContextManager:
    """This call's hooks, on points that may exist only with the per-head input hooks (model.hooks checks
    names against the model's own flags)."""
    return call_hooks([(model.graphs.make_point(name), "fwd", HookEntry(fn)) for name, fn in hooks])


def _receivers_run(model: HookedTransformer, tokens: torch.Tensor, mask: torch.Tensor,
                   corrupted: dict[str, torch.Tensor], recorded: dict[str, torch.Tensor],
                   receivers: Sequence[Receiver], copies: int) -> torch.Tensor:
    """Run 2: the corrupted run with only the receivers' head inputs replaced; its logits."""
    by_name: dict[str, list[int]] = {}
    for layer, head, which in receivers:
        by_name.setdefault(block_hook(layer, _INPUT_KEY[which]), []).append(head)

    def put(activation: torch.Tensor, hook) -> torch.Tensor | None:
        if hook.name not in recorded:  # a receiver no sender reaches: its input is the corrupted one
            return None
        activation = activation.clone()
        heads = by_name[hook.name]
        activation[:, :, heads] = recorded[hook.name][:, :, heads]
        return activation

    starts = frozenset(by_name)
    with _attached(model, [(name, put) for name in by_name]):
        values = {n: _copies(corrupted[n], copies) for n in required_inputs(model, starts, **SPLIT)}
        logits, _, _ = run_resumed(model, starts, values, _copies(tokens, copies), _copies(mask, copies), **SPLIT)
    return logits


def _corrupted_run(model: HookedTransformer, tokens: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every activation the two runs may read, from one corrupted run with the per-head input hooks."""
    return run_with_flags(model, tokens, mask, frozenset(hook_point_nodes(_split_graph(model))), **SPLIT)[1]


def _sweep_values(model, corrupted_tokens, clean_cache, metric, sender_sets, receivers, per_run: int,
                  show: bool) -> list[float]:
    _checked(model, sender_sets, receivers)
    values: list[float] = []
    with torch.no_grad(), model.graphs.eager():
        tokens, mask = model.input_to_tokens(corrupted_tokens, None, None, None)
        corrupted = _corrupted_run(model, tokens, mask)
        batch = tokens.shape[0]
        for start in tqdm(range(0, len(sender_sets), per_run), desc="path patching", disable=not show):
            chunk = sender_sets[start:start + per_run]
            recorded = _sender_inputs_run(model, tokens, mask, corrupted, clean_cache, chunk, receivers)
            logits = _receivers_run(model, tokens, mask, corrupted, recorded, receivers, len(chunk))
            values += [float(metric(logits[i * batch:(i + 1) * batch])) for i in range(len(chunk))]
    return values


def path_patch(model: HookedTransformer, corrupted_tokens: torch.Tensor, clean_cache: ActivationCache,
               metric: Callable[[torch.Tensor], torch.Tensor], senders: Sequence[Head],
               receivers: Sequence[Receiver]) -> float:
    """The metric when the sender heads' clean outputs reach the receivers' inputs only (module doc).

    senders: (layer, head) pairs; receivers: (layer, head, "q" | "k" | "v") (k and v: kv heads under GQA).
    clean_cache needs the senders' attn.hook_z.
    """
    if not senders:
        raise ValueError("path_patch needs at least one sender head (layer, head)")
    return _sweep_values(model, corrupted_tokens, clean_cache, metric, [list(senders)], list(receivers), 1, False)[0]


def get_path_patch_head_to_receivers(model: HookedTransformer, corrupted_tokens: torch.Tensor,
                                     clean_cache: ActivationCache, metric: Callable[[torch.Tensor], torch.Tensor],
                                     receivers: Sequence[Receiver], progress: bool | None = None,
                                     patches_per_run: int = 8) -> torch.Tensor:
    """[layer, head]: path_patch with each head alone as the sender, for every head before the last receiver
    layer (heads with no path to a receiver keep the corrupted metric, measured once)."""
    receivers = list(receivers)
    last = max(layer for layer, _, _ in receivers)
    heads = [(layer, head) for layer in range(last) for head in range(model.cfg.n_heads)]
    with torch.no_grad():
        baseline = float(metric(model(corrupted_tokens)))
    results = torch.full((model.cfg.n_layers, model.cfg.n_heads), baseline)
    show = len(heads) > 20 if progress is None else progress
    values = _sweep_values(model, corrupted_tokens, clean_cache, metric, [[h] for h in heads], receivers,
                           max(1, int(patches_per_run)), show)
    for (layer, head), value in zip(heads, values):
        results[layer, head] = value
    return results
