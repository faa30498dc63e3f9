"""Pre-rotary q / k marked on the arguments of the function HF calls to apply rotary (adapter
`Attention.rotary_fn`, e.g. "apply_rotary_pos_emb").

A fused projection (GPT-NeoX's query_key_value) outputs q, k and v in one tensor that the model then
splits itself; its first (q [b, heads, p, d_head], k, ...) arguments are the first place q and k exist
alone. Marking them there keeps hook_q / hook_k off the fused tensor, so nothing downstream of hook_q
seems to depend on k or v (the hook graph and the resume cut read dependencies tensor by tensor).

The function is a global of the attention module's Python module; it is wrapped while any capture runs
(counted, so concurrent captures share one wrapper) and restored after the last. The wrapper marks only
inside a capture's attention forward, in that thread or task (`_LAYER`).
"""
from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
from typing import Callable, Iterator

from torch import nn

from fxhook.capture.hf_attention import mark_heads
from fxhook.core import hook_names

# the layer whose attention is running under capture; None elsewhere (the wrapper passes through)
_LAYER: contextvars.ContextVar[int | None] = contextvars.ContextVar("fxhook_rotary_layer", default=None)
_LOCK = threading.Lock()
_WRAPPED: dict[tuple[str, str], tuple[Callable, int]] = {}  # (module, function) -> (original, captures using it)


def _marking(original: Callable) -> Callable:
    def apply_rotary_marked(q, k, *args, **kwargs):
        layer = _LAYER.get()
        if layer is not None:
            q = mark_heads(q, hook_names.block_hook(layer, "attn.hook_q"))
            k = mark_heads(k, hook_names.block_hook(layer, "attn.hook_k"))
        return original(q, k, *args, **kwargs)
    apply_rotary_marked.__wrapped__ = original
    return apply_rotary_marked


@contextlib.contextmanager
def _wrapped(module_name: str, function: str) -> Iterator[None]:
    module, key = sys.modules[module_name], (module_name, function)
    with _LOCK:
        if key in _WRAPPED:
            original, users = _WRAPPED[key]
        else:
            original, users = getattr(module, function, None), 0
            if not callable(original):
                raise ValueError(f"adapter rotary_fn={function!r} is not a function of {module_name} (the module "
                                 f"that defines the attention): name the function it calls to apply rotary")
            setattr(module, function, _marking(original))
        _WRAPPED[key] = (original, users + 1)
    try:
        yield
    finally:
        with _LOCK:
            original, users = _WRAPPED.pop(key)
            if users > 1:
                _WRAPPED[key] = (original, users - 1)
            else:
                setattr(module, function, original)


@contextlib.contextmanager
def rotary_inputs_marked(attentions: list[nn.Module], function: str) -> Iterator[None]:
    """Within the block, `function` (a global of the attentions' module) marks its q / k arguments as the
    running layer's hook_q / hook_k; `attentions[i]` is layer i's attention module."""
    handles = []
    for layer, attention in enumerate(attentions):
        tokens: list[contextvars.Token] = []

        def enter(_mod, _args, layer=layer, tokens=tokens):
            tokens.append(_LAYER.set(layer))

        def leave(_mod, _args, _output, tokens=tokens):
            _LAYER.reset(tokens.pop())
        handles.append(attention.register_forward_pre_hook(enter))
        handles.append(attention.register_forward_hook(leave, always_call=True))
    try:
        with _wrapped(type(attentions[0]).__module__, function):
            yield
    finally:
        for handle in handles:
            handle.remove()
