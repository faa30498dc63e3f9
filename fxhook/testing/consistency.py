"""`assert_hooks_consistent`: the model's hook values fit together as TransformerLens defines them.

- the last block's hook_resid_post, normalised (its scale recomputed) and unembedded, gives the logits;
- each attention pattern's rows sum to 1 and put no weight on later or padded positions;
- the per-head results (hook_result) plus b_O add up to hook_attn_out;
- zeroing hook_attn_out / hook_mlp_out through a hook gives the logits the HF model gives with the
  same module's output zeroed.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from fxhook.adapter import get_module
from fxhook.core.hook_names import block_hook
from fxhook.model import HookedTransformer
from fxhook.testing.assertions import Batch, Check, PropertyFailure, as_batch
from fxhook.testing.compare import Difference, Divergence, difference, first_hf_divergence, hf_logits_difference, zeroed
from fxhook.testing.reference import hf_sites, is_processed
from fxhook.testing.tolerance import DEFAULT_FACTOR, tolerance

PROPERTY = "hooks_consistent"


def _fail(detail: str, batch, found: Difference, hook: str, against: str) -> PropertyFailure:
    return PropertyFailure(PROPERTY, detail, batch, found.worst, Divergence(hook, found, against))


def _norm_eps(model: HookedTransformer) -> float:
    norm = get_module(model.hf_model, model.adapter.final_norm)
    for attr in model.adapter.norms.eps_attr:
        if isinstance(getattr(norm, attr, None), float):
            return float(getattr(norm, attr))
    return float(model.cfg.eps)


def check_unembedding(model: HookedTransformer, batch, cache, logits: torch.Tensor, factor: float) -> list[Check]:
    """hook_resid_post of the last block -> final norm (scale recomputed) -> W_U, b_U == logits."""
    cfg, mask = model.cfg, batch.attention_mask
    resid = cache[block_hook(cfg.n_layers - 1, "hook_resid_post")].double()  # [b, p, d_model]
    checks = []
    x = resid
    if "ln_final.hook_scale" in cache:
        layer_norm = model.adapter.norms.kind == "layernorm"
        centred = resid - resid.mean(-1, keepdim=True) if layer_norm else resid
        scale = (centred.pow(2).mean(-1, keepdim=True) + _norm_eps(model)).sqrt()
        found = difference(cache["ln_final.hook_scale"], scale, cfg.n_layers, cfg.dtype, mask, factor=factor)
        if not found.holds:
            raise _fail(f"the final norm's scale (ln_final.hook_scale) is not that of the last hook_resid_post: {found}", batch, found,
                        "ln_final.hook_scale", "sqrt(mean square + eps) of the last resid_post")
        found = difference(cache["ln_final.hook_normalized"], centred / scale, cfg.n_layers, cfg.dtype, mask,
                           factor=factor)
        if not found.holds:
            raise _fail(f"the final norm's output (ln_final.hook_normalized) is not the last hook_resid_post over its scale: {found}", batch,
                        found, "ln_final.hook_normalized", "the last resid_post, normalised by hand")
        checks.append(Check("final norm of resid_post", found))
        x = cache["ln_final.hook_normalized"].double()
        weights = model.live_weights()
        if "ln_final.w" in weights:
            w = weights["ln_final.w"].double()
            x = x * (w + 1 if model.adapter.norms.kind == "rmsnorm_plus_one" else w)
        if "ln_final.b" in weights:
            x = x + weights["ln_final.b"].double()
    expected = x @ model.W_U.double() + model.b_U.double()
    cap = getattr(model.hf_model.config, "final_logit_softcapping", None)
    if cap:
        expected = cap * torch.tanh(expected / cap)
    found = difference(logits, expected, cfg.n_layers, cfg.dtype, mask, factor=factor)
    if not found.holds:
        raise _fail(f"the last resid_post, through the final norm and W_U, does not give the logits: {found}",
                    batch, found, "ln_final.hook_normalized", "the logits, unembedded by hand")
    checks.append(Check("resid_post -> final norm -> unembed == logits", found))
    return checks


def check_patterns(model: HookedTransformer, batch, cache) -> list[Check]:
    """Rows of every hook_pattern [b, h, q, k] sum to 1 at real query positions; no weight on later
    or padded key positions."""
    cfg, mask = model.cfg, batch.attention_mask.to("cpu").bool()
    length = mask.shape[1]
    later = torch.ones(length, length, dtype=torch.bool).triu(1)  # [q, k]: k after q
    forbidden = later[None, None] | ~mask[:, None, None, :]  # [b, 1, q, k]
    real_rows = mask[:, None, :]  # [b, 1, q]
    sums, leaks = 0.0, 0.0
    for layer in range(cfg.n_layers):
        name = block_hook(layer, "attn.hook_pattern")
        pattern = cache[name].detach().to("cpu", torch.float64)
        tol = tolerance(cfg.dtype, 1)
        row_error = float(((pattern.sum(-1) - 1).abs() * real_rows).max())
        leak = float((pattern.abs() * forbidden * real_rows[..., None]).max())
        if row_error > tol:
            found = Difference(row_error, tol)
            raise _fail(f"rows of {name} do not sum to 1 (off by {found})", batch, found, name, "1")
        if leak > tol:
            found = Difference(leak, tol)
            raise _fail(f"{name} puts weight {leak:.3g} on later or padded positions (not causal)", batch, found,
                        name, "a causal, padding-aware pattern")
        sums, leaks = max(sums, row_error), max(leaks, leak)
    tol = tolerance(cfg.dtype, 1)
    return [Check("pattern rows sum to 1", Difference(sums, tol)), Check("pattern causal", Difference(leaks, tol))]


@contextlib.contextmanager
def _attn_result_on(model: HookedTransformer) -> Iterator[None]:
    """use_attn_result on for the block, back to what it was afterwards."""
    was = model.cfg.use_attn_result
    model.set_use_attn_result(True)
    try:
        yield
    finally:
        model.set_use_attn_result(was)


def check_head_results(model: HookedTransformer, batch, factor: float) -> list[Check]:
    """sum over heads of hook_result + b_O == hook_attn_out (not for norms on the attention output)."""
    norms = model.adapter.norms
    if norms.ln1_post or norms.post_norm:
        return []  # hook_attn_out is normalised after the heads are summed: no sum to compare
    cfg, mask = model.cfg, batch.attention_mask
    with _attn_result_on(model), torch.no_grad():
        names = [block_hook(layer, k) for layer in range(cfg.n_layers) for k in ("attn.hook_result", "hook_attn_out")]
        _, cache = model.run_with_cache(batch.tokens, attention_mask=mask, names_filter=names)
    b_O = model.b_O.double()
    worst = None
    for layer in range(cfg.n_layers):
        total = cache[block_hook(layer, "attn.hook_result")].double().sum(-2) + b_O[layer]
        name = block_hook(layer, "hook_attn_out")
        found = difference(cache[name], total, cfg.n_layers, cfg.dtype, mask, factor=factor)
        if not found.holds:
            raise _fail(f"the heads' hook_result plus b_O do not add up to {name}: {found}", batch, found,
                        block_hook(layer, "attn.hook_result"), f"{name} minus b_O")
        worst = found if worst is None or found.worst > worst.worst else worst
    return [Check("head results sum to attn_out", worst)] if worst is not None else []


def check_ablation(model: HookedTransformer, hf_model: nn.Module, batch, ablate: str, processed: bool,
                   factor: float) -> list[Check]:
    """Zeroing `ablate` through a hook == zeroing the same HF module's output."""
    site = next((s for s in hf_sites(model) if s.hook == ablate and s.kind in ("attn_out", "mlp_out")), None)
    if site is None:
        raise ValueError(f"ablate must be a block's hook_attn_out or hook_mlp_out, got {ablate!r}")
    mask = batch.attention_mask
    with torch.no_grad():
        actual = model.run_with_hooks(batch.tokens, attention_mask=mask,
                                      fwd_hooks=[(ablate, lambda x, hook: torch.zeros_like(x))])
    found = hf_logits_difference(model, hf_model, actual, batch.tokens, mask, processed, factor,
                                 edits={site.module: zeroed})
    if not found.holds:
        raise PropertyFailure(PROPERTY, f"zeroing {ablate} does not match zeroing HF's {site.module}: {found}",
                              batch, found.worst, first_hf_divergence(model, hf_model, batch.tokens, mask,
                                                                      processed, factor, ablate=ablate))
    return [Check(f"zero-ablation of {ablate} == HF", found)]


