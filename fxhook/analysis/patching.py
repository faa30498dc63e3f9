"""Activation patching: run the corrupted input, put back one piece of the clean run's activation,
and measure how far the output moves back (TransformerLens 3.9's patching module, same names
and result shapes).

    clean_logits, clean_cache = model.run_with_cache(clean_tokens)
    metric = lambda logits: logits[0, -1, paris] - logits[0, -1, rome]        # -> scalar tensor
    results = get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, metric)   # [layer, pos]

Every function measures each index separately, several patches to a forward pass (as copies of
the input along the batch axis), under torch.no_grad and eager even on a compiled model (each
newly hooked point would compile); a tqdm bar shows on sweeps of more than PROGRESS_FROM
patches (progress=True/False to choose). The corrupted input runs once; each forward pass then
computes only what comes after the patched hook (`model.run_from`; reuse_prefix=False recomputes
everything). Attribution patching (every patch estimated at once) and path patching live in
attribution.py and path_patching.py and are importable from here.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import TYPE_CHECKING, Callable, Literal, Sequence

import torch
from tqdm.auto import tqdm

from fxhook.analysis.metric_reads import reads_last_position_only
from fxhook.analysis.patch_runs import CorruptedRun, PatchRun, copies, layer_runs, position_runs
from fxhook.analysis.resume import required_inputs, run_resumed
from fxhook.core import hook_names

if TYPE_CHECKING:
    from fxhook.analysis.cache import ActivationCache
    from fxhook.model import HookedTransformer

AxisName = Literal["layer", "pos", "head_index", "head", "src_pos", "dest_pos"]
Metric = Callable[[torch.Tensor], torch.Tensor]  # logits [batch, pos, d_vocab] -> scalar
PatchSetter = Callable[[torch.Tensor, Sequence[int], torch.Tensor], torch.Tensor]
PROGRESS_FROM = 20


# ------------------------------------------------------------------ setters
# (corrupted activation, index, clean activation) -> patched activation; index[0] is the layer.
def layer_patch_setter(corrupted_activation: torch.Tensor, index: Sequence[int],
                       clean_activation: torch.Tensor) -> torch.Tensor:
    """index = [layer]: the whole activation, every position."""
    return clean_activation.clone()


def layer_pos_patch_setter(corrupted_activation: torch.Tensor, index: Sequence[int],
                           clean_activation: torch.Tensor) -> torch.Tensor:
    """index = [layer, pos], for [batch, pos, ...] activations (residual, outputs, MLP)."""
    _, pos = index
    corrupted_activation[:, pos] = clean_activation[:, pos]
    return corrupted_activation


def layer_pos_head_vector_patch_setter(corrupted_activation: torch.Tensor, index: Sequence[int],
                                       clean_activation: torch.Tensor) -> torch.Tensor:
    """index = [layer, pos, head], for [batch, pos, head, d_head] activations (q, k, v, z)."""
    _, pos, head = index
    corrupted_activation[:, pos, head] = clean_activation[:, pos, head]
    return corrupted_activation


def layer_head_vector_patch_setter(corrupted_activation: torch.Tensor, index: Sequence[int],
                                   clean_activation: torch.Tensor) -> torch.Tensor:
    """index = [layer, head], every position, for [batch, pos, head, d_head] activations."""
    _, head = index
    corrupted_activation[:, :, head] = clean_activation[:, :, head]
    return corrupted_activation


def layer_head_pattern_patch_setter(corrupted_activation: torch.Tensor, index: Sequence[int],
                                    clean_activation: torch.Tensor) -> torch.Tensor:
    """index = [layer, head], for [batch, head, dest_pos, src_pos] patterns and scores."""
    _, head = index
    corrupted_activation[:, head] = clean_activation[:, head]
    return corrupted_activation


def layer_head_pos_pattern_patch_setter(corrupted_activation: torch.Tensor, index: Sequence[int],
                                        clean_activation: torch.Tensor) -> torch.Tensor:
    """index = [layer, head, dest_pos]: one query row of a pattern."""
    _, head, dest = index
    corrupted_activation[:, head, dest] = clean_activation[:, head, dest]
    return corrupted_activation


def layer_head_dest_src_pos_pattern_patch_setter(corrupted_activation: torch.Tensor, index: Sequence[int],
                                                 clean_activation: torch.Tensor) -> torch.Tensor:
    """index = [layer, head, dest_pos, src_pos]: one entry of a pattern."""
    _, head, dest, src = index
    corrupted_activation[:, head, dest, src] = clean_activation[:, head, dest, src]
    return corrupted_activation


# setters that change the one position index[1] of a [batch, pos, ...] activation: attention is causal, so
# every position before it keeps the corrupted run's values, and a run recomputes only the positions after
# the earliest patched one (with the earlier ones' keys and values from the corrupted run)
POSITION_SETTERS = frozenset({layer_pos_patch_setter, layer_pos_head_vector_patch_setter})


# ------------------------------------------------------------------ the generic sweep
def _axis_sizes(model, activation_name: str, n_pos: int) -> dict[str, int]:
    heads = model.cfg.n_kv_heads if activation_name in ("k", "v") else model.cfg.n_heads
    return {"layer": model.cfg.n_layers, "pos": n_pos, "src_pos": n_pos, "dest_pos": n_pos,
            "head_index": heads, "head": heads}


def _rows_of(index_df) -> tuple[list[tuple[int, ...]], list[str] | None]:
    """Rows of explicit indices: a pandas DataFrame (columns are axis names) or a list of tuples."""
    if hasattr(index_df, "itertuples"):
        return [tuple(int(v) for v in row) for row in index_df.itertuples(index=False)], list(index_df.columns)
    rows = [tuple(int(v) for v in row) for row in index_df]
    return rows, None


def generic_activation_patch(model: HookedTransformer, corrupted_tokens: torch.Tensor | str,
                             clean_cache: ActivationCache, patching_metric: Metric,
                             patch_setter: PatchSetter, activation_name: str,
                             index_axis_names: Sequence[AxisName] | None = None, index_df=None,
                             return_index_df: bool = False, *, progress: bool | None = None,
                             patches_per_run: int = 8, reuse_prefix: bool = True):
    """The patching metric for every index: [one axis per index_axis_names], or [rows] when the
    indices are given explicitly as index_df (a DataFrame or a list of tuples, layer first).

    patch_setter(corrupted_activation, index, clean_activation) returns the patched activation;
    activation_name is a short name ("resid_pre", "z", "pattern", ...) completed with the layer.
    return_index_df: also return the indices as a pandas DataFrame.
    patches_per_run: patches done in one forward pass, as copies of the input along the batch axis
    (the metric still sees one copy's logits at a time); 1 runs them one by one. A pass holds at most
    patches_per_run copies' worth of positions: a by-position pass that computes only the later
    positions holds proportionally more patches (from consecutive layers; patch_runs.py).
    reuse_prefix: run the corrupted input once, cache what each patched hook's downstream reads, and per
    run compute only the part of the model after the patched hook (`model.run_from`), and for a patch of
    one position (the by-position sweeps) only the positions from it on, and for a metric that reads the
    last position only (metric_reads.py) the final norm and unembedding of that position alone (the metric
    gets NaN at the others; a pass whose metric is then NaN is recomputed whole); False recomputes the
    whole forward for every run (the same results, slower).
    """
    if isinstance(corrupted_tokens, str):
        corrupted_tokens = model.to_tokens(corrupted_tokens)
    if (index_axis_names is None) == (index_df is None):
        raise ValueError("pass exactly one of index_axis_names (axes to sweep, e.g. ('layer', 'pos')) and "
                         "index_df (explicit indices)")
    if index_df is None:
        sizes = _axis_sizes(model, activation_name, corrupted_tokens.shape[-1])
        unknown = [a for a in index_axis_names if a not in sizes]
        if unknown:
            raise ValueError(f"unknown axis names {unknown}; known: {sorted(sizes)}")
        columns = list(index_axis_names)
        shape = [sizes[a] for a in columns]
        rows = list(itertools.product(*(range(s) for s in shape)))
    else:
        rows, columns = _rows_of(index_df)
        shape = [len(rows)]
    results = torch.zeros(shape, device=corrupted_tokens.device)
    batch = corrupted_tokens.shape[0]

    length = corrupted_tokens.shape[-1]
    per_run = max(1, int(patches_per_run))
    by_position = reuse_prefix and patch_setter in POSITION_SETTERS
    if by_position:
        runs = position_runs([_in_range(index, length) for index in rows], activation_name, per_run, length)
    else:
        runs = layer_runs(rows, activation_name, per_run)

    def patch(name: str, patches: list[tuple[int, tuple[int, ...]]], first: int):
        """The hook at `name` for the patches of one pass there: (copy of the input, index). The activation
        holds the positions from `first` on, and a patch's position counts from `first`."""
        clean = clean_cache[name][:, first:]

        def hook(activation: torch.Tensor, hook) -> torch.Tensor:
            if activation.shape[1:] != clean.shape[1:] or activation.shape[0] % clean.shape[0]:
                raise ValueError(f"{name}: the corrupted activation has shape {tuple(activation.shape[1:])} per "
                                 f"item but the clean one {tuple(clean.shape[1:])}; clean and corrupted inputs "
                                 "must have the same batch size and number of tokens")
            activation = activation.clone()
            source = clean.to(activation.device)
            for copy, index in patches:
                part = slice(copy * batch, (copy + 1) * batch)
                activation[part] = patch_setter(activation[part], index, source)
            return activation
        return hook

    def hooks_of(run: PatchRun) -> list[tuple[str, Callable]]:
        return [(name, patch(name, patches, run.first)) for name, patches in run.by_hook(activation_name).items()]

    def recomputed(run: PatchRun) -> torch.Tensor:
        """The run's logits [copies * batch, pos, d_vocab] by a whole forward of its copies."""
        n, whole_run = len(run.members), dataclasses.replace(run, first=0)
        return model.run_with_hooks(copies(tokens, n), attention_mask=copies(mask, n), fwd_hooks=hooks_of(whole_run))

    show = len(rows) > PROGRESS_FROM if progress is None else progress
    bar = tqdm(total=len(rows), desc=f"patching {activation_name}", disable=not show)
    with torch.no_grad(), model.graphs.eager():
        tokens, mask = model.input_to_tokens(corrupted_tokens, None, None, None)
        last_only = reuse_prefix and _last_position_suffices(model, tokens, mask, patching_metric)
        resumed_after = by_position or last_only  # passes of the later positions, after the corrupted run's cache
        if resumed_after:
            corrupted_run = CorruptedRun(model, tokens, mask, runs, activation_name, last_only)
        elif reuse_prefix:
            corrupted = _corrupted_inputs(model, tokens, mask, {run.start for run in runs})
        for run in runs:
            n = len(run.members)
            if resumed_after:
                with model.hooks(hooks_of(run)):
                    after = corrupted_run.logits_after(run)
            elif not reuse_prefix:
                after = recomputed(run)
            else:
                with model.hooks(hooks_of(run)):
                    needed = required_inputs(model, frozenset([run.start]))
                    values = {name: copies(corrupted[name], n) for name in needed}
                    after, _, _ = run_resumed(model, frozenset([run.start]), values, copies(tokens, n), copies(mask, n))
            per_copy = after.split(batch)  # [batch, pos, d_vocab] each
            if resumed_after:
                per_copy = [corrupted_run.whole(logits, run.first) for logits in per_copy]
            measured = [float(patching_metric(logits)) for logits in per_copy]
            if last_only and any(math.isnan(value) for value in measured):
                # the metric read a position it was given NaN at (its reads depend on the values): recompute
                measured = [float(patching_metric(logits)) for logits in recomputed(run).split(batch)]
            for (number, index), value in zip(run.members, measured):
                results[index if index_df is None else number] = value
            bar.update(n)
    bar.close()
    if not return_index_df:
        return results
    import pandas as pd

    return results, pd.DataFrame(rows, columns=columns)


def _last_position_suffices(model: HookedTransformer, tokens: torch.Tensor, mask: torch.Tensor, metric: Metric
                            ) -> bool:
    """Whether passes may unembed the last position only: the metric reads nothing else (probed on the
    corrupted run's logits: metric_reads.py) and no hook is live on the final norm or the unembedding."""
    if any(hook_names.after_blocks(name) for name in model.live_hooks()):
        return False
    return reads_last_position_only(metric, model(tokens, attention_mask=mask))


def _in_range(index: tuple[int, ...], length: int) -> tuple[int, ...]:
    """A [layer, pos, ...] index with its position counted from 0 (-1: the last), checked to be in range."""
    if not -length <= index[1] < length:
        raise IndexError(f"patch index {index}: position {index[1]} is out of range for {length} tokens")
    return (index[0], index[1] % length, *index[2:])


def _corrupted_inputs(model: HookedTransformer, tokens: torch.Tensor, mask: torch.Tensor, starts: set[str]
                      ) -> dict[str, torch.Tensor]:
    """One corrupted run keeping every activation that a run resumed from one of `starts` reads."""
    needed: set[str] = set()
    for name in starts:
        needed.update(required_inputs(model, frozenset([name])))
    _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=sorted(needed))
    return dict(cache.items())


