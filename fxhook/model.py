"""HookedTransformer: the object users hold, running fxhook's rewritten graph."""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Literal, Sequence, Union

import torch
from torch import fx, nn

from fxhook.adapter import Adapter
from fxhook.config import HookedTransformerConfig
from fxhook.core.hook_point import HookPoint, refuse_level
from fxhook.datasets import DatasetMixin
from fxhook.pipeline import ACTIVATION_NAMES, DecodeKind, GraphSpec
from fxhook.analysis.cache import ActivationCache
from fxhook.analysis.hook_graph import hook_graph
from fxhook.analysis.resume import run_from
from fxhook.analysis.slicing import position_selection, slice_positions
from fxhook.processing.checks import checked_tl_weight
from fxhook.runtime.atomic import all_or_nothing
from fxhook.runtime.decode import Decoder, check_context_length
from fxhook.runtime.generate import Generator
from fxhook.runtime.graphs import CompileOptions, GraphStore
from fxhook.runtime.hooks import HookRegistry, HookSpec, NameOrFilter
from fxhook.runtime.kv_cache import KVCache, StaticKVCache
from fxhook.runtime.loading import LoadingMixin
from fxhook.runtime.saving import record_processing
from fxhook.runtime.loss import lm_cross_entropy_loss
from fxhook.runtime.tokens import TextCodec
from fxhook.runtime.views import WeightViewsMixin
from fxhook.runtime.component_views import ComponentViewsMixin
from fxhook.runtime.lens_methods import LensMethodsMixin
from fxhook.hook_points import HookedRootModule

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


def _delegate(collaborator: str, method: Callable) -> Callable:
    """A HookedTransformer method that calls `method` on the model's `collaborator` (same name, signature
    and docstring, so help() and TransformerLens-style calls see the collaborator's)."""
    name = method.__name__

    @functools.wraps(method)
    def delegate(self, *args, **kwargs):
        return getattr(getattr(self, collaborator), name)(*args, **kwargs)
    return delegate


