"""TransformerLens-layout views of the block parts beyond the common layout (adapter-driven).

Keys (TransformerLens's names): blocks.L.ln1_post.w / ln2_post.w (post norms), blocks.L.attn.q_norm.w /
k_norm.w (q/k norms), blocks.L.mlp.ln.w / b (SoLU-LN's LayerNorm, folded into W_out), and for a mixture-of-experts MLP the router as blocks.L.mlp.W_gate
[d_model, n_experts] (TransformerLens's MoE names it so) and the experts stacked as
blocks.L.mlp.experts.W_gate / W_in [n_experts, d_model, d_mlp] and W_out [n_experts, d_mlp, d_model].
All are views of the HF parameters. fold_ln folds ln2 into the router and the experts; the post
and q/k norms read nothing linear that follows them, so they are never folded.
"""
from __future__ import annotations

import torch
from torch import nn

from fxhook.adapter import Adapter


def add_extra_weights(out: dict[str, torch.Tensor], block: nn.Module, adapter: Adapter, prefix: str) -> None:
    norms = adapter.norms
    for path, key in ((norms.ln1_post, "ln1_post"), (norms.ln2_post, "ln2_post"),
                      (norms.q_norm, "attn.q_norm"), (norms.k_norm, "attn.k_norm"),
                      (adapter.feed_forward.act_norm, "mlp.ln")):
        if path is None:
            continue
        module = block.get_submodule(path)
        for leaf, short in (("weight", "w"), ("bias", "b")):
            value = getattr(module, leaf, None)
            if value is not None:
                out[f"{prefix}{key}.{short}"] = value
    spec = adapter.feed_forward.experts
    if spec is None:
        return
    mlp = block.get_submodule(adapter.feed_forward.path)
    experts = mlp.get_submodule(spec.experts)
    gate_up = getattr(experts, spec.gate_up)  # [n_experts, 2 * d_mlp, d_model]
    d_mlp = gate_up.shape[1] // 2
    out[prefix + "mlp.W_gate"] = mlp.get_submodule(spec.router).weight.t()
    out[prefix + "mlp.experts.W_gate"] = gate_up[:, :d_mlp].transpose(1, 2)
    out[prefix + "mlp.experts.W_in"] = gate_up[:, d_mlp:].transpose(1, 2)
    out[prefix + "mlp.experts.W_out"] = getattr(experts, spec.down).transpose(1, 2)
