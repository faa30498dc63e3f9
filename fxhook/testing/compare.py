"""Differences between two runs and the first hook where they part: fxhook against the HF modules'
own outputs (`first_hf_divergence`), or fxhook against fxhook (`first_run_divergence`: with and
without the KV cache, compiled and eager)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from fxhook.core.hook_names import position_axis
from fxhook.model import HookedTransformer
from fxhook.testing.reference import final_norm_affine, float64_forward, hf_forward, hf_sites, recording
from fxhook.testing.tolerance import DEFAULT_FACTOR, tolerance


@dataclass(frozen=True)
class Difference:
    """The largest absolute difference between two tensors, where it is, and what was allowed."""

    worst: float
    tolerance: float
    where: tuple[int, ...] = ()  # index of the worst element (batch row, position, ...)
    basis: str = ""  # how the tolerance was set, when not by dtype and depth alone

    @property
    def holds(self) -> bool:
        return self.worst <= self.tolerance

    def __str__(self) -> str:
        at = f" at index {list(self.where)}" if self.where else ""
        basis = f", {self.basis}" if self.basis else ""
        return f"{self.worst:.3g} (tolerance {self.tolerance:.3g}{basis}){at}"


@dataclass(frozen=True)
class Divergence:
    """The first hook whose value differs from the reference beyond tolerance."""

    hook: str
    difference: Difference
    against: str  # what it was compared with ("HF module model.layers.1.mlp", "the run without KV cache")

    def __str__(self) -> str:
        return f"{self.hook} (against {self.against}: difference {self.difference})"


def difference(actual: torch.Tensor, expected: torch.Tensor, n_layers: int, dtype: torch.dtype,
               mask: torch.Tensor | None = None, centred: bool = False, factor: float = DEFAULT_FACTOR
               ) -> Difference:
    """Compare actual and expected [b, p, ...] at the real positions of mask [b, p] (all when None).
    centred: compare after subtracting each vector's mean over the last axis (processed models)."""
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if a.shape != e.shape:
        if a.numel() != e.numel():
            return Difference(float("inf"), 0.0, ())
        e = e.reshape(a.shape)  # e.g. OPT's MLP runs on flattened tokens [b * p, d]
    if centred:
        a, e = a - a.mean(-1, keepdim=True), e - e.mean(-1, keepdim=True)
    keep = torch.ones(a.shape[:2], dtype=torch.bool) if mask is None else mask.to("cpu").bool()
    gap = (a - e).abs().nan_to_num(nan=float("inf"))
    gap = torch.where(keep.reshape(keep.shape + (1,) * (a.dim() - 2)), gap, torch.zeros(()))
    tol = tolerance(dtype, n_layers, e[keep], factor)
    flat = int(gap.argmax()) if gap.numel() else 0
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), gap.shape)) if gap.numel() else ()
    return Difference(float(gap.max()) if gap.numel() else 0.0, tol, where)


def compared_logits(logits: torch.Tensor, processed: bool) -> torch.Tensor:
    """Logits as compared: raw for an unprocessed model, log-probabilities for a processed one
    (center_unembed shifts each position's logits by a constant)."""
    return logits.double().log_softmax(-1) if processed else logits


def hf_logits_difference(model: HookedTransformer, hf_model: nn.Module, actual: torch.Tensor, tokens: torch.Tensor,
                         mask: torch.Tensor, processed: bool, factor: float = DEFAULT_FACTOR,
                         edits: dict[str, Callable] | None = None) -> Difference:
    """fxhook's logits `actual` [b, p, vocab] against hf_model's on the same tokens and module `edits`.

    The dtype-and-depth tolerance assumes rounding errors of the size of the values; a model with a few
    huge residual coordinates (SmolLM2's reach hundreds) rounds far worse on some inputs, and HF's own
    run is then as far from the exact result as fxhook's. So when that tolerance is exceeded, the HF model
    is run again in float64 (when a copy fits in memory) and the difference is allowed up to twice HF's own
    rounding error: two runs each as accurate as HF's cannot differ by more. A real defect (a wrong mask,
    a changed epsilon, a missing head) exceeds that too."""
    cfg = model.cfg
    with recording(hf_model, [], edits):
        expected = hf_forward(hf_model, tokens, mask)
    found = difference(compared_logits(actual, processed), compared_logits(expected, processed), cfg.n_layers,
                       cfg.dtype, mask, factor=factor)
    if found.holds:
        return found
    exact = float64_forward(hf_model, tokens, mask, edits)
    if exact is None:
        return replace(found, basis="no float64 copy of the HF model fits in memory to measure its own rounding")
    own = difference(compared_logits(expected, processed), compared_logits(exact, processed), cfg.n_layers,
                     cfg.dtype, mask, factor=factor)
    dtype = str(cfg.dtype).removeprefix("torch.")
    if 2 * own.worst <= found.tolerance:
        return replace(found, basis=f"HF's own {dtype} rounding error against float64 is only {own.worst:.3g}")
    return replace(found, tolerance=2 * own.worst, basis=f"twice HF's own {dtype} rounding error against float64")


