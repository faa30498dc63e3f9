"""The residual stream seen from the cache: accumulated (logit lens), decomposed (attribution),
and scaled by the norm that reads it. TransformerLens 3.9 semantics and labels.

Shapes: `*bp` is the batch and position axes as they are after `pos_slice`
(no batch axis after `remove_batch_dim`, no position axis after an int pos_slice).
"""
from __future__ import annotations

from typing import Literal

import torch

from fxhook.analysis.slicing import Slice, SliceInput, as_slice
from fxhook.core.hook_names import norm_hook, norm_prefix

_NORMED = ("LN", "LNPre", "RMS", "RMSPre")


def _n_layers_if_default(model, layer: int | None) -> int:
    """None and -1 mean "the input of the unembedding", as in TransformerLens."""
    n = model.cfg.n_layers
    if layer is None or layer == -1:
        return n
    if not isinstance(layer, int) or not 0 <= layer <= n:
        raise ValueError(f"layer must be in [0, {n}] (n_layers means the unembedding), or -1/None; got {layer!r}")
    return layer


def final_norm(model, x: torch.Tensor) -> torch.Tensor:  # [..., d_model] -> [..., d_model]
    """The model's final norm recomputed on `x` (with its weight and bias where not folded)."""
    cfg = model.cfg
    kind = cfg.normalization_type
    if kind not in _NORMED:
        return x
    if kind in ("LN", "LNPre"):
        x = x - x.mean(dim=-1, keepdim=True)
    x = x / (x.pow(2).mean(dim=-1, keepdim=True) + cfg.eps).sqrt()
    if kind in ("LN", "RMS"):  # not folded: the norm still has its own weight (and bias)
        weights = model.live_weights()
        w = weights.get("ln_final.w")
        if w is not None:
            if model.adapter.norms.kind == "rmsnorm_plus_one":
                w = w + 1
            x = x * w
        if "ln_final.b" in weights:
            x = x + weights["ln_final.b"]
    return x


