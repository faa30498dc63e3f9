"""TransformerLens's top-level components as views: `model.embed`, `model.pos_embed`, `model.unembed`,
`model.ln_final`, `model.hook_embed`, `model.hook_pos_embed`, `model.hook_tokens` (`model.unembed.hook_in` /
`hook_out` come with the unembedding's view).

fxhook has no Embed / Unembed modules of its own (the HF model's modules run inside the captured graph),
so each view reads the live TransformerLens-layout weights (`embed.W_E`, `unembed.W_U`, ...) and, called,
computes what TransformerLens's component computes: the token embedding as the graph's own hook_embed
value, learned positions from W_pos with TransformerLens's padding rule, the unembedding from W_U and b_U,
the final norm through the HF norm module itself.
"""
from __future__ import annotations

from typing import Any

import torch

from fxhook.adapter import get_module
from fxhook.runtime.views import WeightNamespace


class _ComponentView(WeightNamespace):
    """A named group of weights (by TransformerLens short name) and hook points of one component."""

    prefix = ""

    def __init__(self, model: Any):
        super().__init__(model, self.prefix, {})

    def parameters(self) -> list[torch.Tensor]:
        """The component's weights (views of the model's parameters)."""
        return [w for key, w in self._model._current_weights().items() if key.startswith(self.prefix)]


class EmbedView(_ComponentView):
    prefix = "embed."

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [batch, pos] -> [batch, pos, d_model]: the token embedding (hook_embed's value)."""
        _, cache = self._model.run_with_cache(tokens, names_filter="hook_embed", stop_at_layer=0)
        return cache["hook_embed"]


class PosEmbedView(_ComponentView):
    prefix = "pos_embed."

    def __call__(self, tokens: torch.Tensor, past_kv_pos_offset: int = 0,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [batch, pos] -> [batch, pos, d_model]: learned positions counted from each row's first
        real token when attention_mask [batch, offset + pos] is given (zero at padding), else from
        past_kv_pos_offset."""
        W_pos = self.W_pos  # [n_ctx, d_model]
        batch, length = tokens.shape[0], tokens.shape[-1]
        if attention_mask is None:
            rows = W_pos[past_kv_pos_offset: past_kv_pos_offset + length]
            return rows.expand(batch, *rows.shape).clone()
        positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)[:, past_kv_pos_offset:]
        padding = ~attention_mask.bool()[:, past_kv_pos_offset: past_kv_pos_offset + length, None]
        return torch.where(padding, torch.zeros((), dtype=W_pos.dtype, device=W_pos.device), W_pos[positions])


class UnembedView(_ComponentView):
    prefix = "unembed."

    @property
    def b_U(self) -> torch.Tensor:
        return self._model.b_U

    def __call__(self, residual: torch.Tensor) -> torch.Tensor:
        """residual [batch, pos, d_model] -> logits [batch, pos, d_vocab_out]."""
        return residual @ self.W_U + self.b_U


class FinalNormView(_ComponentView):
    prefix = "ln_final."

    def __call__(self, residual: torch.Tensor) -> torch.Tensor:
        """residual [batch, pos, d_model] -> the final norm's output, by the HF norm module itself."""
        return get_module(self._model.hf_model, self._model.adapter.final_norm)(residual)


class ComponentViewsMixin:
    """model.embed, model.pos_embed, model.unembed, model.ln_final and the top-level hook points."""

    @property
    def embed(self) -> EmbedView:
        return EmbedView(self)

    @property
    def pos_embed(self) -> PosEmbedView:
        if "pos_embed.W_pos" not in self._current_weights():
            raise AttributeError(f"this model has {self.cfg.positional_embedding_type} positions: no pos_embed "
                                 "(as in TransformerLens, which builds none for rotary models)")
        return PosEmbedView(self)

    @property
    def unembed(self) -> UnembedView:
        return UnembedView(self)

    @property
    def ln_final(self) -> FinalNormView:
        return FinalNormView(self)

    @property
    def hook_embed(self):
        return self.hook_dict["hook_embed"]

    @property
    def hook_tokens(self):
        points = self.hook_dict
        if "hook_tokens" not in points:
            raise AttributeError("no hook_tokens: it exists only while use_hook_tokens is on "
                                 "(model.cfg.use_hook_tokens = True)")
        return points["hook_tokens"]

    @property
    def hook_pos_embed(self):
        points = self.hook_dict
        if "hook_pos_embed" not in points:
            raise AttributeError("this model adds no position embedding to the residual stream: no hook_pos_embed")
        return points["hook_pos_embed"]