def first_hf_divergence(model: HookedTransformer, hf_model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor,
                        processed: bool, factor: float = DEFAULT_FACTOR, ablate: str | None = None
                        ) -> Divergence | None:
    """Scan fxhook's hook values in computation order against the HF modules' outputs for tokens,
    mask [b, p]; the first beyond tolerance (None: every site agrees). ablate: a hook zeroed on both
    sides (on the HF side, the output of the module that computes it)."""
    sites = [s for s in hf_sites(model) if s.hook in model.hook_dict]
    edits = {}
    fwd_hooks = []
    if ablate is not None:
        module = next((s.module for s in sites if s.hook == ablate), None)
        if module is None:
            raise ValueError(f"{ablate!r} has no HF module to ablate: choose one of "
                             f"{[s.hook for s in sites if s.kind in ('attn_out', 'mlp_out')]}")
        edits[module] = zeroed
        fwd_hooks.append((ablate, lambda x, hook: torch.zeros_like(x)))
    with recording(hf_model, sites, edits) as expected:
        hf_forward(hf_model, tokens, mask)
    with torch.no_grad(), model.hooks(fwd_hooks):
        _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=[s.hook for s in sites])
    cfg = model.cfg
    for site in sites:
        if site.hook not in expected:
            continue  # the HF model never ran this module (a family that bypasses it)
        actual = cache[site.hook]
        if site.kind == "final_norm":
            actual = final_norm_affine(hf_model, model, actual.to(expected[site.hook].dtype))
        found = difference(actual, expected[site.hook], cfg.n_layers, cfg.dtype, mask,
                           centred=processed and site.kind != "final_norm", factor=factor)
        if not found.holds:
            return Divergence(site.hook, found, f"HF module {site.module}")
    return None


def zeroed(output):
    """A module's output with its main tensor zeroed (other tuple members kept)."""
    if isinstance(output, tuple):
        return (zeroed(output[0]), *output[1:])
    return torch.zeros_like(output)


def last_position(name: str, value: torch.Tensor) -> torch.Tensor:
    """The hook value at the last (query) position, keeping its axis."""
    axis = position_axis(name)
    return value if axis is None or value.dim() <= axis else value.narrow(axis, value.shape[axis] - 1, 1)


def first_run_divergence(model: HookedTransformer, actual: dict[str, torch.Tensor],
                         expected: dict[str, torch.Tensor], against: str, factor: float = DEFAULT_FACTOR,
                         mask: torch.Tensor | None = None) -> Divergence | None:
    """The first hook (in the model's hook order) whose values in two fxhook runs differ."""
    cfg = model.cfg
    for name in model.hook_dict:
        if name not in actual or name not in expected:
            continue
        a, e = actual[name], expected[name]
        if a.shape != e.shape:
            return Divergence(name, Difference(float("inf"), 0.0, ()), f"{against} (shapes {tuple(a.shape)} "
                                                                       f"and {tuple(e.shape)})")
        found = difference(a, e, cfg.n_layers, cfg.dtype, mask if a.dim() >= 2 and mask is not None
                           and a.shape[:2] == mask.shape else None, factor=factor)
        if not found.holds:
            return Divergence(name, found, against)
    return None


def cache_divergence(model: HookedTransformer, tokens: torch.Tensor, factor: float = DEFAULT_FACTOR
                     ) -> Divergence | None:
    """Run tokens [1, p] (no padding) as a prefix through the KV cache and its last token as a cached
    step, against one run of the whole sequence: the first hook that differs at the last position."""
    with torch.no_grad():
        cache = model.init_kv_cache(1)
        model(tokens[:, :-1], past_kv_cache=cache)
        _, stepped = model.run_with_cache(tokens[:, -1:], past_kv_cache=cache)
        _, whole = model.run_with_cache(tokens)
    last = {name: last_position(name, value) for name, value in whole.items()}
    return first_run_divergence(model, dict(stepped.items()), last, "the same position run without the KV cache",
                                factor)
