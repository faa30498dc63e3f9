"""An ungrouped twin of a grouped-query-attention HF model.

TransformerLens's `ungroup_grouped_query_attention` gives hook_k / hook_v one
head per query head, so a hook can edit the keys one query head sees. We get
exactly that by capturing a twin whose k/v projections are the grouped ones
repeated per query head (same function, since GQA repeats k/v anyway). The
twin shares every other parameter with the original.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from fxhook.adapter import Adapter
from fxhook.weights import Projection


def _repeat_heads(t: torch.Tensor, proj: Projection, n_kv: int, n_rep: int) -> torch.Tensor:
    out_dim = 0 if proj.layout == "linear" or t.dim() == 1 else 1
    grouped = t.unflatten(out_dim, (n_kv, -1))
    return grouped.repeat_interleave(n_rep, dim=out_dim).flatten(out_dim, out_dim + 1)


def ungrouped_twin(hf_model: nn.Module, adapter: Adapter, n_heads: int, n_kv_heads: int) -> nn.Module:
    projections = [adapter.attention.k_proj, adapter.attention.v_proj]
    if any(p is None or p.n_chunks != 1 for p in projections):
        raise NotImplementedError(f"ungrouping needs separate k/v projections in the "
                                  f"{adapter.architectures[0]} adapter")
    n_rep = n_heads // n_kv_heads
    config = copy.deepcopy(hf_model.config)
    config.num_key_value_heads = n_heads
    with torch.device("meta"):
        twin = type(hf_model)(config)
    state = hf_model.state_dict(keep_vars=True)
    for i in range(len(hf_model.get_submodule(adapter.blocks))):
        for proj in projections:
            for leaf in ("weight", "bias"):
                key = f"{adapter.blocks}.{i}.{proj.module}.{leaf}"
                if key in state:
                    state[key] = nn.Parameter(_repeat_heads(state[key].detach(), proj, n_kv_heads, n_rep),
                                              requires_grad=state[key].requires_grad)
    twin.load_state_dict(state, assign=True, strict=True)
    for name, buffer in hf_model.named_buffers():
        module_path, _, leaf = name.rpartition(".")
        twin.get_submodule(module_path)._buffers[leaf] = buffer
    return twin.eval()