def assert_hooks_consistent(model: HookedTransformer, tokens: Batch, attention_mask: torch.Tensor | None = None,
                            *, hf_model: nn.Module | None = None, ablate: str | None = None,
                            factor: float = DEFAULT_FACTOR) -> list[Check]:
    """The model's hooks agree with each other and with the logits (see the module docstring).

    hf_model: the reference for the zero-ablation (default: the HF model the fxhook model wraps, whose
    weights it shares). ablate: the hook to zero (default: the last block's hook_mlp_out)."""
    batch = as_batch(model, tokens, attention_mask)
    hf_model = model.hf_model if hf_model is None else hf_model
    cfg = model.cfg
    names = [block_hook(cfg.n_layers - 1, "hook_resid_post")]
    names += [n for n in ("ln_final.hook_scale", "ln_final.hook_normalized") if n in model.hook_dict]
    names += [block_hook(layer, "attn.hook_pattern") for layer in range(cfg.n_layers)]
    with torch.no_grad():
        logits, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask, names_filter=names)
    checks = check_unembedding(model, batch, cache, logits, factor)
    checks += check_patterns(model, batch, cache)
    checks += check_head_results(model, batch, factor)
    ablate = ablate or block_hook(cfg.n_layers - 1, "hook_mlp_out")
    checks += check_ablation(model, hf_model, batch, ablate, is_processed(model, hf_model), factor)
    return checks
