"""Weight canonicalisation as pure functions: TransformerLens-layout weight dict in, new dict out.

Each function does one thing and leaves the model's function unchanged
(log-probabilities exactly; logits too except center_unembed, which shifts
every logit of a position by the same amount).
"""
from __future__ import annotations

import torch

from fxhook.core.hook_names import block_name, block_prefix, leaf_of

Weights = dict[str, torch.Tensor]

_READERS = {  # norm -> the (weight, bias) pairs that read its output
    "ln1": (("attn.W_Q", "attn.b_Q"), ("attn.W_K", "attn.b_K"), ("attn.W_V", "attn.b_V")),
    "ln2": (("mlp.W_in", "mlp.b_in"), ("mlp.W_gate", "mlp.b_gate"),
            ("mlp.experts.W_in", "mlp.experts.b_in"), ("mlp.experts.W_gate", "mlp.experts.b_gate")),
}


def _fold_norm(sd: Weights, norm: str, readers: list[tuple[str, str]], norm_kind: str) -> None:
    weight, bias = sd.get(norm + ".w"), sd.get(norm + ".b")
    scale = None if weight is None else (1.0 + weight if norm_kind == "rmsnorm_plus_one" else weight)
    for w_key, b_key in readers:
        if w_key not in sd:
            continue
        w = sd[w_key]  # [..., d_model, out]
        if bias is not None:
            sd[b_key] = sd.get(b_key, 0.0) + (bias[:, None] * w).sum(-2)
        if scale is not None:
            w = w * scale[:, None]
        if norm_kind == "layernorm":  # the normalised input has mean 0: centre the readers too
            w = w - w.mean(-2, keepdim=True)
        sd[w_key] = w
    if weight is not None:
        sd[norm + ".w"] = torch.full_like(weight, 0.0 if norm_kind == "rmsnorm_plus_one" else 1.0)
    if bias is not None:
        sd[norm + ".b"] = torch.zeros_like(bias)


def fold_layer_norm(sd: Weights, n_layers: int, norm_kind: str) -> Weights:
    """Fold each norm's weight (and bias) into the projections that read it."""
    sd = dict(sd)
    for layer in range(n_layers):
        p = block_prefix(layer)
        for norm, readers in _READERS.items():
            _fold_norm(sd, p + norm, [(p + w, p + b) for w, b in readers], norm_kind)
        if p + "mlp.ln.w" in sd:  # SoLU-LN's LayerNorm (always a LayerNorm) feeds W_out
            _fold_norm(sd, p + "mlp.ln", [(p + "mlp.W_out", p + "mlp.b_out")], "layernorm")
    _fold_norm(sd, "ln_final", [("unembed.W_U", "unembed.b_U")], norm_kind)
    return sd


def _centre_last(sd: Weights, key: str) -> None:
    if key in sd:
        sd[key] = sd[key] - sd[key].mean(-1, keepdim=True)


def center_writing_weights(sd: Weights, n_layers: int, pos_in_residual: bool = True) -> Weights:
    """Weights writing to the residual stream get zero mean along d_model (LayerNorm models only:
    the next LayerNorm removes that mean anyway). `pos_in_residual` False (shortformer): W_pos is added
    after the norm, to the query/key inputs, so it is left alone."""
    sd = dict(sd)
    for key in ("embed.W_E", "pos_embed.W_pos") if pos_in_residual else ("embed.W_E",):
        _centre_last(sd, key)
    for layer in range(n_layers):
        for key in ("attn.W_O", "attn.b_O", "mlp.W_out", "mlp.b_out"):
            _centre_last(sd, block_name(layer, key))
    return sd


def center_unembed(sd: Weights) -> Weights:
    """W_U (and b_U) get zero mean over the vocabulary: logits shift by a per-position constant."""
    sd = dict(sd)
    _centre_last(sd, "unembed.W_U")
    _centre_last(sd, "unembed.b_U")
    return sd


def fold_value_biases(sd: Weights, n_layers: int, n_heads: int) -> Weights:
    """b_O += sum over heads of b_V @ W_O, then b_V = 0: pattern rows sum to 1, so a value bias
    reaches the output as a constant."""
    sd = dict(sd)
    for layer in range(n_layers):
        p = block_name(layer, "attn.")
        if p + "b_V" not in sd:
            continue
        b_v = sd[p + "b_V"]  # [kv_heads, d_head]
        per_head = b_v.repeat_interleave(n_heads // b_v.shape[0], dim=0)  # [heads, d_head]
        sd[p + "b_O"] = sd.get(p + "b_O", 0.0) + torch.einsum("hd,hdm->m", per_head, sd[p + "W_O"])
        sd[p + "b_V"] = torch.zeros_like(b_v)
    return sd


def _balanced_factors(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For M = a @ b.T ([h, n, n]), return (U sqrt(S), V sqrt(S)) of rank `rank`: same product,
    orthogonal columns, equal norms on both sides."""
    u, s, vh = torch.linalg.svd(a @ b.transpose(-1, -2))
    root = s[..., :rank].sqrt()[..., None, :]
    return u[..., :rank] * root, vh[..., :rank, :].transpose(-1, -2) * root


def _is_attention_weight(key: str) -> bool:
    """An attention weight or bias the refactoring reads."""
    return leaf_of(key) in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")


def refactor_factored_attn_matrices(sd: Weights, n_layers: int, n_heads: int, rotary: bool) -> Weights:
    """Re-factor W_QK and W_OV by SVD (TransformerLens's experimental refactoring): W_O becomes an
    isometry, W_Q and W_K columns pair up with equal norms. Biases ride along as an extra input
    coordinate that is always 1."""
    if rotary:
        raise ValueError("refactor_factored_attn_matrices needs position-independent QK circuits; "
                         "with rotary embeddings W_QK depends on the positions")
    for key, value in sd.items():
        if _is_attention_weight(key) and not bool(torch.isfinite(value).all()):
            raise ValueError(f"refactor_factored_attn_matrices: {key} has non-finite values (inf or NaN), which "
                             f"no SVD can factor; fix the weights or leave the refactoring off")
    sd = fold_value_biases(sd, n_layers, n_heads)
    for layer in range(n_layers):
        p = block_name(layer, "attn.")
        w_q, w_k = sd[p + "W_Q"], sd[p + "W_K"]  # [h, d_model, d_head]
        if w_k.shape[0] != w_q.shape[0]:
            raise ValueError("refactor_factored_attn_matrices does not support grouped-query attention")
        d_head = w_q.shape[-1]
        zeros = torch.zeros(w_q.shape[0], d_head, dtype=w_q.dtype, device=w_q.device)
        q_eff = torch.cat([w_q, sd.get(p + "b_Q", zeros)[:, None]], dim=1)  # [h, d_model + 1, d_head]
        k_eff = torch.cat([w_k, sd.get(p + "b_K", zeros)[:, None]], dim=1)
        q_new, k_new = _balanced_factors(q_eff, k_eff, d_head)
        sd[p + "W_Q"], sd[p + "b_Q"] = q_new[:, :-1], q_new[:, -1]
        sd[p + "W_K"], sd[p + "b_K"] = k_new[:, :-1], k_new[:, -1]
        u, s, vh = torch.linalg.svd(sd[p + "W_V"] @ sd[p + "W_O"])  # [h, d_model, d_model]
        sd[p + "W_V"] = u[..., :d_head] * s[..., None, :d_head]
        sd[p + "W_O"] = vh[..., :d_head, :]
    return sd
