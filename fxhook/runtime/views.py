"""Weight views with TransformerLens layouts, read live from the HF parameters.

Per-block views (`model.blocks[L].attn.W_Q`) are views of the parameters:
editing one in place (under torch.no_grad()) edits the model. Stacked views
(`model.W_Q` [n_layers, ...]) are stacks, hence copies, as in TransformerLens:
each read returns a new tensor, and editing it changes neither the model nor
later reads. W_K / W_V / b_K / b_V stacks repeat kv heads to n_heads, as
TransformerLens does.

Building the views of every layer costs milliseconds, so `WeightViews` keeps the
views built last with a key of the parameters' state (each parameter's identity,
version counter, data pointer and requires_grad, plus the grad mode), which one
walk of the module tree reads. An in-place edit (through a view or not) bumps a
version counter; `.to(...)` and replaced parameters change data pointers or
identities: any change makes the next read rebuild. The cached views keep their
parameters (and storage) alive, so an identity or a data pointer the key remembers
cannot be reused by another tensor. Stacks are not cached: each read must return
a new tensor anyway, and a cached stack would hold a second copy of the weights.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from fxhook.adapter import Adapter
from fxhook.config import HookedTransformerConfig
from fxhook.processing.weight_dict import live_weights
from fxhook.core.hook_names import block_name, block_prefix


def _absent_bias_shapes(cfg: HookedTransformerConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """Shapes of the biases a model may lack, by group: an absent bias reads as zeros."""
    return {"attn": {"b_Q": (cfg.n_heads, cfg.d_head), "b_K": (cfg.n_kv_heads, cfg.d_head),
                     "b_V": (cfg.n_kv_heads, cfg.d_head), "b_O": (cfg.d_model,)},
            "mlp": {"b_in": (cfg.d_mlp,), "b_out": (cfg.d_model,)}}


def _zeros_like_params(model, shape: tuple[int, ...]) -> torch.Tensor:
    p = next(model.parameters())
    return torch.zeros(shape, dtype=p.dtype, device=p.device)


class WeightNamespace:
    """`blocks[L].attn` and friends: weights by short name, hook points by their hook name."""

    def __init__(self, model, prefix: str, defaults: dict[str, tuple[int, ...]]):
        self._model, self._prefix, self._defaults = model, prefix, defaults

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        key = self._prefix + name
        weights = self._model._current_weights()
        if key in weights:
            return weights[key]
        if name in self._defaults:  # absent biases read as zeros (nothing to edit)
            return _zeros_like_params(self._model, self._defaults[name])
        points = self._model.hook_dict
        if key in points:
            return points[key]
        raise AttributeError(f"{key!r} is neither a weight nor a hook point of this model")

    def __repr__(self) -> str:
        return f"<{self._prefix.rstrip('.')} of {type(self._model).__name__}>"


class BlockView(WeightNamespace):
    def __init__(self, model, layer: int):
        defaults = _absent_bias_shapes(model.cfg)
        super().__init__(model, block_prefix(layer), {})
        self.layer = layer
        self.attn = WeightNamespace(model, block_name(layer, "attn."), defaults["attn"])
        self.mlp = WeightNamespace(model, block_name(layer, "mlp."), defaults["mlp"])
        self.ln1 = WeightNamespace(model, block_name(layer, "ln1."), {})
        self.ln2 = WeightNamespace(model, block_name(layer, "ln2."), {})


@functools.lru_cache(maxsize=256)
def _layer_keys(name: str, n_layers: int) -> tuple[str, ...]:
    """("blocks.0.attn.W_Q", ...) for a stacked view: made once, not on every read."""
    return tuple(block_name(layer, name) for layer in range(n_layers))


def _collect_versions(module: nn.Module, out: list) -> None:
    for p in module._parameters.values():
        if p is not None:
            out += (id(p), p._version, p.data_ptr(), p.requires_grad)
    for child in module._modules.values():
        if child is not None:
            _collect_versions(child, out)


def parameter_state(hf_model: nn.Module) -> list:
    """Identity, version counter, data pointer and requires_grad of every parameter, in one walk of the
    module tree (a few hundred microseconds for 24 layers, against milliseconds for rebuilding the views)."""
    out: list = []
    _collect_versions(hf_model, out)
    return out


class WeightViews:
    """One model's weight views and BlockViews, kept while the parameters are unchanged.

    Owned by the model (created on first use). Copying or pickling the model starts an empty cache:
    the cached views and BlockViews belong to the original.
    """

    def __init__(self) -> None:
        self._key: list | None = None
        self._weights: dict[str, torch.Tensor] = {}
        self._blocks_key: tuple | None = None
        self._blocks: list[BlockView] = []
        self.rebuilds = 0  # how often the views were rebuilt (tests count them)

    def weights(self, hf_model: nn.Module, adapter: Adapter, cfg: HookedTransformerConfig) -> dict[str, torch.Tensor]:
        """The live views (see processing.weight_dict.live_weights), rebuilt only when the key changed.

        The key holds the grad and inference modes too: views made under no_grad do not carry gradients."""
        key = [id(hf_model), id(adapter), id(cfg), cfg.n_heads, cfg.n_kv_heads, cfg.d_head,
               torch.is_grad_enabled(), torch.is_inference_mode_enabled()]
        key += parameter_state(hf_model)
        if key != self._key:
            self._weights = live_weights(hf_model, adapter, cfg)
            self._key = key
            self.rebuilds += 1
        return self._weights

    def blocks(self, model) -> list[BlockView]:
        """The model's BlockViews (a new list of the same stateless views, kept while the shapes hold)."""
        cfg = model.cfg
        key = (id(cfg), cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_model, cfg.d_mlp)
        if key != self._blocks_key:
            self._blocks = [BlockView(model, layer) for layer in range(cfg.n_layers)]
            self._blocks_key = key
        return list(self._blocks)

    def clear(self) -> None:
        """Drop the cached views (and the parameter storage they keep alive)."""
        self._key, self._weights = None, {}

    def __deepcopy__(self, memo) -> "WeightViews":
        return WeightViews()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