# ------------------------------------------------------------------ the usual sweeps
def _sweep(activation_name: str, setter: PatchSetter, axes: tuple[str, ...], what: str):
    def run(model: HookedTransformer, corrupted_tokens: torch.Tensor, clean_cache: ActivationCache,
            patching_metric: Metric, *, index_df=None, return_index_df: bool = False, progress: bool | None = None,
            patches_per_run: int = 8, reuse_prefix: bool = True):
        return generic_activation_patch(model, corrupted_tokens, clean_cache, patching_metric, setter,
                                        activation_name, index_axis_names=None if index_df is not None else axes,
                                        index_df=index_df, return_index_df=return_index_df, progress=progress,
                                        patches_per_run=patches_per_run, reuse_prefix=reuse_prefix)
    run.__doc__ = (f"Patch {what}; returns the metric as [{', '.join(axes)}] (or one value per row of index_df, "
                   f"a DataFrame with columns {list(axes)}; return_index_df also returns the rows).")
    return run


get_act_patch_resid_pre = _sweep("resid_pre", layer_pos_patch_setter, ("layer", "pos"),
                                 "the residual stream entering each block, one position at a time")
get_act_patch_resid_mid = _sweep("resid_mid", layer_pos_patch_setter, ("layer", "pos"),
                                 "the residual stream between attention and MLP, one position at a time")
