"""The rest of TransformerLens's HookedTransformer methods, each as thin as fxhook's design allows:
the loss, embeddings of an input, position offsets, re-initialisation, and the weight-processing steps
on a TransformerLens-layout state dict (state dict in, new state dict out, as TransformerLens's)."""
from __future__ import annotations

from typing import Any

import torch

from fxhook.core.hook_names import block_prefix, leaf_of
from fxhook.processing import transforms
from fxhook.runtime.loss import lm_cross_entropy_loss

Weights = dict[str, torch.Tensor]
_MATRICES = {"W_Q", "W_K", "W_V", "W_O", "_W_K", "_W_V", "W_in", "W_gate", "W_out"}
_NORM_READERS = {"ln1": ("attn.W_Q", "attn.W_K", "attn.W_V", "attn._W_K", "attn._W_V"),
                 "ln2": ("mlp.W_in", "mlp.W_gate")}


def _bias_of(weight_key: str) -> str:
    """blocks.0.attn.W_Q -> blocks.0.attn.b_Q"""
    leaf = leaf_of(weight_key)
    return weight_key[: -len(leaf)] + leaf.replace("W_", "b_")


def fold_norm_into_readers(sd: Weights, norm: str, readers: list[str], fold_bias: bool, centre: bool) -> None:
    """Fold norm `norm`'s weight (and bias when fold_bias) into the [..., d_model, out] weights that read its
    output, centre those weights along d_model when `centre`; the norm is left neutral (weight one, bias zero
    once folded), as TransformerLens 3.9 leaves it."""
    weight, bias = sd.pop(norm + ".w", None), sd.pop(norm + ".b", None)
    for key in readers:
        if key not in sd:
            continue
        w = sd[key]
        if fold_bias and bias is not None:
            b_key = _bias_of(key)
            sd[b_key] = sd.get(b_key, torch.zeros(w.shape[:-2] + w.shape[-1:], dtype=w.dtype, device=w.device)) + \
                (bias[:, None] * w).sum(-2)
        if weight is not None:
            w = w * weight[:, None]
        if centre:
            w = w - w.mean(-2, keepdim=True)
        sd[key] = w
    if weight is not None:
        sd[norm + ".w"] = torch.ones_like(weight)
    if bias is not None:
        sd[norm + ".b"] = torch.zeros_like(bias) if fold_bias else bias


