"""Weight processing: TransformerLens's fold_ln / centring / value-bias folding on a HF model."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from fxhook.adapter import Adapter
from fxhook.config import HookedTransformerConfig
from fxhook.core import hook_names
from fxhook.processing import transforms
from fxhook.processing.weight_dict import bias_homes, ensure_bias, live_weights, untie_unembed


def process_hf_weights(hf_model: nn.Module, adapter: Adapter, cfg: HookedTransformerConfig, *,
                       fold_ln: bool = True, center_writing_weights: bool = True, center_unembed: bool = True,
                       fold_value_biases: bool = True, refactor_factored_attn_matrices: bool = False) -> None:
    """Rewrite `hf_model`'s parameters in place (the caller captures it afterwards)."""
    layer_norm = adapter.norms.kind == "layernorm"
    if center_writing_weights and not layer_norm:  # TransformerLens skips it silently for RMS models
        center_writing_weights = False
    if center_unembed and getattr(hf_model.config, "final_logit_softcapping", None):
        warnings.warn("center_unembed skipped: this model soft-caps its logits, and a softcap does not "
                      "commute with shifting every logit of a position, so centring would change the "
                      "log-probabilities", stacklevel=3)
        center_unembed = False
    if adapter.norms.post_norm and fold_ln:
        warnings.warn("fold_ln skipped: this model normalises the attention and MLP outputs (post-norm), so no "
                      "norm weight sits on a linear map's input to fold into (TransformerLens skips it too); "
                      "pass fold_ln=False to silence this", stacklevel=3)
        fold_ln = False
    if adapter.positions.kind == "shortformer" and fold_ln:
        warnings.warn("fold_ln skipped: shortformer positions are added after ln1, so ln1's weight cannot move "
                      "into W_Q / W_K without scaling the positions too; pass fold_ln=False to silence this",
                      stacklevel=3)
        fold_ln = False
    if fold_ln or center_unembed:
        untie_unembed(hf_model, adapter)
    with torch.no_grad():
        sd = {k: v.detach().clone() for k, v in live_weights(hf_model, adapter, cfg).items()}
        if fold_ln and adapter.feed_forward.bias_after_gate and any(
                hook_names.key_of(k) == "ln2.b" and bool(v.ne(0).any()) for k, v in sd.items()):
            warnings.warn("fold_ln skipped: ln2's bias reaches this gated MLP's up branch inside act(gate) * up, "
                          "where b_in (added after the product) cannot hold it; pass fold_ln=False to silence "
                          "this", stacklevel=3)
            fold_ln = False
        if fold_ln:
            sd = transforms.fold_layer_norm(sd, cfg.n_layers, adapter.norms.kind)
        if center_writing_weights:
            sd = transforms.center_writing_weights(sd, cfg.n_layers, adapter.positions.kind != "shortformer")
        if center_unembed:
            sd = transforms.center_unembed(sd)
        if fold_value_biases:
            sd = transforms.fold_value_biases(sd, cfg.n_layers, cfg.n_heads)
        if refactor_factored_attn_matrices:
            sd = transforms.refactor_factored_attn_matrices(sd, cfg.n_layers, cfg.n_heads, adapter.rotary)
        write_weights(hf_model, adapter, cfg, sd)
    if fold_ln and adapter.norms.kind != "none":
        cfg.layer_norm_folding = True
        cfg.normalization_type = "LNPre" if layer_norm else "RMSPre"


def write_weights(hf_model: nn.Module, adapter: Adapter, cfg: HookedTransformerConfig, sd: dict) -> None:
    """Copy TransformerLens-layout weights into the HF parameters (creating a bias where one is needed)."""
    live = live_weights(hf_model, adapter, cfg)
    created = [k for k in sd if k not in live and bool(sd[k].abs().max() > 0)]
    if created:
        homes = bias_homes(hf_model, adapter, cfg)
        for key in created:
            if key not in homes:
                raise NotImplementedError(f"processing produced a bias {key} that the HF model has no place "
                                          f"for; turn off the flag that produced it")
            module, size = homes[key]
            ensure_bias(module, size)
        live = live_weights(hf_model, adapter, cfg)
    for key, value in sd.items():
        if key in live:
            live[key].copy_(value)
