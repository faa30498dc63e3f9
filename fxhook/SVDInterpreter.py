"""TransformerLens's `SVDInterpreter`: the top singular directions of a head's OV circuit or of an MLP's
input / output weights, read out through the unembedding.

`from fxhook import SVDInterpreter` (or `from fxhook.SVDInterpreter import SVDInterpreter`) where a
notebook used TransformerLens's. It reads fxhook's TransformerLens-layout weight views, so it works
on every architecture fxhook loads (grouped-query attention included: W_V is repeated to the query
heads, as TransformerLens's `W_V` view does). Bad indices raise a ValueError (TransformerLens asserts).
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

import torch

from fxhook.factored_matrix import FactoredMatrix
from fxhook.core.hook_names import block_name

OUTPUT_EMBEDDING = "unembed.W_U"
VECTOR_TYPES = ["OV", "w_in", "w_out"]


class SVDInterpreter:
    """Singular vectors of a model's OV, W_in and W_out matrices, projected onto the vocabulary."""

    def __init__(self, model: Any):
        self.model = model
        self.cfg = model.cfg
        # TransformerLens keys ("blocks.0.attn.W_V", "unembed.W_U", ...): fxhook's live weight views, or a
        # TransformerLens model's own parameters
        if hasattr(model, "live_weights"):
            self.params = model.live_weights()
        else:
            self.params = dict(model.named_parameters())

    def get_singular_vectors(
        self,
        vector_type: Union[Literal["OV"], Literal["w_in"], Literal["w_out"]],
        layer_index: int,
        num_vectors: int = 10,
        head_index: Optional[int] = None,
    ) -> torch.Tensor:
        """The first `num_vectors` right singular vectors of the chosen matrix, each multiplied by W_U
        -> [d_vocab, 1, num_vectors] (one logit-space direction per column).

        vector_type: "OV" (layer `layer_index`, head `head_index`: W_V[h] @ W_O[h]), "w_in" (W_in^T scaled by
        ln2's weight when that norm is not folded) or "w_out" (W_out); head_index only for "OV".
        """
        if vector_type not in VECTOR_TYPES:
            raise ValueError(f"Vector type must be in {VECTOR_TYPES}, instead got {vector_type!r}")
        if head_index is None and vector_type == "OV":
            raise ValueError(f"Head index optional only for w_in and w_out, got {vector_type}: pass head_index")
        if not isinstance(num_vectors, int) or num_vectors < 1:
            raise ValueError(f"num_vectors must be a positive int; got {num_vectors!r}")
        self._check_layer(layer_index)
        V: Union[torch.Tensor, FactoredMatrix]  # rows: right singular vectors, [rank, d_model]
        if vector_type == "OV":
            assert head_index is not None
            V = self._get_OV_matrix(layer_index, head_index).V.T
        elif vector_type == "w_in":
            V = torch.linalg.svd(self._get_w_in_matrix(layer_index))[2]
        else:
            V = torch.linalg.svd(self._get_w_out_matrix(layer_index))[2]
        if num_vectors > V.shape[0]:
            raise ValueError(f"num_vectors={num_vectors} exceeds the {V.shape[0]} singular vectors of this "
                             f"{vector_type} matrix")
        return self._get_singular_vectors_from_matrix(V, self._weight(OUTPUT_EMBEDDING), num_vectors)

    def _get_singular_vectors_from_matrix(self, V: Union[torch.Tensor, FactoredMatrix], embedding: torch.Tensor,
                                          num_vectors: int = 10) -> torch.Tensor:
        """V [rank, d_model], embedding [d_model, d_vocab] -> [d_vocab, 1, num_vectors]."""
        rows = V[:num_vectors, :]
        if isinstance(rows, FactoredMatrix):
            rows = rows.AB
        vectors = rows.float() @ embedding  # [num_vectors, d_vocab]
        return vectors.T.unsqueeze(1)

    def _check_layer(self, layer_index: int) -> None:
        if not 0 <= layer_index < self.cfg.n_layers:
            raise ValueError(f"Layer index must be between 0 and {self.cfg.n_layers - 1} but got {layer_index}")

    def _weight(self, key: str) -> torch.Tensor:
        if key in self.params:
            return self.params[key]
        raise ValueError(f"this model has no weight {key!r}, which SVDInterpreter needs")

    def _get_OV_matrix(self, layer_index: int, head_index: int) -> FactoredMatrix:
        """W_V[head] [d_model, d_head] @ W_O[head] [d_head, d_model] of one layer, factored."""
        self._check_layer(layer_index)
        if not 0 <= head_index < self.cfg.n_heads:
            raise ValueError(f"Head index must be between 0 and {self.cfg.n_heads - 1} but got {head_index}")
        W_V = self._value_weight(layer_index)  # [n_heads, d_model, d_head]
        W_O = self._weight(block_name(layer_index, "attn.W_O"))  # [n_heads, d_head, d_model]
        return FactoredMatrix(W_V[head_index], W_O[head_index])

    def _value_weight(self, layer_index: int) -> torch.Tensor:
        """W_V of one layer at query heads [n_heads, d_model, d_head] (kv heads repeated under GQA)."""
        W_V = self._weight(block_name(layer_index, "attn.W_V"))
        if W_V.shape[0] != self.cfg.n_heads:
            W_V = W_V.repeat_interleave(self.cfg.n_heads // W_V.shape[0], dim=0)
        return W_V

    def _get_w_in_matrix(self, layer_index: int) -> torch.Tensor:
        """W_in^T [d_mlp, d_model], times ln2's weight when the norm is not folded into it."""
        self._check_layer(layer_index)
        w_in = self._weight(block_name(layer_index, "mlp.W_in")).T
        ln2 = self.params.get(block_name(layer_index, "ln2.w"))
        return w_in * ln2 if ln2 is not None else w_in

    def _get_w_out_matrix(self, layer_index: int) -> torch.Tensor:
        """W_out [d_mlp, d_model]."""
        self._check_layer(layer_index)
        return self._weight(block_name(layer_index, "mlp.W_out"))