get_act_patch_attn_out = _sweep("attn_out", layer_pos_patch_setter, ("layer", "pos"),
                                "each attention layer's output, one position at a time")
get_act_patch_mlp_out = _sweep("mlp_out", layer_pos_patch_setter, ("layer", "pos"),
                               "each MLP's output, one position at a time")
get_act_patch_resid_pre_all_pos = _sweep("resid_pre", layer_patch_setter, ("layer",),
                                         "the residual stream entering each block, every position at once")
get_act_patch_attn_out_all_pos = _sweep("attn_out", layer_patch_setter, ("layer",),
                                        "each attention layer's output, every position at once")
get_act_patch_mlp_out_all_pos = _sweep("mlp_out", layer_patch_setter, ("layer",),
                                       "each MLP's output, every position at once")
get_act_patch_attn_head_out_by_pos = _sweep("z", layer_pos_head_vector_patch_setter, ("layer", "pos", "head"),
                                            "each head's output (hook_z) at each position")
get_act_patch_attn_head_q_by_pos = _sweep("q", layer_pos_head_vector_patch_setter, ("layer", "pos", "head"),
                                          "each head's query at each position")
get_act_patch_attn_head_k_by_pos = _sweep("k", layer_pos_head_vector_patch_setter, ("layer", "pos", "head"),
                                          "each key head's key at each position (kv heads under GQA)")
