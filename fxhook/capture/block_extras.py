"""Capture of the block parts beyond the common layout, driven by adapter data.

- extra norms: Gemma 2's post norms (ln1_post / ln2_post) and q/k norms (attn.q_norm /
  attn.k_norm, TransformerLens's names) get fxhook's hooked norm, as ln1/ln2 do; so does SoLU-LN's
  LayerNorm after the activation (mlp.ln, with mlp.hook_mid on the activation's output);
- mixture-of-experts MLPs (Mixtral): the router is recomputed with TransformerLens's routing
  hooks (mlp.hook_expert_weights: the softmax over all experts [b, p, n_experts], before top-k;
  mlp.hook_expert_indices: the chosen experts [b, p, k]), and the experts run as one dense,
  exportable computation (HF's default loops over the experts a batch happens to hit, which
  torch.export cannot trace). A hook's edit of the indices changes which experts run.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from fxhook.adapter import Experts, get_module
from fxhook.core import hook_names as hn
from fxhook.core.ops import hook_marker


def install_block_extras(inst, block: nn.Module, layer: int) -> None:
    """Instrument `block`'s extra norms and experts (`inst` is the capture's instrumenter)."""
    norms, ff = inst.adapter.norms, inst.adapter.feed_forward
    for path, norm in ((norms.ln1_post, "ln1_post"), (norms.ln2_post, "ln2_post")):
        if path is not None:
            inst.patch_norm(get_module(block, path), hn.norm_prefix(layer, norm))
    for path, norm in ((norms.q_norm, "attn.q_norm"), (norms.k_norm, "attn.k_norm")):
        if path is not None:
            inst.patch_norm(get_module(block, path), hn.norm_prefix(layer, norm), norms.qk_kind)
    if ff.mid_site is not None:  # SoLU-LN: the activation's output, then its LayerNorm
        inst.mark_site(block, ff.mid_site, hn.block_hook(layer, "mlp.hook_mid"), 0)
        inst.patch_norm(get_module(block, ff.act_norm), hn.norm_prefix(layer, "mlp.ln"), "layernorm")
    if ff.experts is not None:
        spec = ff.experts
        mlp = get_module(block, ff.path)
        tokens: list[tuple[int, int]] = []  # [b, p] of the MoE block's input: the router sees [b * p, d]

        def record(_mod, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            tokens[:] = [tuple(x.shape[:2])]
        inst.handles.append(mlp.register_forward_pre_hook(record, with_kwargs=True))
        _patch(inst, get_module(mlp, spec.router), _router_forward(tokens, layer, spec))
        _patch(inst, get_module(mlp, spec.experts), _experts_forward(spec))


def _patch(inst, module: nn.Module, forward) -> None:
    module.forward = types.MethodType(forward, module)
    inst.patched_forwards.append(module)


def _mark_tokens(x: torch.Tensor, tokens: list[tuple[int, int]], name: str) -> torch.Tensor:
    """Mark [b * p, n] as the [b, p, n] hook `name`."""
    return hook_marker(x.unflatten(0, tokens[0]), name).flatten(0, 1)


def _router_forward(tokens: list[tuple[int, int]], layer: int, spec: Experts):
    def forward(router: nn.Module, x: torch.Tensor):  # x: [b * p, d_model]
        logits = F.linear(x.reshape(-1, x.shape[-1]), router.weight)  # [b * p, n_experts]
        probs = _mark_tokens(torch.softmax(logits.float(), dim=-1), tokens,
                             hn.block_hook(layer, "mlp.hook_expert_weights"))
        weights, indices = torch.topk(probs, router.top_k, dim=-1)  # [b * p, k]
        if spec.normalise_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        indices = _mark_tokens(indices, tokens, hn.block_hook(layer, "mlp.hook_expert_indices"))
        return logits, weights, indices
    return forward


def _experts_forward(spec: Experts):
    def forward(experts: nn.Module, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor):
        """x [tokens, d_model], indices / weights [tokens, k] -> [tokens, d_model]: sum_k w_k expert_k(x)."""
        gate_up = getattr(experts, spec.gate_up)  # [n_experts, 2 * d_mlp, d_model]
        down = getattr(experts, spec.down)  # [n_experts, d_model, d_mlp]
        gate, up = torch.einsum("td,emd->tem", x, gate_up).chunk(2, dim=-1)  # [tokens, n_experts, d_mlp]
        out = torch.einsum("tem,edm->ted", experts.act_fn(gate) * up, down)  # [tokens, n_experts, d_model]
        one_hot = F.one_hot(indices, gate_up.shape[0]).to(weights.dtype)  # [tokens, k, n_experts]
        per_expert = (one_hot * weights[..., None]).sum(dim=1)  # [tokens, n_experts]: 0 where not chosen
        return (out * per_expert[..., None].to(out.dtype)).sum(dim=1).to(x.dtype)
    return forward