class LensMethodsMixin:
    """Methods of TransformerLens's HookedTransformer that fxhook implements on its own terms."""

    def loss_fn(self, logits: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                per_token: bool = False) -> torch.Tensor:
        """Next-token cross entropy of logits [batch, pos, d_vocab] on tokens [batch, pos]."""
        return lm_cross_entropy_loss(logits, tokens, attention_mask, per_token)

    def get_pos_offset(self, past_kv_cache: Any, batch_size: int) -> int:
        """How many positions the cache already holds (0 without a cache)."""
        if past_kv_cache is None:
            return 0
        cached_batch = getattr(past_kv_cache, "batch_size", batch_size)
        if cached_batch != batch_size:
            raise ValueError(f"the cache holds a batch of {cached_batch} rows, the input has {batch_size}")
        return past_kv_cache.past_length

    def train(self, mode: bool = True):
        """Set the training flag (nn.Module.train). The captured graph is skipped: torch.export's modules
        refuse train(), and the graph was captured without dropout, so it computes the same either way."""
        self.training = mode
        captured = self._modules.get("captured")
        for child in self.children():
            if child is not captured:
                child.train(mode)
        return self

    def __deepcopy__(self, memo: dict):
        """An independent copy: the HF model's weights copied and captured anew; the tokenizer, adapter and
        compile options shared; model-wide hooks not copied (attach them to the copy)."""
        import copy

        clone = type(self)(copy.deepcopy(self.cfg, memo), self.tokenizer, hf_model=copy.deepcopy(self.hf_model, memo),
                           adapter=self.adapter)
        if self.compile_options is not None:
            clone.graphs.compile_options = self.compile_options
        if self.graphs.placement is not None:  # a model split across devices stays split
            clone.graphs.set_placement(self.graphs.placement)
        memo[id(self)] = clone
        return clone

    def mps(self):
        """Move to Apple's MPS device (which may compute some kernels wrongly: see utils.warn_if_mps)."""
        return self.to(torch.device("mps"))

    def init_weights(self) -> None:
        """Draw every weight again as TransformerLens initialises a new model (cfg.init_mode,
        cfg.initializer_range, cfg.seed), in place: biases zero, norm weights one."""
        from fxhook.from_config import init_weights

        with torch.no_grad():
            init_weights(self.hf_model, self.cfg, self.adapter)
        self.graphs.clear(keep_capture=True)

    def input_to_embed(self, input: Any, prepend_bos: bool | None = None, padding_side: str | None = None,
                       attention_mask: torch.Tensor | None = None, past_kv_cache: Any = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(residual [batch, pos, d_model] entering block 0, tokens, shortformer_pos_embed or None,
        attention_mask or None), as the model computes them."""
        if past_kv_cache is not None:
            raise ValueError("input_to_embed with past_kv_cache is not supported: run the model with the cache")
        tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side) \
            if isinstance(input, (str, list)) else input
        if attention_mask is None and isinstance(input, (str, list)):
            attention_mask = self.default_attention_mask(tokens, prepend_bos=prepend_bos, padding_side=padding_side)
        shortformer = self.cfg.positional_embedding_type == "shortformer"
        residual, cache = self.run_with_cache(tokens, names_filter=["hook_pos_embed"] if shortformer else [],
                                              stop_at_layer=0, attention_mask=attention_mask)  # [b, p, d_model]
        return residual, tokens, cache["hook_pos_embed"] if shortformer else None, attention_mask

    def get_residual(self, embed: torch.Tensor, pos_offset: int, prepend_bos: bool | None = None,
                     attention_mask: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
                     return_shortformer_pos_embed: bool = True, device: Any = None):
        """The residual stream entering block 0 from a token embedding [batch, pos, d_model]: plus learned
        positions (standard), unchanged (rotary, ALiBi), or unchanged with the positions returned apart
        (shortformer). Returns (residual, shortformer_pos_embed) unless return_shortformer_pos_embed=False."""
        kind = self.cfg.positional_embedding_type
        shortformer = None
        if kind in ("standard", "shortformer"):
            if tokens is None:
                tokens = torch.ones(embed.shape[:2], dtype=torch.long, device=embed.device)
            positions = self.pos_embed(tokens, pos_offset, attention_mask).to(embed.device)
            residual, shortformer = (embed + positions, None) if kind == "standard" else (embed, positions)
        else:
            residual = embed
        if device is not None:
            residual = residual.to(device)
        return (residual, shortformer) if return_shortformer_pos_embed else residual

    def fill_missing_keys(self, state_dict: Weights) -> Weights:
        """`state_dict` (TransformerLens layout) with the weights it lacks taken from this model, so it can
        be loaded whole. A missing attention or MLP matrix is refused: filling it would silently change what
        a sublayer computes. Filled norm weights and biases are named in a warning."""
        import warnings

        current = self.live_weights()
        missing = sorted(set(current) - set(state_dict))
        matrices = [key for key in missing if leaf_of(key) in _MATRICES]
        if matrices:
            raise ValueError(f"the state dict lacks weight matrices this model needs: {matrices[:6]}; check the "
                             "key names (TransformerLens layout, e.g. blocks.0.attn.W_Q)")
        filled = dict(state_dict)
        for key in missing:
            filled[key] = current[key].detach().clone()
        if missing:
            warnings.warn(f"filled {len(missing)} missing weights from the model's own: {missing[:6]}", stacklevel=2)
        return filled

    # ------------------------------------------------------------- weight processing on a state dict
    def fold_layer_norm(self, state_dict: Weights, fold_biases: bool = True, center_weights: bool = True) -> Weights:
        """Each norm's weight (and bias) folded into the weights reading it, and those centred along d_model
        when center_weights; the norms' keys are dropped (LayerNorm models: all on; RMSNorm: both off)."""
        sd = dict(state_dict)
        for layer in range(self.cfg.n_layers):
            p = block_prefix(layer)
            for norm, readers in _NORM_READERS.items():
                fold_norm_into_readers(sd, p + norm, [p + r for r in readers], fold_biases, center_weights)
        fold_norm_into_readers(sd, "ln_final", ["unembed.W_U"], fold_biases, center_weights)
        return sd

    def center_writing_weights(self, state_dict: Weights) -> Weights:
        """Weights writing to the residual stream centred along d_model (the next LayerNorm removes the mean)."""
        return transforms.center_writing_weights(state_dict, self.cfg.n_layers,
                                                 pos_in_residual=self.cfg.positional_embedding_type != "shortformer")

    def center_unembed(self, state_dict: Weights) -> Weights:
        """W_U and b_U centred over the vocabulary (log-probabilities unchanged)."""
        return transforms.center_unembed(state_dict)

    def fold_value_biases(self, state_dict: Weights) -> Weights:
        """b_O += sum over heads of b_V @ W_O, and b_V = 0."""
        sd = {key.replace("._b_V", ".b_V").replace("._W_V", ".W_V"): value for key, value in state_dict.items()}
        return transforms.fold_value_biases(sd, self.cfg.n_layers, self.cfg.n_heads)

    def refactor_factored_attn_matrices(self, state_dict: Weights) -> Weights:
        """W_QK and W_OV re-factored by SVD (TransformerLens's experimental refactoring)."""
        return transforms.refactor_factored_attn_matrices(state_dict, self.cfg.n_layers, self.cfg.n_heads,
                                                          rotary=self.cfg.positional_embedding_type == "rotary")
