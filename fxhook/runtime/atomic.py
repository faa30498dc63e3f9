"""All or nothing: an operation on the weights either completes or leaves the model exactly as it was.

Weight processing edits parameters in place, unties the unembedding, creates biases and changes the
config; moving the model replaces every tensor's data. If any step fails (a refused flag, a bad
state dict, an SVD on non-finite weights, running out of memory), `all_or_nothing` puts back each
module's parameter and buffer objects (ties included), their values, dtypes and devices, their
requires_grad flags, and both configs, then lets the caller rebuild its graphs.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn


def _snapshot(models: Sequence[nn.Module], clone: bool) -> Callable[[], None]:
    """A function that restores `models` to their state now. `clone`: copy the values (the operation may
    write into the tensors in place); otherwise keep references (it replaces their data)."""
    modules = {id(m): m for model in models for m in model.modules()}.values()
    slots = [(module, dict(module._parameters), dict(module._buffers)) for module in modules]
    tensors: dict[int, tuple[torch.Tensor, torch.Tensor, bool]] = {}
    for _, params, buffers in slots:
        for t in (*params.values(), *buffers.values()):
            if t is not None and id(t) not in tensors:
                data = t.detach().clone() if clone else t.data
                tensors[id(t)] = (t, data, t.requires_grad)
    hf_configs = {id(c): c for c in (getattr(m, "config", None) for m in models) if c is not None}
    configs = [(c, dict(c.__dict__)) for c in hf_configs.values()]

    def restore() -> None:
        with torch.no_grad():
            for module, params, buffers in slots:
                module._parameters.clear()
                module._parameters.update(params)
                module._buffers.clear()
                module._buffers.update(buffers)
            for t, data, requires_grad in tensors.values():
                same_place = (t.shape == data.shape and t.dtype == data.dtype and t.device == data.device)
                if clone and same_place:
                    t.copy_(data)  # the same storage: views of it (weight views) stay valid
                else:
                    t.data = data
                t.requires_grad_(requires_grad)
        for config, state in configs:
            config.__dict__.clear()
            config.__dict__.update(state)
    return restore


@contextlib.contextmanager
def all_or_nothing(models: Sequence[nn.Module], cfg: object, rebuild: Callable[[], None], clone: bool = True
                   ) -> Iterator[None]:
    """Run the block; if it raises, restore `models` (and their HF configs) and `cfg` as they were, call
    `rebuild` (graphs made from the half-changed model are stale) and re-raise."""
    restore = _snapshot(models, clone)
    cfg_state = dict(cfg.__dict__)
    try:
        yield
    except BaseException:
        restore()
        cfg.__dict__.clear()
        cfg.__dict__.update(cfg_state)
        rebuild()
        raise
