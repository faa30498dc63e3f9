"""KVCache: the keys and values fxhook's decode graph reads and extends, plus the running padding mask.

Layout (fxhook's, not TransformerLens's): per layer keys and values of shape
[batch, kv_heads, past, d_head] (kv_heads = n_key_value_heads under GQA, the
query head count when the model ungroups grouped-query attention). Keys are
stored after rotary, as the attention consumed them (after any hook on
hook_k / hook_rot_k / hook_v edited them). `attention_mask` [batch, past] is
1 for real tokens and 0 for padding; positions of new tokens are counted from
it, so left padding is invisible.

On a model split across devices (passes/placement.py) each layer's keys and values live on that
layer's device (`layer_devices`); the mask lives with the input, on the embedding's device.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], attention_mask: torch.Tensor,
                 frozen: bool = False):
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} key tensors but {len(values)} value tensors")
        self.keys = list(keys)
        self.values = list(values)
        self.attention_mask = attention_mask
        self.frozen = frozen

    @classmethod
    def init_cache(cls, cfg, device: torch.device | str | None = None, batch_size: int = 1,
                   n_kv_heads: int | None = None, dtype: torch.dtype | None = None,
                   layer_devices: list[torch.device] | None = None) -> "KVCache":
        """An empty cache for `cfg` (TransformerLens's name for it); `layer_devices`: each layer's device
        on a split model (else every layer on `device`)."""
        device = device if device is not None else (cfg.device or "cpu")
        dtype = dtype or cfg.dtype
        heads = n_kv_heads or cfg.n_kv_heads
        where = layer_devices or [device] * cfg.n_layers

        def empty() -> list[torch.Tensor]:
            return [torch.zeros((batch_size, heads, 0, cfg.d_head), dtype=dtype, device=where[layer])
                    for layer in range(cfg.n_layers)]
        return cls(empty(), empty(), torch.zeros((batch_size, 0), dtype=torch.long, device=device))

    # ---------------------------------------------------------------- state
    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]

    @property
    def past_length(self) -> int:
        return self.attention_mask.shape[1]

    @property
    def n_layers(self) -> int:
        return len(self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer], self.values[layer]

    def freeze(self) -> None:
        """Forward passes read the cache but no longer extend it."""
        self.frozen = True

    def unfreeze(self) -> None:
        self.frozen = False

    def update(self, keys: list[torch.Tensor], values: list[torch.Tensor], attention_mask: torch.Tensor) -> None:
        """Replace the contents with a step's extended keys, values and mask (no-op when frozen)."""
        if self.frozen:
            return
        self.keys, self.values, self.attention_mask = list(keys), list(values), attention_mask

    def clone(self) -> "KVCache":
        return KVCache([k.clone() for k in self.keys], [v.clone() for v in self.values],
                       self.attention_mask.clone(), self.frozen)

    def __repr__(self) -> str:
        shape = tuple(self.keys[0].shape) if self.keys else ()
        return f"KVCache(n_layers={self.n_layers}, keys[0]={shape}, frozen={self.frozen})"


class StaticKVCache:
    """Preallocated keys and values for compiled decode: per layer [batch, kv_heads, max_len, d_head].

    The decode graph writes each step's keys and values in place at the step's cache positions, so
    every step sees tensors of the same shapes and a compiled step never recompiles. `attention_mask`
    [batch, max_len] is 1 for real tokens (0 for left padding); slots past `length` are never read.
    """

    def __init__(self, cfg, batch_size: int, max_len: int, n_kv_heads: int, dtype: torch.dtype,
                 device: torch.device | str, layer_devices: list[torch.device] | None = None):
        shape = (batch_size, n_kv_heads, max_len, cfg.d_head)
        where = layer_devices or [device] * cfg.n_layers  # a split model: each layer's cache on its device
        self.keys = [torch.zeros(shape, dtype=dtype, device=where[layer]) for layer in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=where[layer]) for layer in range(cfg.n_layers)]
        self.attention_mask = torch.zeros((batch_size, max_len), dtype=torch.long, device=device)
        self.length = 0  # slots written so far
        self.filler = 0  # slots of padding added to give a compiled prompt a shared shape: no positions, not context
        # (graph, query shape, compiled code or None) of the compiled step that last ran on this cache: the
        # next token of the same call reuses the code without checking its inputs again
        self.warm: tuple | None = None

    @staticmethod
    def bucket(length: int, n_ctx: int, smallest: int = 64) -> int:
        """Buffer length for a sequence of `length`: a power of two (so calls of similar lengths share
        one compiled graph), at most n_ctx."""
        size = smallest
        while size < length:
            size *= 2
        return max(min(size, n_ctx), length)

    @property
    def max_len(self) -> int:
        return self.attention_mask.shape[1]

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]

    def context_length(self, q_len: int) -> int:
        """The sequence length (left padding of the batch counted, filler not) once q_len more slots are written."""
        return self.length + q_len - self.filler

    def reserve(self, mask: torch.Tensor) -> torch.Tensor:
        """Mark the next mask.shape[1] slots with `mask` [batch, q]; returns their cache positions [q]."""
        start, stop = self.length, self.length + mask.shape[1]
        if stop > self.max_len:
            raise ValueError(f"the static KV cache holds {self.max_len} positions; {stop} were asked for")
        self.attention_mask[:, start:stop] = mask
        self.length = stop
        return torch.arange(start, stop, device=mask.device)

    def positions(self, q_len: int) -> torch.Tensor:
        """Position ids [batch, q] of the last q_len written slots (padding not counted)."""
        counts = self.attention_mask[:, :self.length].cumsum(-1)[:, self.length - q_len:]
        return (counts - 1).clamp(min=0)  # a new dense tensor: the same strides at every step

    def __repr__(self) -> str:
        return f"StaticKVCache(n_layers={len(self.keys)}, keys[0]={tuple(self.keys[0].shape)}, length={self.length})"
