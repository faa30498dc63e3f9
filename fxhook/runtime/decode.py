"""Decode graphs: the model's step with a KV cache, eager (growing cache) or compiled (static cache).

Every decode graph comes from the pipeline (fxhook/pipeline: one capture of the
HF model's step, its cache lowered and checked against the full graph, then the
forward passes with the same HookPoint objects as the full graph), so hooks
attached by name fire in whichever graph runs. `Decoder` runs them; the graphs
and their compiled code belong to the model's GraphStore.

Compiled decode is `torch.compile` (inductor) of the static-cache graph
pruned to the hooked points: the graph that runs is chosen per step from the
set of points that have hooks, so a hook added after compiling selects a graph
that has its point (compiled on first use) and a removed one the graph without
it; hooks are never ignored. Under compilation a hooked point runs its hooks
as plain Python between compiled regions (runtime/hook_point.py), so a new
hook function at an already hooked point reuses the compiled code. The graph
with no hook point, the common case, skips dynamo altogether
(runtime/precompiled.py).

The prompt runs through the static-cache step too (`Decoder.prefill_static`). With no hook point it
runs compiled too: padded on the left to one of a few query lengths (`prefill_plan`), so a handful
of compiled shapes serve every prompt length. Padding is masked like a batch's left padding
(positions are counted from the mask), so it changes no value. Its graph is the static step's
variant that unembeds the last position only (`DecodeKind(last_position=True)`, as HF's
`logits_to_keep`): nothing else of the prompt's logits is read. A hooked prompt runs eagerly and
unpadded: hooks see the prompt's own positions, as in eager generation.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable

import torch

from fxhook.config import HookedTransformerConfig
from fxhook.core import hook_names
from fxhook.core.kv_ops import positions_from_mask
from fxhook.pipeline import DecodeKind, GraphSpec
from fxhook.runtime.graphs import CompileOptions, GraphEntry, GraphStore
from fxhook.runtime.kv_cache import KVCache, StaticKVCache
from fxhook.runtime.precompiled import PrecompiledStep


def _guards_skipped(skip: bool):
    """Skip dynamo's guard evaluation for a step whose guards are known to pass.

    Guards check every input and parameter of the step (hundreds of tensors) before each call: on
    SmolLM2 that costs about a third of the compiled step's overhead above the matrix products. The
    decode steps of one generate call run the same graph on inputs of the same shapes, dtypes and
    strides, under the same grad mode, so with no hooks attached the guards' answer cannot change.
    The stance is process-wide, so it is taken only while no other thread runs (a concurrent hooked
    call would skip its guards too).
    """
    if not skip or threading.active_count() > 1:
        return contextlib.nullcontext()
    try:
        return torch.compiler.set_stance(skip_guard_eval_unsafe=True)
    except (AttributeError, TypeError):  # torch without this stance: evaluate the guards
        return contextlib.nullcontext()


_STATIC_OPTIONS = CompileOptions("inductor", None, None)  # static shapes: each token has the same layouts
# query lengths of a compiled prompt: a prompt is padded up to the next one; a longer prompt runs in
# chunks of the last (its remainder first, padded). Each is at most 1.5x the one before, so the filler is
# less than the prompt: a prompt's time grows about linearly with its positions (SmolLM2, one thread: 6
# positions 209 ms, 8 positions 245 ms), and the first-token latency of a 6-token prompt fell from 0.90x to
# 0.81x HF generate's when it stopped running 8. Each size used costs one compile per batch size.
PREFILL_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def prefill_plan(length: int, sizes: tuple[int, ...] = PREFILL_SIZES) -> tuple[int, list[int]]:
    """(padding, chunk lengths) for a compiled prompt of `length` tokens: `padding` filler slots go on the
    left, then the chunks (they sum to padding + length) run one after another into the static cache."""
    if length < 1:
        raise ValueError(f"a prompt needs at least one position, got {length}")
    chunk = sizes[-1]
    full, rest = divmod(length, chunk)
    if not rest:
        return 0, [chunk] * full
    first = next(size for size in sizes if size >= rest)
    return first - rest, [first] + [chunk] * full


def _left_pad(x: torch.Tensor, padding: int) -> torch.Tensor:
    """x [b, p, ...] with `padding` zero positions prepended (masked filler)."""
    if not padding:
        return x
    return torch.cat([x.new_zeros((x.shape[0], padding, *x.shape[2:])), x], dim=1)


def check_context_length(cfg: HookedTransformerConfig, length: int) -> None:
    if length > cfg.n_ctx:
        raise ValueError(f"the input has {length} positions but the model's context is n_ctx={cfg.n_ctx}; "
                         f"shorten the prompt (or truncate it, e.g. tokens[:, -{cfg.n_ctx}:])")


def refuse_hooks_after_blocks(live_hooks) -> None:
    """A last-position graph (`DecodeKind(last_position=True)`) runs the final norm and unembedding on the last
    position only: a hook live there would see one position, so it is refused, naming the hooks."""
    after = sorted(name for name in live_hooks if hook_names.after_blocks(name))
    if after:
        raise ValueError(f"last_position=True runs the final norm and unembedding on the last position only, so "
                         f"the hooks on {after} would see one position: remove them or pass last_position=False")


class Decoder:
    """Runs decode steps over a KV cache: the growing cache (eager) and the static one (compiled)."""

    def __init__(self, graphs: GraphStore, cfg: HookedTransformerConfig):
        self.graphs = graphs
        self.cfg = cfg

    def spec(self) -> GraphSpec:
        """The decode graph's spec now: the config's flags and the hooked points."""
        return GraphSpec.from_cfg(self.cfg, live_hooks=self.graphs.live_hooks())

    def kv_heads(self, spec: GraphSpec) -> int:
        return self.cfg.n_heads if spec.ungroup_grouped_query_attention else self.cfg.n_kv_heads

    def _param(self) -> torch.Tensor:
        return next(self.graphs.hf_model.parameters())

    # ------------------------------------------------------------ the growing cache (eager)
    def init_kv_cache(self, batch_size: int = 1) -> KVCache:
        """An empty KV cache for this model under its current flags."""
        param = self._param()
        return KVCache.init_cache(self.cfg, self.graphs.input_device(), batch_size,
                                  n_kv_heads=self.kv_heads(GraphSpec.from_cfg(self.cfg)), dtype=param.dtype,
                                  layer_devices=self.graphs.layer_devices())

    def run_growing(self, cache: KVCache, tokens: torch.Tensor, mask: torch.Tensor,
                    embeds: torch.Tensor | None = None) -> torch.Tensor:
        """One cached step: tokens [b, q] with their padding mask [b, q] -> logits [b, q, vocab]."""
        spec = self.spec()
        heads = self.kv_heads(spec)
        if cache.keys and cache.keys[0].shape[1] != heads:
            raise ValueError(f"the cache holds {cache.keys[0].shape[1]} key/value heads but the model now uses "
                             f"{heads} (ungroup_grouped_query_attention changed?): make a new cache")
        full_mask = torch.cat([cache.attention_mask, mask.to(cache.attention_mask)], dim=1)
        check_context_length(self.cfg, full_mask.shape[-1])
        q = tokens.shape[1]
        graph = self.graphs.decode(spec, DecodeKind(embeds=embeds is not None)).gm
        extra = () if embeds is None else (embeds,)
        out = graph(tokens, positions_from_mask(full_mask, q), full_mask, *cache.keys, *cache.values, *extra)
        n = self.cfg.n_layers
        cache.update(out[1:1 + n], out[1 + n:1 + 2 * n], full_mask)
        return out[0]

    # ------------------------------------------------------------ the static cache (compiled decode)
    def init_static_kv_cache(self, batch_size: int, max_len: int) -> StaticKVCache:
        param = self._param()
        return StaticKVCache(self.cfg, batch_size, max_len, self.kv_heads(self.spec()), param.dtype,
                             self.graphs.input_device(), self.graphs.layer_devices())

    def static_kv_cache_for(self, batch_size: int, prompt_length: int, max_new_tokens: int) -> StaticKVCache:
        """A static cache with room for the prompt (its compiled shape's filler included) and the new tokens."""
        padding, _ = prefill_plan(prompt_length)
        length = padding + prompt_length + max_new_tokens
        return self.init_static_kv_cache(batch_size, StaticKVCache.bucket(length, self.cfg.n_ctx + padding))

    def prefill_static(self, cache: StaticKVCache, tokens: torch.Tensor, mask: torch.Tensor,
                       embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt tokens [b, p] (padding mask [b, p]; embeds [b, p, d_model] in place of the token
        embeddings) into an empty static cache -> the logits [b, vocab] at its last position.

        With no hook point live (and inference under inductor's default mode) it runs compiled, padded and
        chunked by `prefill_plan`; otherwise eagerly and whole, so hooks see the prompt as it is."""
        if cache.length:
            raise ValueError("prefill_static fills an empty static cache: make a new one")
        check_context_length(self.cfg, tokens.shape[1])
        spec = self.spec()
        entry = self.graphs.decode(spec, DecodeKind(static=True, embeds=embeds is not None))
        if self._precompiled(entry, spec) is None:
            return self.run_static(cache, tokens, mask, embeds)[:, -1]
        padding, chunks = prefill_plan(tokens.shape[1])
        tokens, mask = _left_pad(tokens, padding), _left_pad(mask, padding)
        embeds = None if embeds is None else _left_pad(embeds, padding)
        cache.filler = padding
        start = 0
        for size in chunks:  # only the last chunk's last logits are read: no chunk unembeds the others
            piece = slice(start, start + size)
            logits = self.run_static(cache, tokens[:, piece], mask[:, piece],
                                     None if embeds is None else embeds[:, piece], compiled=True,
                                     last_position=True)
            start += size
        return logits[:, -1]

    def run_static(self, cache: StaticKVCache, tokens: torch.Tensor, mask: torch.Tensor,
                   embeds: torch.Tensor | None = None, compiled: bool = False, last_position: bool = False
                   ) -> torch.Tensor:
        """Write tokens [b, q] (padding mask [b, q]) into the static cache -> logits [b, q, vocab]
        ([b, 1, vocab] with `last_position`: the final norm and unembedding run for the last position only,
        passes/last_position.py; refused with a hook live after the last block, which would see one
        position)."""
        spec = self.spec()
        if cache.keys[0].shape[1] != self.kv_heads(spec):
            raise ValueError("the static cache was made under other model flags: make a new one")
        if last_position:
            refuse_hooks_after_blocks(spec.live_hooks or ())
        check_context_length(self.cfg, cache.context_length(tokens.shape[1]))
        cache_position = cache.reserve(mask)
        entry = self.graphs.decode(spec, DecodeKind(static=True, embeds=embeds is not None,
                                                    last_position=last_position))
        extra = () if embeds is None else (embeds,)
        args = (tokens, cache.positions(tokens.shape[1]), cache.attention_mask, *cache.keys, *cache.values, *extra,
                cache_position)
        if not compiled:
            return entry.gm(*args)
        # the next token of the same generate call: this graph already ran on inputs of these very
        # layouts, and with no hook attached nothing can hand the graph a tensor of another layout
        # (a prompt chunk and a token step run one graph on two layouts)
        warm = (cache.warm is not None and cache.warm[0] is entry.gm and cache.warm[1] == tuple(tokens.shape)
                and not spec.live_hooks)
        precompiled = self._precompiled(entry, spec)
        if precompiled is not None:
            artifact = cache.warm[2] if warm and cache.warm[2] is not None else precompiled.artifact(*args)
            cache.warm = (entry.gm, tuple(tokens.shape), artifact)
            return artifact(*args)
        cache.warm = (entry.gm, tuple(tokens.shape), None)
        with _guards_skipped(warm):
            return self._compiled(entry)(*args)

    def _precompiled(self, entry: GraphEntry, spec: GraphSpec) -> PrecompiledStep | None:
        """The dynamo-free step (runtime/precompiled.py) where it applies: no hook point in the graph,
        inference, and inductor with its default mode."""
        options = self.graphs.compile_options
        if spec.live_hooks or torch.is_grad_enabled() or (
                options is not None and (options.backend, options.mode) != ("inductor", None)):
            return None
        if entry.precompiled is None:
            entry.precompiled = PrecompiledStep(entry.gm)
        return entry.precompiled

    def _compiled(self, entry: GraphEntry) -> Callable:
        """torch.compile of a static decode graph, made once per graph and options.

        Shapes are left static (dynamic=None): every token of a generate call has the same shapes;
        a new batch size or cache bucket recompiles once, with those sizes made dynamic.
        Backend and mode follow `model.compile(...)` when it was called (inductor otherwise)."""
        options = self.graphs.compile_options
        if options is not None:
            options = CompileOptions(options.backend, options.mode, None)
        return entry.compiled_with(options or _STATIC_OPTIONS)
