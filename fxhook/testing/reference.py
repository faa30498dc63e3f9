"""The HF model as the reference: its logits and the outputs of the modules the adapter names.

fxhook's hook values are compared with what the HF model's own modules produce (forward hooks on
the embedding, each block's attention output, MLP output and block output, and the final norm),
so a difference is located at the first place the two disagree, in the order the values are
computed. A processed model (fold_ln, centring) writes the centred residual stream: its values
are compared after centring both sides over d_model, which every processing step leaves unchanged.
"""
from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from fxhook.adapter import get_module
from fxhook.core.hook_names import block_hook
from fxhook.model import HookedTransformer


@dataclass(frozen=True)
class Site:
    """A hook of fxhook and the HF module whose output holds the same value."""

    hook: str  # fxhook's hook name
    module: str  # the HF module's path
    kind: str  # "embed", "pos_embed", "attn_out", "mlp_out", "resid_post", "final_norm"


def hf_sites(model: HookedTransformer) -> list[Site]:
    """The comparable sites of `model`, in the order the forward pass computes them."""
    adapter, n = model.adapter, model.cfg.n_layers
    sites = [Site("hook_embed", adapter.embed, "embed")]
    if adapter.positions.pos_embed is not None:
        sites.append(Site("hook_pos_embed", adapter.positions.pos_embed, "pos_embed"))
    for layer in range(n):
        block = f"{adapter.blocks}.{layer}"
        sites += [Site(block_hook(layer, "hook_attn_out"), f"{block}.{adapter.attn_out_module}", "attn_out"),
                  Site(block_hook(layer, "hook_mlp_out"), f"{block}.{adapter.mlp_out_module}", "mlp_out"),
                  Site(block_hook(layer, "hook_resid_post"), block, "resid_post")]
    sites.append(Site("ln_final.hook_normalized", adapter.final_norm, "final_norm"))
    return sites


def first_tensor(output) -> torch.Tensor:
    """A module's main output (attention and MoE modules return tuples)."""
    while isinstance(output, (tuple, list)):
        output = output[0]
    return output


def positions_for(mask: torch.Tensor) -> torch.Tensor:  # [b, p] -> [b, p]
    """Position ids counted over the real tokens, as fxhook and HF generate count them."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@contextlib.contextmanager
def recording(hf_model: nn.Module, sites: list[Site], edits: dict[str, Callable] | None = None
              ) -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks on the sites' HF modules: the yielded dict fills with their outputs during a run.
    `edits` maps a module path to a function output -> new output (the HF side of an ablation)."""
    values: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(site: Site | None, edit: Callable | None):
        def hook(_module, _inputs, output):
            if edit is not None:
                output = edit(output)
            if site is not None:
                values[site.hook] = first_tensor(output).detach()
            return output
        return hook

    edits = dict(edits or {})
    try:
        for site in sites:
            handles.append(get_module(hf_model, site.module).register_forward_hook(
                hook_for(site, edits.pop(site.module, None))))
        for path, edit in edits.items():
            handles.append(get_module(hf_model, path).register_forward_hook(hook_for(None, edit)))
        yield values
    finally:
        for handle in handles:
            handle.remove()


def hf_forward(hf_model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The HF model's logits [b, p, vocab] for left-padded tokens [b, p] (positions from the mask)."""
    with torch.no_grad():
        return hf_model(input_ids=tokens, attention_mask=mask, position_ids=positions_for(mask),
                        use_cache=False).logits


def _free_bytes(device: torch.device) -> int:
    """Memory a float64 copy may take on `device`: a quarter of the host's RAM, or half the GPU's free memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): assume 8 GiB may be used
        return 8 << 30


def float64_forward(hf_model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor,
                    edits: dict[str, Callable] | None = None) -> torch.Tensor | None:
    """hf_model's logits [b, p, vocab] computed in float64 (a temporary copy, with the same `edits`): the
    nearly exact values the model's own dtype rounds. None when the copy would not fit in memory."""
    params = list(hf_model.parameters()) + list(hf_model.buffers())
    if not params:
        return None
    device = params[0].device
    if 8 * sum(t.numel() for t in params) > _free_bytes(device):
        return None
    exact = copy.deepcopy(hf_model).to(torch.float64)
    try:
        with recording(exact, [], edits):
            return hf_forward(exact, tokens, mask)
    finally:
        del exact


def is_processed(model: HookedTransformer, hf_model: nn.Module) -> bool:
    """Whether `model`'s weights were processed (folded, centred) relative to `hf_model`'s."""
    if model.hf_model is hf_model:
        return False
    if model.cfg.layer_norm_folding:
        return True
    adapter = model.adapter
    for path in (adapter.embed, adapter.unembed):
        mine, theirs = get_module(model.hf_model, path).weight, get_module(hf_model, path).weight
        if mine.shape != theirs.shape or not torch.equal(mine.detach().cpu(), theirs.detach().to(
                device="cpu", dtype=mine.dtype)):
            return True
    return False


def final_norm_affine(hf_model: nn.Module, model: HookedTransformer, normalized: torch.Tensor) -> torch.Tensor:
    """fxhook's pure normalised final-norm input [..., d_model] put through the HF final norm's own
    weight and bias: what the HF final norm outputs, if the normalised values agree."""
    norm = get_module(hf_model, model.adapter.final_norm)
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    out = normalized
    if weight is not None:
        out = out * (weight + 1 if model.adapter.norms.kind == "rmsnorm_plus_one" else weight)
    if bias is not None:
        out = out + bias
    return out