class WeightViewsMixin:
    """model.W_E, model.W_Q, model.QK, ... for HookedTransformer."""

    @property
    def weight_views(self) -> WeightViews:
        """The cache of this model's weight views (made on first use)."""
        views = self.__dict__.get("_weight_views")
        if views is None:
            views = self.__dict__["_weight_views"] = WeightViews()
        return views

    def _apply(self, fn, recurse=True):
        # a move or dtype change replaces every parameter's data: drop the old views now, so the old
        # storage is freed rather than kept alive until the next read
        self.weight_views.clear()
        return super()._apply(fn, recurse)

    def _current_weights(self) -> dict[str, torch.Tensor]:
        return self.weight_views.weights(self.hf_model, self.adapter, self.cfg)

    def live_weights(self) -> dict[str, torch.Tensor]:
        """Every weight in TransformerLens layout, as live views of the parameters (a new dict each call)."""
        return dict(self._current_weights())

    @property
    def blocks(self) -> list[BlockView]:
        return self.weight_views.blocks(self)

    def _stack(self, group: str, name: str, repeat_kv: bool = False) -> torch.Tensor:
        """[n_layers, ...] of one per-block view (a new tensor), from a single read of the cached views."""
        weights = self._current_weights()
        defaults = _absent_bias_shapes(self.cfg).get(group, {})
        parts = []
        for layer, key in enumerate(_layer_keys(f"{group}.{name}", self.cfg.n_layers)):
            if key in weights:
                parts.append(weights[key])
            elif name in defaults:
                parts.append(_zeros_like_params(self, defaults[name]))
            else:  # neither a weight nor an absent bias: the namespace raises its error
                parts.append(getattr(getattr(self.blocks[layer], group), name))
        stacked = torch.stack(parts)
        if repeat_kv and self.cfg.n_kv_heads != self.cfg.n_heads:
            stacked = stacked.repeat_interleave(self.cfg.n_heads // self.cfg.n_kv_heads, dim=1)
        return stacked

    # embeddings
    @property
    def W_E(self) -> torch.Tensor:  # [d_vocab, d_model]
        return self._current_weights()["embed.W_E"]

    @property
    def W_pos(self) -> torch.Tensor:  # [n_ctx, d_model]
        weights = self._current_weights()
        if "pos_embed.W_pos" not in weights:
            raise AttributeError(f"this model has {self.cfg.positional_embedding_type} positions: no W_pos")
        return weights["pos_embed.W_pos"]

    @property
    def W_E_pos(self) -> torch.Tensor:  # [d_vocab + n_ctx, d_model]
        return torch.cat([self.W_E, self.W_pos], dim=0)

    @property
    def W_U(self) -> torch.Tensor:  # [d_model, d_vocab]
        return self._current_weights()["unembed.W_U"]

    @property
    def b_U(self) -> torch.Tensor:  # [d_vocab]
        weights = self._current_weights()
        return weights.get("unembed.b_U", torch.zeros(self.cfg.d_vocab_out, dtype=self.W_U.dtype,
                                                      device=self.W_U.device))

    # attention, stacked over layers
    @property
    def W_Q(self) -> torch.Tensor:  # [n_layers, n_heads, d_model, d_head]
        return self._stack("attn", "W_Q")

    @property
    def W_K(self) -> torch.Tensor:
        return self._stack("attn", "W_K", repeat_kv=True)

    @property
    def W_V(self) -> torch.Tensor:
        return self._stack("attn", "W_V", repeat_kv=True)

    @property
    def W_O(self) -> torch.Tensor:  # [n_layers, n_heads, d_head, d_model]
        return self._stack("attn", "W_O")

    @property
    def b_Q(self) -> torch.Tensor:  # [n_layers, n_heads, d_head]
        return self._stack("attn", "b_Q")

    @property
    def b_K(self) -> torch.Tensor:
        return self._stack("attn", "b_K", repeat_kv=True)

    @property
    def b_V(self) -> torch.Tensor:
        return self._stack("attn", "b_V", repeat_kv=True)

    @property
    def b_O(self) -> torch.Tensor:  # [n_layers, d_model]
        return self._stack("attn", "b_O")

    # MLP, stacked over layers
    @property
    def W_in(self) -> torch.Tensor:  # [n_layers, d_model, d_mlp]
        return self._stack("mlp", "W_in")

    @property
    def W_gate(self) -> torch.Tensor | None:  # [n_layers, d_model, d_mlp]; None for an ungated MLP, as in TL
        return self._stack("mlp", "W_gate") if self.cfg.gated_mlp else None

    @property
    def W_out(self) -> torch.Tensor:  # [n_layers, d_mlp, d_model]
        return self._stack("mlp", "W_out")

    @property
    def b_in(self) -> torch.Tensor:
        return self._stack("mlp", "b_in")

    @property
    def b_out(self) -> torch.Tensor:
        return self._stack("mlp", "b_out")

    # factored circuits
    @property
    def QK(self):
        """FactoredMatrix [n_layers, n_heads, d_model, d_model]: W_Q @ W_K^T."""
        from fxhook.factored_matrix import FactoredMatrix

        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self):
        """FactoredMatrix [n_layers, n_heads, d_model, d_model]: W_V @ W_O."""
        from fxhook.factored_matrix import FactoredMatrix

        return FactoredMatrix(self.W_V, self.W_O)

    def all_head_labels(self) -> list[str]:
        return [f"L{l}H{h}" for l in range(self.cfg.n_layers) for h in range(self.cfg.n_heads)]

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
                         ) -> torch.Tensor:
        """[d_model]: the biases written to the residual stream before block `layer`
        (and its attention bias too, when mlp_input)."""
        total = torch.zeros(self.cfg.d_model, dtype=self.W_E.dtype, device=self.W_E.device)
        for block in self.blocks[:layer]:
            total = total + block.attn.b_O
            if include_mlp_biases:
                total = total + block.mlp.b_out
        if mlp_input:
            if layer >= self.cfg.n_layers:
                raise ValueError(f"mlp_input needs a layer below n_layers={self.cfg.n_layers}")
            total = total + self.blocks[layer].attn.b_O
        return total

    def all_composition_scores(self, mode: str) -> torch.Tensor:
        """[n_layers, n_heads, n_layers, n_heads]: how much each head's OV output is read by a later
        head's Q, K or V (Elhage et al. 2021); zero unless the second head is in a later layer."""
        left = self.OV
        rights = {"Q": lambda: self.QK, "K": lambda: self.QK.T, "V": lambda: self.OV}
        if mode not in rights:
            raise ValueError(f"mode must be 'Q', 'K' or 'V', got {mode!r}")
        right = rights[mode]()
        l_ab = left.AB[:, :, None, None]  # [L1, H1, 1, 1, d, d]
        r_ab = right.AB[None, None]  # [1, 1, L2, H2, d, d]
        scores = torch.linalg.matrix_norm(l_ab @ r_ab) / torch.linalg.matrix_norm(l_ab) / \
            torch.linalg.matrix_norm(r_ab)
        layers = torch.arange(self.cfg.n_layers, device=scores.device)
        later = layers[:, None, None, None] < layers[None, None, :, None]
        return torch.where(later, scores, torch.zeros_like(scores))

    def tokens_to_residual_directions(self, tokens) -> torch.Tensor:
        """The unembedding direction [..., d_model] of a token (int, string or tensor of ids)."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        if isinstance(tokens, int):
            return self.W_U[:, tokens]
        return self.W_U[:, tokens].movedim(0, -1)

    @property
    def n_params_total(self) -> int:
        """Every parameter in TransformerLens's layout, as TransformerLens counts its own model's: tied
        embeddings count twice (TL keeps W_U apart) and the biases a HF model lacks count as the zero
        parameters TransformerLens has (b_Q, b_K, b_V, b_O, b_in, b_out per block, b_U)."""
        weights = self._current_weights()
        total = sum(w.numel() for w in weights.values())
        for group, shapes in _absent_bias_shapes(self.cfg).items():
            for name, shape in shapes.items():
                if group == "mlp" and self.cfg.attn_only:
                    continue
                absent = sum(block_name(layer, f"{group}.{name}") not in weights for layer in range(self.cfg.n_layers))
                total += absent * math.prod(shape)
        return total + (0 if "unembed.b_U" in weights else self.cfg.d_vocab_out)
