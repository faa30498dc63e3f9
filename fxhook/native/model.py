"""The native TransformerLens decoder: embedding, blocks, final norm, unembedding, HF-style forward."""
from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from fxhook.native.config import TLNativeConfig
from fxhook.native.modules import NativeAttention, NativeMLP, NativeNorm


class NativeBlock(nn.Module):
    """A TransformerLens block: sequential, parallel (attention and MLP both read resid_pre) or attention-only."""

    def __init__(self, config: TLNativeConfig, layer: int):
        super().__init__()
        self.config = config
        self.ln1 = NativeNorm(config.normalization_type, config.d_model, config.eps)
        self.attn = NativeAttention(config, layer)
        if not config.attn_only:
            self.ln2 = NativeNorm(config.normalization_type, config.d_model, config.eps)
            self.mlp = NativeMLP(config)

    def forward(self, resid_pre: torch.Tensor, pos_embed: torch.Tensor | None, position_ids: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """resid_pre [b, p, d_model]; pos_embed: shortformer's positions, added to the query/key input only."""
        normed = self.ln1(resid_pre)
        qk_input = normed if pos_embed is None else normed + pos_embed
        attn_out = self.attn(normed, qk_input, position_ids, mask)
        if self.config.attn_only:
            return resid_pre + attn_out
        if self.config.parallel_attn_mlp:
            return resid_pre + attn_out + self.mlp(self.ln2(resid_pre))
        resid_mid = resid_pre + attn_out
        return resid_mid + self.mlp(self.ln2(resid_mid))


def attention_masks(attention_mask: torch.Tensor, config: TLNativeConfig) -> list[torch.Tensor]:
    """Each layer's boolean mask [b, 1, p, p] (True: attend): causal, padding, and the window of local layers."""
    p = attention_mask.shape[1]
    index = torch.arange(p, device=attention_mask.device)
    causal = index[None, :] <= index[:, None]  # [p_q, p_k]
    padding = attention_mask.bool()[:, None, None, :]
    masks = []
    for layer in range(config.n_layers):
        window = config.window_of(layer)
        allowed = causal if window is None else causal & (index[None, :] > index[:, None] - window)
        masks.append(allowed[None, None] & padding)
    return masks


class TLNativeForCausalLM(nn.Module):
    """A TransformerLens-architecture causal LM with a HF-style forward (input_ids, attention_mask,
    position_ids -> an output with `.logits`), so fxhook captures it as it captures HF models."""

    def __init__(self, config: TLNativeConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.d_vocab, config.d_model)
        if config.positional_embedding_type in ("standard", "shortformer"):
            self.pos_embed = nn.Embedding(config.n_ctx, config.d_model)
        self.blocks = nn.ModuleList(NativeBlock(config, layer) for layer in range(config.n_layers))
        self.ln_final = NativeNorm(config.normalization_type, config.d_model, config.eps)
        self.unembed = nn.Linear(config.d_model, config.d_vocab_out)
        if config.tie_word_embeddings:  # W_U is W_E transposed: one parameter (b_U stays its own)
            self.unembed.weight = self.embed.weight

    def set_attn_implementation(self, name: str | None) -> None:
        """Route the attention core through transformers' registered implementation `name` (HF's method)."""
        self.config._attn_implementation = name

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, use_cache: bool = False, **kwargs) -> CausalLMOutput:
        """input_ids [b, p] -> logits [b, p, d_vocab_out]."""
        if use_cache or kwargs:
            raise NotImplementedError(f"the native model takes no KV cache or extra arguments, got "
                                      f"use_cache={use_cache}, {sorted(kwargs)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        c = self.config
        resid = self.embed(input_ids)  # [b, p, d_model]
        shortformer = None
        if c.positional_embedding_type == "standard":
            resid = resid + self.pos_embed(position_ids)
        elif c.positional_embedding_type == "shortformer":
            shortformer = self.pos_embed(position_ids)
        for block, mask in zip(self.blocks, attention_masks(attention_mask, c)):
            resid = block(resid, shortformer, position_ids, mask)
        return CausalLMOutput(logits=self.unembed(self.ln_final(resid)))
