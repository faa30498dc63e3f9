"""TransformerLens's `hook_points` module: `HookPoint`, and `HookedRootModule`, the base of any module whose
activations pass through named HookPoints (subclass it, call `self.setup()` after building the submodules).

HookedTransformer is one; its own hook points live in the rewritten graph rather than in submodules, so it
overrides how they are found (`hook_dict`) and how a forward keeps activations, and inherits the rest.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from torch import nn

from fxhook.analysis.cache import ActivationCache
from fxhook.analysis.slicing import position_selection, slice_positions
from fxhook.core.hook_point import HookEntry, HookPoint, refuse_level
from fxhook.runtime.hooks import HookRegistry, HookSpec, NameOrFilter

__all__ = ["HookPoint", "HookedRootModule", "NamesFilter"]

NamesFilter = NameOrFilter | None
Direction = Literal["fwd", "bwd"]


def _name_predicate(names_filter: NamesFilter) -> Callable[[str], bool]:
    if names_filter is None:
        return lambda name: True
    if isinstance(names_filter, str):
        return lambda name: name == names_filter
    if isinstance(names_filter, (list, tuple, set, frozenset)):
        wanted = set(names_filter)
        return lambda name: name in wanted
    if callable(names_filter):
        return names_filter
    raise TypeError(f"names_filter must be a hook name, a list of names or a function of a name, got "
                    f"{type(names_filter).__name__}")


class HookedRootModule(nn.Module):
    """Hook management for a module whose activations pass through HookPoint submodules."""

    # ------------------------------------------------------------------ hook points
    def setup(self) -> None:
        """Name every submodule after its path and index the HookPoints (call after building them)."""
        self.mod_dict: dict[str, nn.Module] = {}
        self.hook_dict: dict[str, HookPoint] = {}
        for name, module in self.named_modules():
            if not name:
                continue
            module.name = name
            self.mod_dict[name] = module
            if isinstance(module, HookPoint):
                self.hook_dict[name] = module

    def _registry(self) -> HookRegistry:
        return HookRegistry(lambda: self.hook_dict)

    def hook_points(self) -> list[HookPoint]:
        return list(self.hook_dict.values())

    def check_hooks_to_add(self, hook_point: HookPoint, hook_point_name: str, hook: Callable,
                           dir: Direction = "fwd", is_permanent: bool = False, prepend: bool = False) -> None:
        """Override to refuse some hooks: raise here, before the hook is attached."""

    def check_and_add_hook(self, hook_point: HookPoint, hook_point_name: str, hook: Callable,
                           dir: Direction = "fwd", is_permanent: bool = False, level: int | None = None,
                           prepend: bool = False) -> None:
        """Run `check_hooks_to_add`, then attach the hook model-wide."""
        self.check_hooks_to_add(hook_point, hook_point_name, hook, dir=dir, is_permanent=is_permanent,
                                prepend=prepend)
        hook_point.add_hook(hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def add_hook(self, name: NameOrFilter, hook: Callable, dir: Direction = "fwd", is_permanent: bool = False,
                 level: int | None = None, prepend: bool = False) -> None:
        refuse_level(level)
        for point in self._registry().select(name):
            self.check_and_add_hook(point, point.name, hook, dir=dir, is_permanent=is_permanent, prepend=prepend)

    def add_perma_hook(self, name: NameOrFilter, hook: Callable, dir: Direction = "fwd") -> None:
        self.add_hook(name, hook, dir=dir, is_permanent=True)

    def reset_hooks(self, clear_contexts: bool = True, direction: str = "both", including_permanent: bool = False,
                    level: int | None = None) -> None:
        refuse_level(level)
        self._registry().reset(including_permanent, clear_contexts, direction=direction)

    def remove_all_hook_fns(self, direction: str = "both", including_permanent: bool = False,
                            level: int | None = None) -> None:
        self.reset_hooks(False, direction, including_permanent, level)

    def clear_contexts(self) -> None:
        for point in self.hook_dict.values():
            point.clear_context()

    def list_hooks(self, name_filter: NamesFilter = None, dir: Literal["fwd", "bwd", "both"] = "both",
                   including_permanent: bool = True) -> dict[str, list[HookEntry]]:
        """The hooks attached now (model-wide and this call's), by hook name; points without any are left out."""
        if dir not in ("fwd", "bwd", "both"):
            raise ValueError(f"dir must be 'fwd', 'bwd' or 'both', got {dir!r}")
        matches = _name_predicate(name_filter)
        listed = {}
        for name, point in self.hook_dict.items():
            if not matches(name):
                continue
            entries = (point.fwd_hooks if dir in ("fwd", "both") else ()) + \
                (point.bwd_hooks if dir in ("bwd", "both") else ())
            entries = [e for e in entries if including_permanent or not e.permanent]
            if entries:
                listed[name] = entries
        return listed

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Sequence[HookSpec] = (), bwd_hooks: Sequence[HookSpec] = (),
              reset_hooks_end: bool = True, clear_contexts: bool = False) -> Iterator["HookedRootModule"]:
        with self._registry().attached(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts):
            yield self

    def run_with_hooks(self, *model_args: Any, fwd_hooks: Sequence[HookSpec] = (), bwd_hooks: Sequence[HookSpec] = (),
                       reset_hooks_end: bool = True, clear_contexts: bool = False, **model_kwargs: Any) -> Any:
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts):
            return self(*model_args, **model_kwargs)

    # ------------------------------------------------------------------ caching by hooks
    def get_caching_hooks(self, names_filter: NamesFilter = None, incl_bwd: bool = False,
                          device: torch.device | str | None = None, remove_batch_dim: bool = False,
                          cache: dict | None = None, pos_slice: Any = None
                          ) -> tuple[dict, list[tuple[str, Callable]], list[tuple[str, Callable]]]:
        """(cache, fwd_hooks, bwd_hooks): hooks that save the selected activations (gradients under
        "NAME_grad" with incl_bwd) into `cache` when attached, e.g. with `model.hooks(...)`."""
        cache = {} if cache is None else cache
        selected = _name_predicate(names_filter)
        positions = None if pos_slice is None else position_selection(pos_slice)

        def saver(suffix: str) -> Callable:
            def save(tensor: torch.Tensor, hook: HookPoint) -> None:
                value = tensor.detach()
                value = value.to(device) if device is not None else value
                if remove_batch_dim:
                    value = value[0]
                if positions is not None:
                    value = slice_positions(hook.name, value, positions, batch_axes=0 if remove_batch_dim else 1)
                cache[hook.name + suffix] = value
            return save

        names = [name for name in self.hook_dict if selected(name)]
        fwd = [(name, saver("")) for name in names]
        bwd = [(name, saver("_grad")) for name in names] if incl_bwd else []
        return cache, fwd, bwd

    def add_caching_hooks(self, names_filter: NamesFilter = None, incl_bwd: bool = False,
                          device: torch.device | str | None = None, remove_batch_dim: bool = False,
                          cache: dict | None = None) -> dict:
        """Attach saving hooks model-wide (until reset_hooks) and return the dict they fill on every run."""
        cache, fwd, bwd = self.get_caching_hooks(names_filter, incl_bwd, device, remove_batch_dim, cache)
        for direction, hooks in (("fwd", fwd), ("bwd", bwd)):
            for name, fn in hooks:
                self.add_hook(name, fn, dir=direction)
        return cache

    def cache_all(self, cache: dict | None, incl_bwd: bool = False, device: torch.device | str | None = None,
                  remove_batch_dim: bool = False) -> None:
        """Save every activation into `cache` on every run (TransformerLens's older spelling of
        add_caching_hooks)."""
        self.add_caching_hooks(None, incl_bwd, device, remove_batch_dim, cache)

    def cache_some(self, cache: dict | None, names: Callable[[str], bool], incl_bwd: bool = False,
                   device: torch.device | str | None = None, remove_batch_dim: bool = False) -> None:
        """Save the activations `names` selects into `cache` on every run."""
        self.add_caching_hooks(names, incl_bwd, device, remove_batch_dim, cache)

    def run_with_cache(self, *model_args: Any, names_filter: NamesFilter = None,
                       device: torch.device | str | None = None, remove_batch_dim: bool = False,
                       incl_bwd: bool = False, reset_hooks_end: bool = True, clear_contexts: bool = False,
                       pos_slice: Any = None, **model_kwargs: Any) -> tuple[Any, ActivationCache]:
        cache, fwd, bwd = self.get_caching_hooks(names_filter, incl_bwd, device, remove_batch_dim,
                                                 pos_slice=pos_slice)
        with self.hooks(fwd, bwd, reset_hooks_end, clear_contexts):
            out = self(*model_args, **model_kwargs)
            if incl_bwd:
                out.backward()
        return out, ActivationCache(cache, self, has_batch_dim=not remove_batch_dim)