get_act_patch_attn_head_v_by_pos = _sweep("v", layer_pos_head_vector_patch_setter, ("layer", "pos", "head"),
                                          "each value head's value at each position (kv heads under GQA)")
get_act_patch_attn_head_pattern_by_pos = _sweep("pattern", layer_head_pos_pattern_patch_setter,
                                                ("layer", "head_index", "dest_pos"),
                                                "each head's attention pattern, one query position at a time")
get_act_patch_attn_head_pattern_dest_src_pos = _sweep(
    "pattern", layer_head_dest_src_pos_pattern_patch_setter, ("layer", "head_index", "dest_pos", "src_pos"),
    "each single entry of each head's attention pattern")
get_act_patch_attn_head_out_all_pos = _sweep("z", layer_head_vector_patch_setter, ("layer", "head"),
                                             "each head's output (hook_z), every position at once")
get_act_patch_attn_head_q_all_pos = _sweep("q", layer_head_vector_patch_setter, ("layer", "head"),
                                           "each head's query, every position at once")
get_act_patch_attn_head_k_all_pos = _sweep("k", layer_head_vector_patch_setter, ("layer", "head"),
                                           "each key head's key, every position at once")
get_act_patch_attn_head_v_all_pos = _sweep("v", layer_head_vector_patch_setter, ("layer", "head"),
                                           "each value head's value, every position at once")
