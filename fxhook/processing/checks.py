"""Checks on a TransformerLens-layout state dict before it is loaded: every value has a place, exactly.

`load_and_process_state_dict` used to broadcast a mis-shaped tensor into its weight and drop a bias
the HF model had no parameter for; here each (name, value) is refused with the reason instead.
"""
from __future__ import annotations

import difflib

import torch
from torch import nn

from fxhook.adapter import Adapter
from fxhook.config import HookedTransformerConfig
from fxhook.core import hook_names
from fxhook.processing.weight_dict import bias_homes


def _unknown_weight_message(name: str, known: dict[str, torch.Tensor]) -> str:
    close = difflib.get_close_matches(name, list(known), n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"no weight named {name!r} in this model.{hint} (model.live_weights() lists all {len(known)} names)"


def checked_tl_weight(name: str, value: torch.Tensor, known: dict[str, torch.Tensor], hf_model: nn.Module,
                      adapter: Adapter, cfg: HookedTransformerConfig) -> torch.Tensor:
    """A TransformerLens-layout weight for `name`, if this model has a place for it with that exact shape."""
    layer, leaf = hook_names.layer_of(name), hook_names.leaf_of(name)
    if layer is not None and not 0 <= layer < cfg.n_layers:
        raise KeyError(f"state dict key {name!r} is for block {layer}, but this model has "
                       f"n_layers={cfg.n_layers} blocks (0..{cfg.n_layers - 1})")
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"state dict value for {name!r} must be a tensor, got {type(value).__name__}")
    if name in known:
        shape = tuple(known[name].shape)
    elif leaf.startswith("b_") or leaf == "b":
        if bool(value.ne(0).any()) and name not in bias_homes(hf_model, adapter, cfg):
            raise ValueError(f"state dict holds a nonzero {name!r}, but this {adapter.architectures[0]} "
                             f"model has no parameter it could live in: it would be lost")
        shape = _bias_shape(leaf, cfg)
    else:
        raise KeyError(_unknown_weight_message(name, known))
    if shape is not None and tuple(value.shape) != shape:
        raise ValueError(f"state dict value for {name!r} has shape {tuple(value.shape)}, but this model's is "
                         f"{shape}: shapes must match exactly (nothing is broadcast)")
    if leaf == "b_in" and cfg.gated_mlp and not adapter.feed_forward.bias_after_gate and bool(value.ne(0).any()):
        raise ValueError(f"{name!r} is nonzero: TransformerLens adds a gated MLP's b_in after act(gate) * up, "
                         f"which this HF model cannot represent (its up projection's bias sits inside the "
                         f"product); loading it would change what the model computes")
    return value


def _bias_shape(leaf: str, c: HookedTransformerConfig) -> tuple[int, ...] | None:
    return {"b_Q": (c.n_heads, c.d_head), "b_K": (c.n_kv_heads, c.d_head), "b_V": (c.n_kv_heads, c.d_head),
            "b_O": (c.d_model,), "b_in": (c.d_mlp,), "b_gate": (c.d_mlp,), "b_out": (c.d_model,),
            "b_U": (c.d_vocab_out,), "b": (c.d_model,)}.get(leaf)