class HookedTransformer(LoadingMixin, WeightViewsMixin, ComponentViewsMixin, LensMethodsMixin, DatasetMixin,
                        HookedRootModule):
    """A HF causal LM behind the TransformerLens HookedTransformer interface.

    Its state lives in owned collaborators with declared interfaces: `graphs` (GraphStore: every graph,
    its compiled code, the hook points), `hook_registry` (attaching hooks by name), `decoder` (decode
    steps over a KV cache). A call's request and result travel in arguments and return values.
    """

    def __init__(self, cfg: HookedTransformerConfig | dict, tokenizer=None, move_to_device: bool = True,
                 default_padding_side: Literal["left", "right"] | None = None, *, hf_model: nn.Module | None = None,
                 adapter: Adapter | None = None, processing: dict[str, bool] | None = None):
        """Wrap `hf_model`, or build and initialise a model from `cfg` alone (TransformerLens's
        `HookedTransformer(cfg, tokenizer)`; moved to cfg.device when move_to_device). `processing`
        (fold_ln=..., ...) rewrites the weights in place before capture."""
        super().__init__()
        if default_padding_side not in (None, "left", "right"):
            raise ValueError(f"default_padding_side must be 'left' or 'right', got {default_padding_side!r}")
        if hf_model is None:  # a model from a config (or a TransformerLens-style dict) alone, initialised
            from fxhook.from_config import build_from_config

            cfg, hf_model, adapter = build_from_config(cfg)
        elif adapter is None:
            from adapters import find_adapter

            adapter = find_adapter(hf_model)
        if cfg.original_architecture is None:  # HF configs made in code carry no `architectures`
            cfg.original_architecture = type(hf_model).__name__
        self.cfg = cfg
        self.adapter = adapter
        self.__dict__["hf_model"] = hf_model  # kept unregistered: the graph holds its parameters
        if processing:
            from fxhook.processing import process_hf_weights

            process_hf_weights(hf_model, adapter, cfg, **processing)
            record_processing(cfg, processing)  # save_pretrained writes it; from_pretrained(folder) checks it
        self.__dict__["graphs"] = GraphStore(hf_model, adapter, cfg)
        self.__dict__["decoder"] = Decoder(self.graphs, cfg)
        if default_padding_side is not None:
            cfg.default_padding_side = default_padding_side
        self.__dict__["codec"] = TextCodec(cfg, tokenizer)
        self.__dict__["generator"] = Generator(cfg, self.graphs, self.decoder, self.codec)
        self.captured = self.graphs.captured()  # registered: its parameters are the model's
        self.hook_registry = HookRegistry(lambda: self.hook_dict)
        if move_to_device and cfg.device is not None and torch.device(cfg.device) != next(self.parameters()).device:
            self.to(cfg.device, False)

    # ----------------------------------------------------------------- text and generation (delegates)
    @property
    def tokenizer(self):
        """The HF tokenizer text goes through (None: token ids only)."""
        return self.codec.tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer) -> None:
        self.codec.tokenizer = tokenizer
        self.codec._set_tokenizer_defaults()

    set_tokenizer = _delegate("codec", TextCodec.set_tokenizer)
    to_tokens = _delegate("codec", TextCodec.to_tokens)
    input_to_tokens = _delegate("codec", TextCodec.input_to_tokens)
    default_attention_mask = _delegate("codec", TextCodec.default_attention_mask)
    to_string = _delegate("codec", TextCodec.to_string)
    to_str_tokens = _delegate("codec", TextCodec.to_str_tokens)
    to_single_token = _delegate("codec", TextCodec.to_single_token)
    to_single_str_token = _delegate("codec", TextCodec.to_single_str_token)
    get_token_position = _delegate("codec", TextCodec.get_token_position)
    generate = _delegate("generator", Generator.generate)
    generate_stream = _delegate("generator", Generator.generate_stream)

    # ----------------------------------------------------------------- graphs
    def graph_for(self, spec: GraphSpec) -> fx.GraphModule:
        """The hooked GraphModule for `spec`, built once and reused (GraphStore decides for how long)."""
        return self.graphs.forward(spec).gm

    def decode_graph_for(self, spec: GraphSpec, kind: DecodeKind = DecodeKind()) -> fx.GraphModule:
        """The hooked decode-step graph for `spec` (no layer slicing)."""
        return self.graphs.decode(spec, kind).gm

    def live_hooks(self) -> frozenset[str]:
        """Names of the hook points that have a hook now: the graph that runs keeps only these."""
        return self.graphs.live_hooks()

    @property
    def graph_module(self) -> fx.GraphModule:
        """The full hooked graph under the current flags."""
        return self.graph_for(GraphSpec.from_cfg(self.cfg))

    def _recapture(self) -> None:
        """Capture the HF model again (after its parameters were replaced); hooks stay attached by name."""
        self.graphs.clear()
        self.captured = self.graphs.captured()

    def process_weights_(self, fold_ln: bool = True, center_writing_weights: bool = True,
                         center_unembed: bool = True, refactor_factored_attn_matrices: bool = False, *,
                         fold_value_biases: bool = True) -> "HookedTransformer":
        """Canonicalise the weights in place (TransformerLens's processing); idempotent.

        The HF model this wraps is edited too: pass a copy if you need the original.
        """
        from fxhook.processing import process_hf_weights

        with all_or_nothing([self.hf_model], self.cfg, self._recapture):
            process_hf_weights(self.hf_model, self.adapter, self.cfg, fold_ln=fold_ln,
                               center_writing_weights=center_writing_weights, center_unembed=center_unembed,
                               fold_value_biases=fold_value_biases,
                               refactor_factored_attn_matrices=refactor_factored_attn_matrices)
            record_processing(self.cfg, dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                                             center_unembed=center_unembed, fold_value_biases=fold_value_biases,
                                             refactor_factored_attn_matrices=refactor_factored_attn_matrices))
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
            if key == "pos_embed.W_pos" and self.cfg.positional_embedding_type == "alibi":
                continue  # TransformerLens keeps a position table on ALiBi models and never reads it
            name = key.replace("._W_", ".W_").replace("._b_", ".b_")
            weights[name] = checked_tl_weight(name, value, known, self.hf_model, self.adapter, self.cfg)
        with all_or_nothing([self.hf_model], self.cfg, self._recapture):
            with torch.no_grad():
                write_weights(self.hf_model, self.adapter, self.cfg, weights)
            self.process_weights_(fold_ln, center_writing_weights, center_unembed, refactor_factored_attn_matrices,
                                  fold_value_biases=fold_value_biases)

    def _apply(self, fn, recurse=True):
        # Graphs built from the capture may hold their own references to lifted constants: rebuild them
        # after a move (the capture itself is a submodule, moved with the model).
        self.hf_model._apply(fn, recurse)  # its buffers are its own; parameters are shared (idempotent)
        result = super()._apply(fn, recurse)
        self.graphs.clear(keep_capture=True)
        return result

    @property
    def graph_cache_size(self) -> int:
        """How many hook sets keep their graphs (and, on a compiled model, their compiled code); 16 by
        default. Calls that cycle among more hook sets than this rebuild, and recompile, the ones that
        dropped out; within it, switching hook sets rebuilds and recompiles nothing."""
        return self.graphs.max_variants

    @graph_cache_size.setter
    def graph_cache_size(self, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"graph_cache_size must be a positive int, got {size!r}")
        self.graphs.resize(size)

    # ---------------------------------------------------------------- compile
    @property
    def is_compiled(self) -> bool:
        return self.graphs.compile_options is not None

    @property
    def compile_options(self) -> CompileOptions | None:
        """torch.compile's settings the model runs under (None: eager)."""
        return self.graphs.compile_options

    def compile(self, enabled: bool = True, *, backend: str = "inductor", mode: str | None = None,
                dynamic: bool = True, regional: bool = True) -> "HookedTransformer":  # type: ignore[override]
        """Run forward, run_with_cache, run_with_hooks (and generation) through torch.compile.

        Each hook set compiles once, on its first call; with dynamic=True new batch sizes and lengths do
        not recompile (batch size 1 is compiled apart). `regional` (default): the blocks share one compiled
        code (runtime/regional.py) and a new hook set compiles only the blocks it cuts at a hooked point;
        `False` compiles each graph whole. `compile(False)` turns it off; `backend`, `mode` are torch's.
        """
        if not isinstance(regional, bool):
            raise TypeError(f"regional must be True or False, got {regional!r}")
        self.graphs.compile_options = CompileOptions(backend, mode, dynamic, regional) if enabled else None
        return self

    def init_kv_cache(self, batch_size: int = 1) -> KVCache:
        """An empty KV cache for this model under its current flags (`forward(..., past_kv_cache=)`)."""
        return self.decoder.init_kv_cache(batch_size)

    def init_static_kv_cache(self, batch_size: int, max_len: int) -> StaticKVCache:
        return self.decoder.init_static_kv_cache(batch_size, max_len)

    def _current_spec(self) -> GraphSpec:
        return self.decoder.spec()

    def _make_point(self, name: str) -> HookPoint:
        return self.graphs.make_point(name)

    # ------------------------------------------------------------------ hooks
    @property
    def hook_dict(self) -> dict[str, HookPoint]:
        """Every hook point of the model under the current flags, by TransformerLens name."""
        return dict(self.graphs.forward(GraphSpec.from_cfg(self.cfg)).hook_dict)

    @property
    def mod_dict(self) -> dict[str, nn.Module]:
        mods = dict(self.hf_model.named_modules())
        mods.update(self.hook_dict)
        return mods

    def hook_points(self) -> list[HookPoint]:
        return list(self.hook_dict.values())

    def add_hook(self, name: NameOrFilter, hook: Callable, dir: Literal["fwd", "bwd"] = "fwd",
                 is_permanent: bool = False, level: int | None = None, prepend: bool = False) -> None:
        refuse_level(level)
        for point in self.hook_registry.select(name):  # a subclass's check_hooks_to_add may refuse a hook
            self.check_hooks_to_add(point, point.name, hook, dir=dir, is_permanent=is_permanent, prepend=prepend)
        self.hook_registry.add(name, hook, dir=dir, is_permanent=is_permanent, prepend=prepend)

    def setup(self) -> None:
        """Capture the model again and rebuild its hook points (after its HF modules were replaced);
        hooks attached by name stay attached."""
        self._recapture()

    def add_perma_hook(self, name: NameOrFilter, hook: Callable, dir: Literal["fwd", "bwd"] = "fwd") -> None:
        self.add_hook(name, hook, dir=dir, is_permanent=True)

    def reset_hooks(self, clear_contexts: bool = True, direction: str = "both",
                    including_permanent: bool = False, level: int | None = None) -> None:
        """Remove the hooks of `direction` ("fwd", "bwd" or "both"): the model-wide ones (permanent too with
        including_permanent) and, inside a hooks() block, this call's."""
        refuse_level(level)
        self.hook_registry.reset(including_permanent, clear_contexts, all_points=self.graphs.points.values(),
                                 direction=direction)

    def remove_all_hook_fns(self, direction: str = "both", including_permanent: bool = False,
                            level: int | None = None) -> None:
        self.reset_hooks(False, direction, including_permanent, level)

    def clear_contexts(self) -> None:
        for point in self.graphs.points.values():
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
                out, store = self._forward(names, *model_args, **model_kwargs)
            store = {k: (v.detach() if device is None else v.detach().to(device)) for k, v in store.items()}
        if pos_slice is not None:
            selection = position_selection(pos_slice)
            store = {name: slice_positions(name, value, selection) for name, value in store.items()}
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

    hook_graph = hook_graph  # the hook points' dependency graph (networkx), read from the fx graph

    run_from = run_from  # finish the forward from any hook point with cached activations (analysis/resume.py)

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
        output, _activations = self._forward(frozenset(), input, return_type, loss_per_token, prepend_bos,
                                             padding_side, start_at_layer, tokens, stop_at_layer, attention_mask,
                                             past_kv_cache, shortformer_pos_embed)
        return output

    def _forward(self, keep: frozenset[str], input: ModelInput, return_type: ReturnType = "logits",
                 loss_per_token: bool = False, prepend_bos: bool | None = None, padding_side: str | None = None,
                 start_at_layer: int | None = None, tokens: torch.Tensor | None = None,
                 stop_at_layer: int | None = None, attention_mask: torch.Tensor | None = None,
                 past_kv_cache=None, shortformer_pos_embed=None) -> tuple[Any, dict[str, torch.Tensor]]:
        """forward's output and the activations of the hook points in `keep` (the call's whole state:
        nothing about it is left on the model)."""
        if shortformer_pos_embed is not None:
            raise NotImplementedError("shortformer_pos_embed is not supported: fxhook runs the HF model's own "
                                      "positional embedding; leave it None")
        if past_kv_cache is not None:  # the decode graph, reading and extending the cache (runtime/generate.py)
            if keep:
                raise ValueError("past_kv_cache keeps activations through hooks, not graph outputs")
            return self._forward_with_cache(input, past_kv_cache, return_type, loss_per_token, prepend_bos,
                                            padding_side, attention_mask, start_at_layer, stop_at_layer), {}
        start, stop = self._layer_range(start_at_layer, stop_at_layer)
        loss_tokens = tokens  # with start_at_layer, a loss needs the real tokens passed as tokens=
        if start is None:
            tokens, attention_mask = self.input_to_tokens(input, prepend_bos, padding_side, attention_mask)
            loss_tokens, residual = tokens, None
        else:
            residual = self._check_residual(input, start)
            if tokens is None:
                tokens = torch.zeros(residual.shape[:2], dtype=torch.long, device=residual.device)
            if attention_mask is None:
                attention_mask = torch.ones(residual.shape[:2], dtype=torch.long, device=residual.device)
            if self.graphs.placement is not None:  # a split model: each input where its first reader runs
                tokens, attention_mask = tokens.to(self.cfg.device), attention_mask.to(self.cfg.device)
                residual = residual.to(self.graphs.placement.blocks[start])
        check_context_length(self.cfg, tokens.shape[-1])
        entry = self.graphs.forward(GraphSpec.from_cfg(self.cfg, start, stop, self.live_hooks(), keep))
        args = (tokens, attention_mask) if residual is None else (tokens, attention_mask, residual)
        out = self.graphs.run(entry, *args)
        activations: dict[str, torch.Tensor] = {}
        if keep:
            out, values = out
            activations = dict(zip(entry.gm.meta[ACTIVATION_NAMES], values))
        if stop is not None:
            return out, activations  # the residual stream entering block `stop`, whatever return_type says (TL)
        return self._shaped_output(out, loss_tokens, attention_mask, return_type, loss_per_token), activations

    def _forward_with_cache(self, input, cache: KVCache, return_type, loss_per_token, prepend_bos, padding_side,
                            attention_mask, start_at_layer, stop_at_layer):
        if not isinstance(cache, KVCache):
            raise TypeError(f"past_kv_cache must be a fxhook KVCache (model.init_kv_cache(batch_size)), "
                            f"got {type(cache).__name__}")
        if start_at_layer is not None or stop_at_layer is not None:
            raise NotImplementedError("past_kv_cache with start_at_layer / stop_at_layer is not supported")
        if (cache.past_length > 0 and attention_mask is None and isinstance(input, torch.Tensor)
                and input.dtype in (torch.long, torch.int, torch.int32)):
            tokens = input[None] if input.dim() == 1 else input
            tokens = tokens.to(cache.attention_mask.device)
            attention_mask = torch.ones_like(tokens)  # a continuation has no leading padding
        else:
            tokens, attention_mask = self.input_to_tokens(input, prepend_bos, padding_side, attention_mask)
        if tokens.shape[0] != cache.batch_size:
            raise ValueError(f"the input has batch size {tokens.shape[0]} but the cache was made for "
                             f"{cache.batch_size}")
        logits = self.decoder.run_growing(cache, tokens, attention_mask)
        return self._shaped_output(logits, tokens, attention_mask, return_type, loss_per_token)

    def _check_residual(self, residual, start: int) -> torch.Tensor:
        """start_at_layer's input: the residual stream entering block `start`, [batch, pos, d_model]."""
        d_model = self.cfg.d_model
        if not isinstance(residual, torch.Tensor) or not residual.is_floating_point():
            got = f"a {residual.dtype} tensor (token ids?)" if isinstance(residual, torch.Tensor) else type(
                residual).__name__
            raise TypeError(f"with start_at_layer={start} the input is the residual stream entering that block, "
                            f"a float tensor [batch, pos, d_model={d_model}], got {got}")
        if residual.dim() != 3 or residual.shape[-1] != d_model or 0 in residual.shape[:2]:
            raise ValueError(f"with start_at_layer={start} the input must have shape [batch, pos, d_model={d_model}] "
                             f"(batch and pos at least 1), got {tuple(residual.shape)}")
        return residual

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
        tokens, attention_mask = tokens.to(logits.device), attention_mask.to(logits.device)  # split: the last device
        loss = lm_cross_entropy_loss(logits, tokens, attention_mask if self._masked(attention_mask) else None,
                                     per_token=loss_per_token)
        return loss if return_type == "loss" else Output(logits, loss)

    @staticmethod
    def _masked(attention_mask: torch.Tensor) -> bool:
        return bool((attention_mask == 0).any())

    def _layer_range(self, start: int | None, stop: int | None) -> tuple[int | None, int | None]:
        n = self.cfg.n_layers
        for name, value in (("start_at_layer", start), ("stop_at_layer", stop)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"{name} must be an int (a block index), got {value!r}")
        if start is not None:
            if not -n <= start < n:
                raise ValueError(f"start_at_layer must be in [-{n}, {n}), got {start}")
            start = start + n if start < 0 else start
        if stop is not None:
            if not -n <= stop <= n:
                raise ValueError(f"stop_at_layer must be in [-{n}, {n}], got {stop}")
            stop = stop + n if stop < 0 else stop
        return start, stop

    # ---------------------------------------------------------------- devices
    def to(self, device_or_dtype: torch.device | str | torch.dtype | None = None, print_details: bool = True, *,
           device: torch.device | str | None = None, dtype: torch.dtype | None = None,
           non_blocking: bool = False) -> "HookedTransformer":  # type: ignore[override]
        """Move or cast the model (TransformerLens's signature; device= and dtype= as nn.Module.to), keeping
        cfg.device / cfg.dtype in step; print_details says what changed, as TransformerLens prints it.

        The captured graph is specialised to the dtype and device it was captured on, so a change of
        either captures the HF model again (seconds; attached hooks stay, by name). On a model split
        across devices (n_devices / device_map), a device undoes the split (every block goes to it);
        a dtype alone keeps it.
        """
        if not isinstance(print_details, bool):
            raise TypeError(f"to()'s second argument is print_details, got {print_details!r}: pass a device and a "
                            f"dtype as to(device, dtype=...) or to(device=..., dtype=...)")
        if isinstance(device_or_dtype, torch.dtype):
            if dtype is not None and dtype != device_or_dtype:
                raise ValueError(f"two dtypes given: {device_or_dtype} and dtype={dtype}")
            dtype = device_or_dtype
        elif device_or_dtype is not None:
            if device is not None and torch.device(device) != torch.device(device_or_dtype):
                raise ValueError(f"two devices given: {device_or_dtype!r} and device={device!r}")
            device = device_or_dtype
        args, kwargs = (), {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        kwargs["non_blocking"] = non_blocking
        before = next(self.parameters())
        before = (before.device, before.dtype)
        placement = self.graphs.placement
        unsplit = placement is not None and torch._C._nn._parse_to(*args, **kwargs)[0] is not None

        def rebuild() -> None:
            self.graphs.placement = placement
            self._recapture()
        with all_or_nothing([self, self.hf_model], self.cfg, rebuild, clone=False):
            if unsplit:
                self.graphs.set_placement(None)
                self.cfg.n_devices = 1
            result = super().to(*args, **kwargs)
            param = next(self.parameters())
            self.cfg.device = str(param.device)
            self.cfg.dtype = param.dtype
            if (param.device, param.dtype) != before or unsplit:
                self._recapture()
        if print_details:
            if device is not None:
                print("Moving model to device: ", device)
            if dtype is not None:
                print("Changing model dtype to", dtype)
        return result

    def cuda(self, device=None) -> "HookedTransformer":  # type: ignore[override]
        return self.to(torch.device("cuda", device) if isinstance(device, int) else (device or "cuda"), False)

    def cpu(self) -> "HookedTransformer":  # type: ignore[override]
        return self.to("cpu", False)

    def move_model_modules_to_device(self) -> None:
        self.to(self.cfg.device, False)

    # ------------------------------------------------------------------ flags
    def _set_flag(self, name: str, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"set_{name}(...) takes True or False, got {value!r}")
        setattr(self.cfg, name, value)

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
