"""Decode graphs: the model's step with a KV cache, eager (growing cache) or compiled (static cache).

Every decode graph comes from one capture of the HF model's step
(fxhook/capture/kv.py), lowered by fxhook/passes/kv_cache.py, then built with
the same passes and the same HookPoint objects as the full graph, so hooks
attached by name fire in whichever graph runs. Each lowering is checked once
against the full graph on a tiny input before it is used (`verify_decode`).

Compiled decode is `torch.compile` (inductor) of the static-cache graph
pruned to the hooked points: the graph that runs is chosen per step from the
set of points that have hooks, so a hook added after compiling selects a graph
that has its point (compiled on first use) and a removed one the graph without
it; hooks are never ignored. Under compilation a hooked point runs its hooks
as plain Python between compiled regions (runtime/hook_point.py), so a new
hook function at an already hooked point reuses the compiled code. The graph
with no hook point, the common case, skips dynamo altogether
(runtime/precompiled.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import torch
from torch import fx

from fxhook.runtime.kv_cache import KVCache, StaticKVCache
from fxhook.runtime.precompiled import PrecompiledStep


def _guards_skipped(skip: bool):
    """Skip dynamo's guard evaluation for a step whose guards are known to pass.

    Guards check every input and parameter of the step (hundreds of tensors) before each call: on
    SmolLM2 that costs about a third of the compiled step's overhead above the matrix products. The
    decode steps of one generate call run the same graph on inputs of the same shapes, dtypes and
    strides, under the same grad mode, so with no hooks attached the guards' answer cannot change.
    """
    if not skip:
        return contextlib.nullcontext()
    try:
        return torch.compiler.set_stance(skip_guard_eval_unsafe=True)
    except (AttributeError, TypeError):  # torch without this stance: evaluate the guards
        return contextlib.nullcontext()


_COMPILED_DECODE = "_fxhook_compiled_decode"  # gm.__dict__ key: ((backend, mode), compiled callable)
_PRECOMPILED = "_fxhook_precompiled_decode"  # gm.__dict__ key: PrecompiledStep


@dataclasses.dataclass(frozen=True)
class DecodeKind:
    """Which decode graph: static (preallocated cache, compiled decode) and/or fed with embeddings."""

    static: bool = False
    embeds: bool = False


class DecodeGraphsMixin:
    """decode_graph_for, init_kv_cache, forward(past_kv_cache=...) and the compiled decode step."""

    def _decode_kv_heads(self, spec) -> int:
        return self.cfg.n_heads if spec.ungroup_grouped_query_attention else self.cfg.n_kv_heads

    def _decode_captured(self, ungroup: bool, kind: DecodeKind) -> fx.GraphModule:
        """The captured decode graph with its cache lowered (and checked), before hook points."""
        from fxhook.core.graph import copy_graph_module
        from fxhook.passes.kv_cache import embeds_input, lower_growing_cache, lower_static_cache
        from fxhook.passes.simplify import simplify

        key = ("decode-captured", ungroup, kind)
        if key in self._variants:
            return self._variants[key]
        raw_key = ("decode-captured-raw", ungroup)
        if raw_key not in self._variants:
            from fxhook.compiler import capture_decode_graph

            if ungroup:
                from fxhook.capture.ungroup import ungrouped_twin

                hf = ungrouped_twin(self.hf_model, self.adapter, self.cfg.n_heads, self.cfg.n_kv_heads)
                raw = capture_decode_graph(hf, self.adapter, self.cfg, n_kv_heads=self.cfg.n_heads)
            else:
                raw = capture_decode_graph(self.hf_model, self.adapter, self.cfg)
            self._variants[raw_key] = simplify(raw)
        gm = copy_graph_module(self._variants[raw_key])
        if kind.embeds:
            gm = embeds_input(gm)
        gm = lower_static_cache(gm) if kind.static else lower_growing_cache(gm)
        from fxhook.pipeline.verify import verify_decode
        from fxhook.compiler import GraphSpec

        full = self._captured_for(GraphSpec(ungroup_grouped_query_attention=ungroup))
        embed = self._embed_tokens if kind.embeds else None
        verify_decode(gm, full, self.cfg.n_layers, self.cfg.n_heads if ungroup else self.cfg.n_kv_heads,
                      self.cfg.d_head, self.cfg.d_vocab, static=kind.static, embed=embed)
        self._variants[key] = gm
        return gm

    def decode_graph_for(self, spec, kind: DecodeKind = DecodeKind()) -> fx.GraphModule:
        """The hooked decode-step graph for `spec` (no layer slicing), built once; cleared with the variants.

        As for the full graph, spec.live_hooks (when not None) keeps only those hook points and fuses
        the attention of layers whose scores and pattern nobody reads."""
        from fxhook.compiler import build_variant
        from fxhook.passes.simplify import flat_attributes, simplify

        key = ("decode", spec, kind)
        if key not in self._variants:
            ungroup = spec.ungroup_grouped_query_attention and self.cfg.n_kv_heads != self.cfg.n_heads
            captured = self._decode_captured(ungroup, kind)
            gm = simplify(build_variant(captured, spec, self.cfg, self.adapter, self._make_point))
            if kind.static:  # compiled: grouped-query attention must not copy the static cache per head
                from fxhook.passes.kv_cache import ungrouped_sdpa

                gm = ungrouped_sdpa(gm)
            else:  # run eagerly only: flat parameter reads (compiled graphs keep registered ones)
                gm = flat_attributes(gm)
            if spec.live_hooks is not None:
                self._remember_pruned(key, gm)
            else:
                self._variants[key] = gm
        return self._variants[key]

    def _embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings [b, p, d_model] as hook_embed sees them (before positional embeddings)."""
        from fxhook.adapter import get_module

        return get_module(self.hf_model, self.adapter.embed)(tokens)

    def _current_spec(self):
        from fxhook.compiler import GraphSpec

        return GraphSpec.from_cfg(self.cfg, live_hooks=self.live_hooks())

    # ------------------------------------------------------------ the growing cache (eager)
    def init_kv_cache(self, batch_size: int = 1) -> KVCache:
        """An empty KV cache for this model under its current flags."""
        from fxhook.compiler import GraphSpec

        param = next(self.parameters())
        return KVCache.init_cache(self.cfg, param.device, batch_size,
                                  n_kv_heads=self._decode_kv_heads(GraphSpec.from_cfg(self.cfg)), dtype=param.dtype)

    def _run_growing(self, cache: KVCache, tokens: torch.Tensor, mask: torch.Tensor,
                     embeds: torch.Tensor | None = None) -> torch.Tensor:
        """One cached step: tokens [b, q] with their padding mask [b, q] -> logits [b, q, vocab]."""
        from fxhook.core.kv_ops import positions_from_mask

        spec = self._current_spec()
        heads = self._decode_kv_heads(spec)
        if cache.keys and cache.keys[0].shape[1] != heads:
            raise ValueError(f"the cache holds {cache.keys[0].shape[1]} key/value heads but the model now uses "
                             f"{heads} (ungroup_grouped_query_attention changed?): make a new cache")
        full_mask = torch.cat([cache.attention_mask, mask.to(cache.attention_mask)], dim=1)
        self._check_context_length(full_mask)
        q = tokens.shape[1]
        graph = self.decode_graph_for(spec, DecodeKind(embeds=embeds is not None))
        extra = () if embeds is None else (embeds,)
        out = graph(tokens, positions_from_mask(full_mask, q), full_mask, *cache.keys, *cache.values, *extra)
        n = self.cfg.n_layers
        cache.update(out[1:1 + n], out[1 + n:1 + 2 * n], full_mask)
        return out[0]

    def _forward_with_cache(self, input, cache: KVCache, return_type, loss_per_token, prepend_bos, padding_side,
                            attention_mask, start_at_layer, stop_at_layer):
        if not isinstance(cache, KVCache):
            raise TypeError(f"past_kv_cache must be a fxhook KVCache (model.init_kv_cache(batch_size)), "
                            f"got {type(cache).__name__}")
        if start_at_layer is not None or stop_at_layer is not None:
            raise NotImplementedError("past_kv_cache with start_at_layer / stop_at_layer is not supported")
        if (cache.past_length > 0 and attention_mask is None and isinstance(input, torch.Tensor)
                and input.dtype in (torch.long, torch.int, torch.int32)):
            tokens = input[None] if input.dim() == 1 else input
            tokens = tokens.to(cache.attention_mask.device)
            attention_mask = torch.ones_like(tokens)  # a continuation has no leading padding
        else:
            tokens, attention_mask = self.input_to_tokens(input, prepend_bos, padding_side, attention_mask)
        if tokens.shape[0] != cache.batch_size:
            raise ValueError(f"the input has batch size {tokens.shape[0]} but the cache was made for "
                             f"{cache.batch_size}")
        logits = self._run_growing(cache, tokens, attention_mask)
        return self._shaped_output(logits, tokens, attention_mask, return_type, loss_per_token)

    # ------------------------------------------------------------ the static cache (compiled decode)
    def init_static_kv_cache(self, batch_size: int, max_len: int) -> StaticKVCache:
        param = next(self.parameters())
        return StaticKVCache(self.cfg, batch_size, max_len, self._decode_kv_heads(self._current_spec()),
                             param.dtype, param.device)

    def _run_static(self, cache: StaticKVCache, tokens: torch.Tensor, mask: torch.Tensor,
                    embeds: torch.Tensor | None = None, compiled: bool = False) -> torch.Tensor:
        """Write tokens [b, q] (padding mask [b, q]) into the static cache -> logits [b, q, vocab]."""
        spec = self._current_spec()
        if cache.keys[0].shape[1] != self._decode_kv_heads(spec):
            raise ValueError("the static cache was made under other model flags: make a new one")
        if cache.length + tokens.shape[1] > self.cfg.n_ctx:
            self._check_context_length(torch.empty((0, cache.length + tokens.shape[1]), device="meta"))
        cache_position = cache.reserve(mask)
        kind = DecodeKind(static=True, embeds=embeds is not None)
        graph = self.decode_graph_for(spec, kind)
        extra = () if embeds is None else (embeds,)
        args = (tokens, cache.positions(tokens.shape[1]), cache.attention_mask, *cache.keys, *cache.values, *extra,
                cache_position)
        if not compiled:
            return graph(*args)
        # the next token of the same generate call: this graph already ran on inputs of these very
        # layouts, and with no hook attached nothing can hand the graph a tensor of another layout
        warm = cache.warm_graph is graph and not spec.live_hooks
        cache.warm_graph = graph
        precompiled = self._precompiled(graph, spec)
        if precompiled is not None:
            return precompiled(*args, same_as_last=warm)
        with _guards_skipped(warm):
            return self._compiled(graph)(*args)

    def _precompiled(self, graph: fx.GraphModule, spec) -> PrecompiledStep | None:
        """The dynamo-free step (runtime/precompiled.py) where it applies: no hook point in the graph,
        inference, and inductor with its default mode."""
        options = getattr(self, "_compile_options", None)
        if spec.live_hooks or torch.is_grad_enabled() or (
                options is not None and (options.backend, options.mode) != ("inductor", None)):
            return None
        step = graph.__dict__.get(_PRECOMPILED)
        if step is None:
            step = graph.__dict__[_PRECOMPILED] = PrecompiledStep(graph)
        return step

    def _compiled(self, graph: fx.GraphModule) -> Callable:
        """torch.compile of a static decode graph, made once per graph and options.

        Shapes are left static (dynamic=None): every token of a generate call has the same shapes;
        a new batch size or cache bucket recompiles once, with those sizes made dynamic.
        Backend and mode follow `model.compile(...)` when it was called (inductor otherwise)."""
        options = getattr(self, "_compile_options", None)
        backend, mode = (options.backend, options.mode) if options is not None else ("inductor", None)
        entry = graph.__dict__.get(_COMPILED_DECODE)
        if entry is None or entry[0] != (backend, mode):
            entry = graph.__dict__[_COMPILED_DECODE] = ((backend, mode), torch.compile(graph, backend=backend,
                                                                                       mode=mode))
        return entry[1]
