"""HookedTransformer: the object users hold, running fxhook's rewritten graph."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Literal, Sequence, Union

import torch
from torch import fx, nn

from fxhook.adapter import Adapter
from fxhook.compiler import GraphSpec, build_variant, capture_graph
from fxhook.config import HookedTransformerConfig
from fxhook.datasets import DatasetMixin
from fxhook.core.graph import hook_point_nodes
from fxhook.passes.expose_activations import ACTIVATION_NAMES
from fxhook.runtime.cache import ActivationCache
from fxhook.runtime.compiled import CompileMixin
from fxhook.runtime.generate import GenerationMixin
from fxhook.core.hook_point import HookPoint
from fxhook.runtime.hooks import HookRegistry, HookSpec, NameOrFilter
from fxhook.runtime.loading import LoadingMixin
from fxhook.runtime.tokens import TokenizerMixin
from fxhook.runtime.views import WeightViewsMixin
from fxhook.utils import lm_cross_entropy_loss

ModelInput = Union[str, list[str], torch.Tensor]
ReturnType = Literal["logits", "loss", "both"] | None


class Output(tuple):
    """(logits, loss), as TransformerLens returns for return_type="both"."""

    def __new__(cls, logits: torch.Tensor, loss: torch.Tensor):
        return super().__new__(cls, (logits, loss))

    @property
    def logits(self) -> torch.Tensor:
        return self[0]

    @property
    def loss(self) -> torch.Tensor:
        return self[1]


class HookedTransformer(LoadingMixin, TokenizerMixin, WeightViewsMixin, GenerationMixin, CompileMixin, DatasetMixin,
                        nn.Module):
    """A HF causal LM behind the TransformerLens HookedTransformer interface."""

    def __init__(self, cfg: HookedTransformerConfig, *, hf_model: nn.Module | None = None,
                 tokenizer=None, adapter: Adapter | None = None, processing: dict[str, bool] | None = None):
        """Wrap `hf_model` (or build one from `cfg`); `processing` (fold_ln=..., ...) rewrites its
        weights in place before capture."""
        super().__init__()
        if hf_model is None:  # a model from a config (or a TransformerLens-style dict) alone, initialised
            from fxhook.from_config import build_from_config

            cfg, hf_model, adapter = build_from_config(cfg)
        elif adapter is None:
            from fxhook.runtime.loading import find_adapter

            adapter = find_adapter(hf_model)
        self.cfg = cfg
        self.adapter = adapter
        self.tokenizer = tokenizer
        self.__dict__["hf_model"] = hf_model  # kept unregistered: the graph holds its parameters
        if processing:
            from fxhook.processing import process_hf_weights

            process_hf_weights(hf_model, adapter, cfg, **processing)
        self.captured = capture_graph(hf_model, adapter, cfg)
        self.__dict__["_captured_ungrouped"] = None
        self._points: dict[str, HookPoint] = {}
        self._variants: dict[GraphSpec, fx.GraphModule] = {}
        self.hook_registry = HookRegistry(lambda: self.hook_dict)
        self._set_tokenizer_defaults()

    # ----------------------------------------------------------------- graphs
    def _make_point(self, name: str) -> HookPoint:
        if name not in self._points:
            self._points[name] = HookPoint(name)
        return self._points[name]

    def graph_for(self, spec: GraphSpec) -> fx.GraphModule:
        """The hooked GraphModule for `spec`, built once and reused."""
        if spec not in self._variants:
            gm = build_variant(self._captured_for(spec), spec, self.cfg, self.adapter, self._make_point)
            if spec.live_hooks is not None:
                self._remember_pruned(spec, gm)
            else:
                self._variants[spec] = gm
        return self._variants[spec]

    _MAX_PRUNED_VARIANTS = 16

    def _remember_pruned(self, key, gm: fx.GraphModule) -> None:
        """Keep pruned graphs for the most recent hook sets only (a new set costs one cheap pass)."""
        order = self.__dict__.setdefault("_pruned_order", [])
        order.append(key)
        if len(order) > self._MAX_PRUNED_VARIANTS:
            self._variants.pop(order.pop(0), None)
        self._variants[key] = gm

    def live_hooks(self) -> frozenset[str]:
        """Names of the hook points that have a hook now: the graph that runs keeps only these."""
        return frozenset(name for name, p in self._points.items() if p.fwd_hooks or p.bwd_hooks)

    def _captured_for(self, spec: GraphSpec) -> fx.GraphModule:
        if not spec.ungroup_grouped_query_attention or self.cfg.n_kv_heads == self.cfg.n_heads:
            return self.captured
        if self._captured_ungrouped is None:
            from fxhook.capture.ungroup import ungrouped_twin

            twin = ungrouped_twin(self.hf_model, self.adapter, self.cfg.n_heads, self.cfg.n_kv_heads)
            captured = capture_graph(twin, self.adapter, self.cfg, n_kv_heads=self.cfg.n_heads)
            self.__dict__["_captured_ungrouped"] = captured
        return self._captured_ungrouped

    @property
    def graph_module(self) -> fx.GraphModule:
        """The full hooked graph under the current flags."""
        return self.graph_for(GraphSpec.from_cfg(self.cfg))

    def _recapture(self) -> None:
        """Capture the HF model again (after its parameters were replaced); hooks stay attached by name."""
        self.captured = capture_graph(self.hf_model, self.adapter, self.cfg)
        self.__dict__["_captured_ungrouped"] = None
        self._variants.clear()

    def process_weights_(self, fold_ln: bool = True, center_writing_weights: bool = True,
                         center_unembed: bool = True, fold_value_biases: bool = True,
                         refactor_factored_attn_matrices: bool = False) -> "HookedTransformer":
        """Canonicalise the weights in place (TransformerLens's processing); idempotent.

        The HF model this wraps is edited too: pass a copy if you need the original.
        """
        from fxhook.processing import process_hf_weights

        process_hf_weights(self.hf_model, self.adapter, self.cfg, fold_ln=fold_ln,
                           center_writing_weights=center_writing_weights, center_unembed=center_unembed,
                           fold_value_biases=fold_value_biases,
                           refactor_factored_attn_matrices=refactor_factored_attn_matrices)
        self._recapture()
        return self

    def load_and_process_state_dict(self, state_dict: dict[str, torch.Tensor], fold_ln: bool = True,
                                    center_writing_weights: bool = True, center_unembed: bool = True,
                                    fold_value_biases: bool = True,
                                    refactor_factored_attn_matrices: bool = False) -> None:
        """Load weights in TransformerLens layout and names (as `live_weights()` lists them; GQA's
        `_W_K` / `_b_V` spellings accepted), then process them as the flags say."""
        from fxhook.processing import write_weights

        ignored = (".mask", ".IGNORE", ".rotary_sin", ".rotary_cos")  # TransformerLens buffers
        known = self.live_weights()
        weights = {}
        for key, value in state_dict.items():
            if key.endswith(ignored):
                continue
            name = key.replace("._W_", ".W_").replace("._b_", ".b_")
            if name not in known and not name.split(".")[-1].startswith("b_"):
                from fxhook.runtime.hooks import unknown_hook_message

                raise KeyError(unknown_hook_message(name, known).replace("hook point", "weight"))
            weights[name] = value
        with torch.no_grad():
            write_weights(self.hf_model, self.adapter, self.cfg, weights)
        self.process_weights_(fold_ln, center_writing_weights, center_unembed, fold_value_biases,
                              refactor_factored_attn_matrices)

    def _apply(self, fn, recurse=True):
        # Variants may hold their own references to lifted constants: rebuild after a move.
        self._variants.clear()
        self.__dict__["_captured_ungrouped"] = None
        self.hf_model._apply(fn, recurse)  # its buffers are its own; parameters are shared (idempotent)
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------------ hooks
    @property
    def hook_dict(self) -> dict[str, HookPoint]:
        """Every hook point of the model under the current flags, by TransformerLens name."""
        gm = self.graph_module
        points = gm.__dict__.get("_fxhook_hook_dict")
        if points is None:  # once per graph: name lookups (run_with_cache, hooks by name) read it every call
            points = gm.__dict__["_fxhook_hook_dict"] = {name: gm.get_submodule(name) for name in hook_point_nodes(gm)}
        return dict(points)

    @property
    def mod_dict(self) -> dict[str, nn.Module]:
        mods = dict(self.hf_model.named_modules())
        mods.update(self.hook_dict)
        return mods

    def hook_points(self) -> list[HookPoint]:
        return list(self.hook_dict.values())

    def add_hook(self, name: NameOrFilter, hook: Callable, dir: Literal["fwd", "bwd"] = "fwd",
                 is_permanent: bool = False, level: int | None = None, prepend: bool = False) -> None:
        self.hook_registry.add(name, hook, dir=dir, is_permanent=is_permanent, prepend=prepend)

    def add_perma_hook(self, name: NameOrFilter, hook: Callable, dir: Literal["fwd", "bwd"] = "fwd") -> None:
        self.add_hook(name, hook, dir=dir, is_permanent=True)

    def reset_hooks(self, clear_contexts: bool = True, direction: str = "both",
                    including_permanent: bool = False, level: int | None = None) -> None:
        self.hook_registry.reset(including_permanent, clear_contexts, all_points=self._points.values())

    def remove_all_hook_fns(self, direction: str = "both", including_permanent: bool = False,
                            level: int | None = None) -> None:
        self.reset_hooks(False, direction, including_permanent)

    def clear_contexts(self) -> None:
        for point in self._points.values():
            point.clear_context()

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Sequence[HookSpec] = (), bwd_hooks: Sequence[HookSpec] = (),
              reset_hooks_end: bool = True, clear_contexts: bool = False) -> Iterator["HookedTransformer"]:
        """`with model.hooks(fwd_hooks=[(name, fn)]): ...` attaches hooks for the block only."""
        with self.hook_registry.attached(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts):
            yield self

    def run_with_hooks(self, *model_args: Any, fwd_hooks: Sequence[HookSpec] = (),
                       bwd_hooks: Sequence[HookSpec] = (), reset_hooks_end: bool = True,
                       clear_contexts: bool = False, **model_kwargs: Any):
        if bwd_hooks and reset_hooks_end:
            import warnings

            warnings.warn("run_with_hooks removes its hooks when it returns, before any backward pass: "
                          "use `with model.hooks(bwd_hooks=...)` and call backward inside it", stacklevel=2)
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts):
            return self(*model_args, **model_kwargs)

    def run_with_cache(self, *model_args: Any, names_filter: NameOrFilter | None = None,
                       device: torch.device | str | None = None, remove_batch_dim: bool = False,
                       incl_bwd: bool = False, reset_hooks_end: bool = True, clear_contexts: bool = False,
                       pos_slice=None, return_cache_object: bool = True, **model_kwargs: Any):
        """Run the model and keep the activations `names_filter` selects (all by default).

        The kept activations are extra outputs of the graph that runs (compiled when the model is), not
        Python callbacks; with incl_bwd (gradients too) or past_kv_cache they are saved by hooks.
        """
        selected = self._cache_selection(names_filter)
        if incl_bwd or model_kwargs.get("past_kv_cache") is not None:
            store = self._cache_by_hooks(selected, model_args, model_kwargs, device, incl_bwd, reset_hooks_end,
                                         clear_contexts)
            out = store.pop("__output__")
        else:
            names = frozenset(name for name in self.hook_dict if selected(name))
            with self.hooks((), (), reset_hooks_end, clear_contexts):
                self.__dict__["_activation_request"] = names
                try:
                    out = self(*model_args, **model_kwargs)
                    store = self.__dict__.get("_delivered_activations", {})
                finally:
                    self.__dict__.pop("_activation_request", None)
                    self.__dict__.pop("_delivered_activations", None)
            store = {k: (v.detach() if device is None else v.detach().to(device)) for k, v in store.items()}
        cache = ActivationCache(store, self)
        if remove_batch_dim:
            cache.remove_batch_dim()
        return out, (cache if return_cache_object else cache.cache_dict)

    def _cache_by_hooks(self, selected: Callable[[str], bool], model_args, model_kwargs, device, incl_bwd: bool,
                        reset_hooks_end: bool, clear_contexts: bool) -> dict[str, Any]:
        """run_with_cache by saving hooks (what gradients need); the output under "__output__"."""
        store: dict[str, Any] = {}

        def keep(tag: str) -> Callable:
            def save(x: torch.Tensor, hook: HookPoint) -> None:
                value = x if incl_bwd and tag == "" else x.detach()
                store[hook.name + tag] = value.to(device) if device is not None else value
            return save

        fwd = [(selected, keep(""))]
        bwd = [(selected, keep("_grad"))] if incl_bwd else []
        with self.hooks(fwd, bwd, reset_hooks_end, clear_contexts):
            out = self(*model_args, **model_kwargs)
            if incl_bwd:
                if not isinstance(out, torch.Tensor) or out.numel() != 1:
                    raise ValueError("run_with_cache(incl_bwd=True) backpropagates from the output, which must "
                                     "be a scalar: pass return_type='loss'")
                out.backward()
        for name in list(store):
            if not name.endswith("_grad"):
                store[name] = store[name].detach()
        store["__output__"] = out
        return store

    def _cache_selection(self, names_filter: NameOrFilter | None) -> Callable[[str], bool]:
        if names_filter is None:
            return lambda _name: True
        if isinstance(names_filter, str):
            self.hook_registry.select(names_filter)  # unknown names fail here, with suggestions
            return lambda name: name == names_filter
        if isinstance(names_filter, (list, tuple, set, frozenset)):
            self.hook_registry.select(list(names_filter))
            wanted = set(names_filter)
            return lambda name: name in wanted
        if callable(names_filter):
            return names_filter
        raise TypeError(f"names_filter must be a name, a list of names or a function, got {type(names_filter)}")

    # ---------------------------------------------------------------- forward
    def forward(self, input: ModelInput, return_type: ReturnType = "logits", loss_per_token: bool = False,
                prepend_bos: bool | None = None, padding_side: str | None = None,
                start_at_layer: int | None = None, tokens: torch.Tensor | None = None,
                stop_at_layer: int | None = None, attention_mask: torch.Tensor | None = None,
                past_kv_cache=None, shortformer_pos_embed=None):
        if past_kv_cache is not None:  # the decode graph, reading and extending the cache (runtime/generate.py)
            return self._forward_with_cache(input, past_kv_cache, return_type, loss_per_token, prepend_bos,
                                            padding_side, attention_mask, start_at_layer, stop_at_layer)
        start, stop = self._layer_range(start_at_layer, stop_at_layer)
        loss_tokens = tokens  # with start_at_layer, a loss needs the real tokens passed as tokens=
        if start is None:
            tokens, attention_mask = self.input_to_tokens(input, prepend_bos, padding_side, attention_mask)
            loss_tokens, residual = tokens, None
        else:
            residual = input
            if tokens is None:
                tokens = torch.zeros(residual.shape[:2], dtype=torch.long, device=residual.device)
            if attention_mask is None:
                attention_mask = torch.ones(residual.shape[:2], dtype=torch.long, device=residual.device)
        self._check_context_length(tokens)
        requested = self.__dict__.get("_activation_request", frozenset())
        gm = self.graph_for(GraphSpec.from_cfg(self.cfg, start, stop, self.live_hooks(), requested))
        args = (tokens, attention_mask) if residual is None else (tokens, attention_mask, residual)
        out = self.run_graph(gm, *args)
        if requested:
            out, activations = out
            self.__dict__["_delivered_activations"] = dict(zip(gm.meta[ACTIVATION_NAMES], activations))
        if stop is not None:
            return out  # the residual stream entering block `stop`, whatever return_type says (as TL)
        return self._shaped_output(out, loss_tokens, attention_mask, return_type, loss_per_token)

    def _shaped_output(self, logits: torch.Tensor, tokens: torch.Tensor | None, attention_mask: torch.Tensor,
                       return_type: ReturnType, loss_per_token: bool):
        """What forward returns for `return_type`, from the logits [b, p, d_vocab]."""
        if return_type is None:
            return None
        if return_type == "logits":
            return logits
        if return_type not in ("loss", "both"):
            raise ValueError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")
        if tokens is None:
            raise ValueError("a loss needs the input tokens: pass tokens= with start_at_layer")
        loss = lm_cross_entropy_loss(logits, tokens, attention_mask if self._masked(attention_mask) else None,
                                     per_token=loss_per_token)
        return loss if return_type == "loss" else Output(logits, loss)

    @staticmethod
    def _masked(attention_mask: torch.Tensor) -> bool:
        return bool((attention_mask == 0).any())

    def _layer_range(self, start: int | None, stop: int | None) -> tuple[int | None, int | None]:
        n = self.cfg.n_layers
        if start is not None:
            start = start + n if start < 0 else start
            if not 0 <= start < n:
                raise ValueError(f"start_at_layer must be in [-{n}, {n}), got {start}")
        if stop is not None:
            stop = stop + n if stop < 0 else stop
            if not 0 <= stop <= n:
                raise ValueError(f"stop_at_layer must be in [-{n}, {n}], got {stop}")
        return start, stop

    def _check_context_length(self, tokens: torch.Tensor) -> None:
        if tokens.shape[-1] > self.cfg.n_ctx:
            raise ValueError(f"the input has {tokens.shape[-1]} positions but the model's context is "
                             f"n_ctx={self.cfg.n_ctx}; shorten the prompt (or truncate it, e.g. "
                             f"tokens[:, -{self.cfg.n_ctx}:])")

    # ---------------------------------------------------------------- devices
    def to(self, *args, print_details: bool = False, **kwargs) -> "HookedTransformer":  # type: ignore[override]
        """nn.Module.to, keeping cfg.device / cfg.dtype in step. print_details: TransformerLens's, unused.

        The captured graph is specialised to the dtype and device it was captured on, so a change of
        either captures the HF model again (seconds; attached hooks stay, by name).
        """
        before = next(self.parameters())
        before = (before.device, before.dtype)
        result = super().to(*args, **kwargs)
        param = next(self.parameters())
        self.cfg.device = str(param.device)
        self.cfg.dtype = param.dtype
        if (param.device, param.dtype) != before:
            self._recapture()
        return result

    def cuda(self, device=None) -> "HookedTransformer":  # type: ignore[override]
        return self.to(torch.device("cuda", device) if isinstance(device, int) else (device or "cuda"))

    def cpu(self) -> "HookedTransformer":  # type: ignore[override]
        return self.to("cpu")

    def move_model_modules_to_device(self) -> None:
        self.to(self.cfg.device)

    # ------------------------------------------------------------------ flags
    def _set_flag(self, name: str, value: bool) -> None:
        setattr(self.cfg, name, bool(value))

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        self._set_flag("use_attn_result", use_attn_result)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        self._set_flag("use_split_qkv_input", use_split_qkv_input)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        self._set_flag("use_hook_mlp_in", use_hook_mlp_in)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        self._set_flag("use_attn_in", use_attn_in)

    def set_ungroup_grouped_query_attention(self, ungroup_grouped_query_attention: bool) -> None:
        self._set_flag("ungroup_grouped_query_attention", ungroup_grouped_query_attention)