class ResidualMixin:
    """accumulated_resid, decompose_resid, apply_ln_to_stack, logit_attrs, stack_activation."""

    @property
    def has_embed(self) -> bool:
        return "hook_embed" in self.cache_dict

    @property
    def has_pos_embed(self) -> bool:
        return "hook_pos_embed" in self.cache_dict

    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice: SliceInput = None, mlp_input: bool = False, return_labels: bool = False):
        """[layers_covered, *bp, d_model]: the residual stream entering each block up to `layer`
        ("{l}_pre", "{l}_mid" with incl_mid, "final_post" when layer is n_layers): the logit lens.

        apply_ln: scale as the norm that reads `layer` does; for the full stack each entry gets
        the final norm recomputed on itself (what the unembedding would see from it).
        """
        n = self.model.cfg.n_layers
        layer = _n_layers_if_default(self.model, layer)
        pos = as_slice(pos_slice)
        parts: list[torch.Tensor] = []
        labels: list[str] = []
        for l in range(layer + 1):
            if l == n:
                parts.append(self[("resid_post", n - 1)])
                labels.append("final_post")
                break
            parts.append(self[("resid_pre", l)])
            labels.append(f"{l}_pre")
            if (incl_mid and l < layer) or (mlp_input and l == layer):
                parts.append(self[("resid_mid", l)])
                labels.append(f"{l}_mid")
        stack = torch.stack([pos.apply(p, dim=-2) for p in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos,
                                           has_batch_dim=self.has_batch_dim, recompute_ln=layer == n)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False,
                        mode: Literal["all", "mlp", "attn"] = "all", apply_ln: bool = False,
                        pos_slice: SliceInput = None, incl_embeds: bool = True, return_labels: bool = False):
        """[components, *bp, d_model]: the outputs that sum to the residual stream entering `layer`
        ("embed", "pos_embed", "{l}_attn_out", "{l}_mlp_out"); layer n_layers sums to the last resid_post."""
        if mode not in ("all", "mlp", "attn"):
            raise ValueError(f"mode must be 'all', 'mlp' or 'attn', got {mode!r}")
        layer = _n_layers_if_default(self.model, layer)
        if mlp_input and layer == self.model.cfg.n_layers:
            raise ValueError("mlp_input needs a block's MLP, but layer is n_layers (the unembedding)")
        pos = as_slice(pos_slice)
        with_attn = mode != "mlp"
        with_mlp = mode != "attn" and not self.model.cfg.attn_only
        parts: list[torch.Tensor] = []
        labels: list[str] = []
        if incl_embeds:
            for key, label, present in (("hook_embed", "embed", self.has_embed),
                                        ("hook_pos_embed", "pos_embed", self.has_pos_embed)):
                if present:
                    parts.append(self[key])
                    labels.append(label)
        for l in range(layer):
            if with_attn:
                parts.append(self[("attn_out", l)])
                labels.append(f"{l}_attn_out")
            if with_mlp:
                parts.append(self[("mlp_out", l)])
                labels.append(f"{l}_mlp_out")
        if mlp_input and with_attn:
            parts.append(self[("attn_out", layer)])
            labels.append(f"{layer}_attn_out")
        if not parts:
            raise ValueError("nothing to decompose: layer 0 without embeddings selects no component")
        stack = torch.stack([pos.apply(p, dim=-2) for p in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos)
        return (stack, labels) if return_labels else stack

    def _cached_scale(self, layer: int, mlp_input: bool, pos: Slice, batch: Slice) -> torch.Tensor:
        """[*bp, 1]: the norm scale the cache recorded where `layer` (or the unembedding) reads."""
        if layer == self.model.cfg.n_layers:
            key = norm_hook(norm_prefix(None, "ln_final"), "hook_scale")
        else:
            key = norm_hook(norm_prefix(layer, "ln2" if mlp_input else "ln1"), "hook_scale")
        if key not in self.cache_dict:
            raise KeyError(f"apply_ln needs {key!r} in the cache: run run_with_cache without a names_filter, or "
                           f"with one that keeps '{key}'")
        scale = pos.apply(self.cache_dict[key], dim=-2)
        if self.has_batch_dim:
            scale = batch.apply(scale, dim=0)
        return scale

    def apply_ln_to_stack(self, residual_stack: torch.Tensor, layer: int | None = None, mlp_input: bool = False,
                          pos_slice: SliceInput = None, batch_slice: SliceInput = None,
                          has_batch_dim: bool = True, recompute_ln: bool = False) -> torch.Tensor:
        """[components, *bp, d_model] -> the same, as the norm reading `layer` would scale each part.

        The norm is not linear, but with the scale the run recorded (one per batch item and
        position) it is, so the parts still add up: centre each part (LayerNorm only), divide by
        the cached scale. recompute_ln (final norm only): normalise each part on its own instead.
        pos_slice / batch_slice say which positions / batch items the stack already holds.
        """
        if self.model.cfg.normalization_type not in _NORMED:
            return residual_stack
        layer = _n_layers_if_default(self.model, layer)
        if mlp_input and layer == self.model.cfg.n_layers:
            raise ValueError("mlp_input reads a block's ln2, but layer is n_layers (the final norm)")
        pos, batch = as_slice(pos_slice), as_slice(batch_slice)
        if has_batch_dim:
            residual_stack = batch.apply(residual_stack, dim=1)
        if recompute_ln and layer == self.model.cfg.n_layers:
            return final_norm(self.model, residual_stack)
        if self.model.cfg.normalization_type in ("LN", "LNPre"):
            residual_stack = residual_stack - residual_stack.mean(dim=-1, keepdim=True)
        return residual_stack / self._cached_scale(layer, mlp_input, pos, batch)

    def _token_directions(self, tokens) -> tuple[torch.Tensor, tuple]:
        """(unembedding direction(s) [..., d_model], the tokens' shape) for an int, str or tensor."""
        if isinstance(tokens, str):
            tokens = self.model.to_single_token(tokens)
        if isinstance(tokens, int):
            return self.model.W_U[:, tokens], ()
        if isinstance(tokens, torch.Tensor):
            if tokens.numel() == 1:
                return self.model.W_U[:, int(tokens.item())], tuple(tokens.shape)
            return self.model.W_U[:, tokens.to(self.model.W_U.device)].movedim(0, -1), tuple(tokens.shape)
        raise TypeError(f"tokens must be a str, an int or a tensor of token ids, got {type(tokens).__name__}")

    def logit_attrs(self, residual_stack: torch.Tensor, tokens, incorrect_tokens=None,
                    pos_slice: SliceInput = None, batch_slice: SliceInput = None,
                    has_batch_dim: bool = True) -> torch.Tensor:
        """[components, *bp]: each part's direct contribution to the logit of `tokens` (minus that
        of `incorrect_tokens`), through the final norm's cached scale.

        With fold_ln, the parts of a full decomposition add up to the logit (difference) less b_U.
        """
        directions, shape = self._token_directions(tokens)
        if incorrect_tokens is not None:
            wrong, wrong_shape = self._token_directions(incorrect_tokens)
            if shape != wrong_shape:
                raise ValueError(f"tokens and incorrect_tokens must have the same shape, got {shape} and "
                                 f"{wrong_shape}")
            directions = directions - wrong
        scaled = self.apply_ln_to_stack(residual_stack, -1, pos_slice=pos_slice, batch_slice=batch_slice,
                                        has_batch_dim=has_batch_dim)
        return (scaled * directions).sum(dim=-1)

    def stack_activation(self, activation_name: str, layer: int = -1, sublayer_type: str | None = None
                         ) -> torch.Tensor:
        """[layers_covered, ...]: one activation (e.g. "pattern") of every block before `layer`."""
        layer = _n_layers_if_default(self.model, layer)
        if layer == 0:
            raise ValueError("stack_activation(layer=0) selects no block: pass a layer of at least 1")
        return torch.stack([self[(activation_name, l, sublayer_type)] for l in range(layer)])