get_act_patch_attn_head_pattern_all_pos = _sweep("pattern", layer_head_pattern_patch_setter,
                                                 ("layer", "head_index"), "each head's whole attention pattern")


def _pad_heads(results: torch.Tensor, n_heads: int) -> torch.Tensor:
    """k/v sweeps have kv-head columns under GQA: pad with zeros to n_heads, as TransformerLens."""
    return torch.nn.functional.pad(results, (0, n_heads - results.shape[-1]))


def get_act_patch_attn_head_all_pos_every(model: HookedTransformer, corrupted_tokens: torch.Tensor,
                                          clean_cache: ActivationCache, metric: Metric, *,
                                          progress: bool | None = None, reuse_prefix: bool = True) -> torch.Tensor:
    """[5 (z, q, k, v, pattern), layer, head]: every head, every position at once."""
    n = model.cfg.n_heads
    args, options = (model, corrupted_tokens, clean_cache, metric), dict(progress=progress, reuse_prefix=reuse_prefix)
    return torch.stack([get_act_patch_attn_head_out_all_pos(*args, **options),
                        get_act_patch_attn_head_q_all_pos(*args, **options),
                        _pad_heads(get_act_patch_attn_head_k_all_pos(*args, **options), n),
                        _pad_heads(get_act_patch_attn_head_v_all_pos(*args, **options), n),
                        get_act_patch_attn_head_pattern_all_pos(*args, **options)])


def get_act_patch_attn_head_by_pos_every(model: HookedTransformer, corrupted_tokens: torch.Tensor,
                                         clean_cache: ActivationCache, metric: Metric, *,
                                         progress: bool | None = None, reuse_prefix: bool = True) -> torch.Tensor:
    """[5 (z, q, k, v, pattern), layer, pos, head]: every head at every (query) position."""
    n = model.cfg.n_heads
    args, options = (model, corrupted_tokens, clean_cache, metric), dict(progress=progress, reuse_prefix=reuse_prefix)
    pattern = get_act_patch_attn_head_pattern_by_pos(*args, **options).transpose(-1, -2)  # [layer, dest_pos, head]
    return torch.stack([get_act_patch_attn_head_out_by_pos(*args, **options),
                        get_act_patch_attn_head_q_by_pos(*args, **options),
                        _pad_heads(get_act_patch_attn_head_k_by_pos(*args, **options), n),
                        _pad_heads(get_act_patch_attn_head_v_by_pos(*args, **options), n), pattern])


def get_act_patch_block_every(model: HookedTransformer, corrupted_tokens: torch.Tensor,
                              clean_cache: ActivationCache, metric: Metric, *,
                              progress: bool | None = None, reuse_prefix: bool = True) -> torch.Tensor:
    """[3 (resid_pre, attn_out, mlp_out), layer, pos]."""
    args, options = (model, corrupted_tokens, clean_cache, metric), dict(progress=progress, reuse_prefix=reuse_prefix)
    return torch.stack([get_act_patch_resid_pre(*args, **options), get_act_patch_attn_out(*args, **options),
                        get_act_patch_mlp_out(*args, **options)])


def make_df_from_ranges(column_max_ranges: Sequence[int], column_names: Sequence[str]):
    """A pandas DataFrame with one row per combination of indices, column i running over
    range(column_max_ranges[i]): the index_df of a sweep over those axes."""
    import pandas as pd

    if len(column_max_ranges) != len(column_names):
        raise ValueError(f"{len(column_max_ranges)} ranges for {len(column_names)} column names")
    rows = list(itertools.product(*(range(n) for n in column_max_ranges)))
    return pd.DataFrame(rows, columns=list(column_names))


# ------------------------------------------------------------------ estimates and paths (their own modules)
from fxhook.analysis.attribution import attribution_patch  # noqa: E402, F401  (first-order: every patch at once)
from fxhook.analysis.path_patching import get_path_patch_head_to_receivers, path_patch  # noqa: E402, F401
