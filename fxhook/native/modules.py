"""The parts of the native TransformerLens model: norms, activations, attention, MLP (plain PyTorch).

Each computes what TransformerLens 3.9's component of the same name computes (norms in their
`hook_scale` form, rotary on halves or on adjacent pairs of the first `rotary_dim` dimensions, the gated
MLP's `b_in` added after the product), so a TransformerLens state dict gives TransformerLens's outputs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fxhook.core.attention_math import alibi_bias
from fxhook.native.config import TLNativeConfig


# ------------------------------------------------------------------ norms
class NativeNorm(nn.Module):
    """TransformerLens's LN / LNPre / RMS / RMSPre over the last axis; None: the identity.

    LN: (x - mean) / sqrt(var + eps) * w + b; RMS: x / sqrt(mean(x^2) + eps) * w; the Pre forms have no
    weights."""

    def __init__(self, normalization_type: str | None, length: int, eps: float):
        super().__init__()
        self.normalization_type = normalization_type
        self.eps = eps
        if normalization_type in ("LN", "RMS"):
            self.weight = nn.Parameter(torch.ones(length))
        if normalization_type == "LN":
            self.bias = nn.Parameter(torch.zeros(length))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., length]
        if self.normalization_type is None:
            return x
        if self.normalization_type.startswith("LN"):
            x = x - x.mean(-1, keepdim=True)
        x = x / (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
        if hasattr(self, "weight"):
            x = x * self.weight
        if hasattr(self, "bias"):
            x = x + self.bias
        return x


# ------------------------------------------------------------------ activations
def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _solu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.softmax(x, dim=-1)


_ACTIVATIONS = {
    "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "gelu_new": _gelu_new, "gelu_fast": _gelu_fast,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "solu": _solu, "solu_ln": _solu,
    "relu2": lambda x: F.relu(x).square(),
}


class Activation(nn.Module):
    """The MLP's activation as a module, so that its output is a module boundary (SoLU-LN's hook_mid)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.fn = _ACTIVATIONS[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class BiasAfterLinear(nn.Linear):
    """A linear map whose bias its owner adds later: the gated MLP's W_in, whose b_in TransformerLens adds
    after multiplying by the gate."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class NativeMLP(nn.Module):
    """TransformerLens's MLP, gated MLP or SoLU-LN MLP ([b, p, d_model] -> [b, p, d_model])."""

    def __init__(self, config: TLNativeConfig):
        super().__init__()
        d_model, d_mlp = config.d_model, config.d_mlp
        self.gated = config.gated_mlp
        if self.gated:
            self.gate_proj = nn.Linear(d_model, d_mlp, bias=False)  # W_gate (no bias in TransformerLens)
            self.up_proj = BiasAfterLinear(d_model, d_mlp)  # W_in, b_in
        else:
            self.in_proj = nn.Linear(d_model, d_mlp)
        self.act = Activation(config.act_fn)
        if config.act_fn == "solu_ln":  # SoLU's LayerNorm: weighted under LN, LNPre otherwise
            self.ln = NativeNorm("LN" if config.normalization_type == "LN" else "LNPre", d_mlp, config.eps)
        self.out_proj = nn.Linear(d_mlp, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            post = self.act(self.gate_proj(x)) * self.up_proj(x) + self.up_proj.bias  # [b, p, d_mlp]
        else:
            post = self.act(self.in_proj(x))
            if hasattr(self, "ln"):
                post = self.ln(post)
        return self.out_proj(post)


# ------------------------------------------------------------------ attention
def apply_rotary(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, base: float,
                 adjacent_pairs: bool) -> torch.Tensor:
    """Rotate the first `rotary_dim` dims of x [b, p, h, d_head] by positions [b, p] (TransformerLens's
    rotary: pairs (i, i + rotary_dim / 2), or (2i, 2i + 1) when `adjacent_pairs`)."""
    half = torch.arange(rotary_dim // 2, dtype=torch.float32, device=x.device)
    freq = base ** (half / (rotary_dim / 2))  # [rotary_dim / 2]
    freq = freq.repeat_interleave(2) if adjacent_pairs else freq.repeat(2)  # [rotary_dim]
    angles = positions.to(torch.float32)[..., None] / freq  # [b, p, rotary_dim]
    cos, sin = angles.cos()[:, :, None, :].to(x.dtype), angles.sin()[:, :, None, :].to(x.dtype)
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    if adjacent_pairs:
        flipped = torch.stack((-x_rot[..., 1::2], x_rot[..., 0::2]), dim=-1).flatten(-2)
    else:
        flipped = torch.cat((-x_rot[..., rotary_dim // 2:], x_rot[..., :rotary_dim // 2]), dim=-1)
    return torch.cat((x_rot * cos + flipped * sin, x_pass), dim=-1)


def alibi_slopes(n_heads: int) -> list[float]:
    """TransformerLens's ALiBi slope of each head: s, s^2, ..., s^n with s = 2^(-8 / n_heads), computed in
    float32 as TransformerLens computes them (so the bias is bit-equal to its)."""
    start = 2 ** (-8 / n_heads)
    return (start * (start ** torch.arange(n_heads))).tolist()


def eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor, scaling: float, alibi_slopes: list[float] | None = None,
                    **_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """q [b, h, p, d], k/v [b, kv, p_k, d], bool mask [b, 1, p, p_k] -> (z [b, p, h, d], pattern)."""
    n_rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)
    scores = (query @ key.transpose(-1, -2)) * scaling  # [b, h, p, p_k]
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, query, key, attention_mask).to(scores.dtype)
    scores = scores.masked_fill(~attention_mask, float("-inf"))
    pattern = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (pattern @ value).transpose(1, 2), pattern


class NativeAttention(nn.Module):
    """TransformerLens's attention (grouped-query when n_key_value_heads is set), its core routed through
    transformers' attention registry by `config._attn_implementation` (fxhook's during capture)."""

    def __init__(self, config: TLNativeConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        h, kv, d = config.n_heads, config.n_kv_heads, config.d_head
        self.q_proj = nn.Linear(config.d_model, h * d)
        self.k_proj = nn.Linear(config.d_model, kv * d)
        self.v_proj = nn.Linear(config.d_model, kv * d)
        self.o_proj = nn.Linear(h * d, config.d_model)
        if config.use_qk_norm:  # RMSNorm over d_head, per head, after hook_q / hook_k
            self.q_norm = NativeNorm("RMS", d, config.eps)
            self.k_norm = NativeNorm("RMS", d, config.eps)
        self.scaling = 1.0 / config.attn_scale
        self.sliding_window = config.window_of(layer_idx)
        # ALiBi: a per-head bias on the scores, handed to the attention function beside the mask
        self.alibi = {"alibi_slopes": alibi_slopes(h)} if config.positional_embedding_type == "alibi" else {}

    def forward(self, x: torch.Tensor, qk_input: torch.Tensor, position_ids: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """x: the value input, qk_input: the query/key input (x plus positions for shortformer), [b, p, d_model]."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        c = self.config
        b, p = x.shape[:2]
        q = self.q_proj(qk_input).unflatten(-1, (c.n_heads, c.d_head))  # [b, p, h, d_head]
        k = self.k_proj(qk_input).unflatten(-1, (c.n_kv_heads, c.d_head))
        v = self.v_proj(x).unflatten(-1, (c.n_kv_heads, c.d_head))
        if c.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if c.positional_embedding_type == "rotary":
            q = apply_rotary(q, position_ids, c.rotary_dim, c.rotary_base, c.rotary_adjacent_pairs)
            k = apply_rotary(k, position_ids, c.rotary_dim, c.rotary_base, c.rotary_adjacent_pairs)
        impl = c._attn_implementation
        if self.alibi and impl not in (None, "eager", "fxhook"):
            raise NotImplementedError(f"attention implementation {impl!r} takes no ALiBi bias: use 'eager'")
        attend = eager_attention if impl in (None, "eager") else ALL_ATTENTION_FUNCTIONS[impl]
        z, _ = attend(self, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, scaling=self.scaling,
                      dropout=0.0, sliding_window=self.sliding_window, **self.alibi)
        return self.o_proj(z.reshape(b, p, c.n_heads * c.d_head))
