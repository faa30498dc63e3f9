"""Activation patching: clean into clean gives the clean metric, a patch that changes nothing gives
the corrupted one, a whole residual stream restores the clean run; and TransformerLens 3.9's
patching functions give the same tensors on the same model."""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fxhook import HookedTransformer
from fxhook.analysis import patching
from fxhook.analysis import patch_runs
from fxhook.analysis.patch_runs import layer_runs, position_runs
from fxhook.analysis.resume import run_resumed_after
from family_models import OTHER_FAMILIES, build_any_model, specs_of
from models import NO_SHRINK, VOCAB, ModelSpec, build_hf_model, model_specs
from tl_reference import tl_model
from profiles import examples


def prompts(length: int, seed: int, n_changed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean, corrupted) [1, length]: the corrupted one differs in its first n_changed tokens."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(2, VOCAB, (1, length), generator=g)
    corrupted = clean.clone()
    corrupted[0, :n_changed] = (clean[0, :n_changed] + 1 + torch.randint(0, 50, (n_changed,), generator=g)) % VOCAB
    return clean, corrupted


def metric_for(answer: int, wrong: int):
    return lambda logits: logits[0, -1, answer] - logits[0, -1, wrong]


@settings(max_examples=examples(3), phases=NO_SHRINK)
@given(spec=model_specs(), length=st.integers(3, 6), data=st.data())
def test_patching_properties(spec, length, data):
    model = HookedTransformer.from_pretrained_no_processing(hf_model=build_hf_model(spec))
    clean, corrupted = prompts(length, spec.seed, data.draw(st.integers(1, length - 1)))
    metric = metric_for(3, 4)
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean)
        corrupted_logits, corrupted_cache = model.run_with_cache(corrupted)
    clean_value, corrupted_value = metric(clean_logits).item(), metric(corrupted_logits).item()
    n_layers, n_heads, n_kv = model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_kv_heads

    def all_equal(results: torch.Tensor, value: float) -> bool:
        return bool(torch.allclose(results, torch.full_like(results, value), atol=1e-4))

    # the clean activation patched into the clean run: the clean metric, whatever is patched
    for sweep, shape in ((patching.get_act_patch_resid_pre, (n_layers, length)),
                         (patching.get_act_patch_attn_head_out_all_pos, (n_layers, n_heads)),
                         (patching.get_act_patch_attn_head_k_all_pos, (n_layers, n_kv)),
                         (patching.get_act_patch_attn_head_pattern_all_pos, (n_layers, n_heads))):
        results = sweep(model, clean, clean_cache, metric)
        assert results.shape == shape and all_equal(results, clean_value), sweep.__name__

    # a patch that changes nothing leaves the corrupted metric
    keep = patching.generic_activation_patch(model, corrupted, clean_cache, metric,
                                             lambda corrupted_act, index, clean_act: corrupted_act, "mlp_out",
                                             index_axis_names=("layer", "pos"))
    assert all_equal(keep, corrupted_value)
    # the clean run's own activation is no change either: layer-0 positions whose token is the same
    by_pos = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
    same = (clean[0] == corrupted[0]).nonzero()[:, 0]
    assert all_equal(by_pos[0, same], corrupted_value)
    # the whole clean residual stream entering any block restores the clean metric
    assert all_equal(patching.get_act_patch_resid_pre_all_pos(model, corrupted, clean_cache, metric), clean_value)
    # the corrupted cache patched into the corrupted run changes nothing
    assert all_equal(patching.get_act_patch_mlp_out_all_pos(model, corrupted, corrupted_cache, metric),
                     corrupted_value)


@pytest.fixture(scope="module")
def pair():
    spec = ModelSpec("llama", 2, 4, 2, 8, 40, False, False, 5)  # GQA: k/v sweeps have 2 heads
    hf = build_hf_model(spec, tl_compatible=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = HookedTransformer.from_pretrained(hf_model=hf, center_writing_weights=False)
        theirs = tl_model(hf, fold_ln=True, center_unembed=True, fold_value_biases=True)
    return ours, theirs


@pytest.mark.parametrize("name", ["get_act_patch_resid_pre", "get_act_patch_attn_head_k_by_pos",
                                  "get_act_patch_attn_head_pattern_by_pos", "get_act_patch_attn_head_all_pos_every",
                                  "get_act_patch_block_every"])
def test_matches_transformer_lens(pair, name):
    import transformer_lens.patching as tl_patching

    ours, theirs = pair
    clean, corrupted = prompts(5, 1, 2)
    metric = metric_for(3, 4)
    with torch.no_grad():
        _, our_cache = ours.run_with_cache(clean)
        _, their_cache = theirs.run_with_cache(clean)
    mine = getattr(patching, name)(ours, corrupted, our_cache, metric, progress=False)
    expected = getattr(tl_patching, name)(theirs, corrupted, their_cache, metric)
    assert mine.shape == expected.shape
    assert torch.allclose(mine, expected, atol=1e-4)


def test_explicit_indices_progress_and_errors(pair, capfd):
    model, _ = pair
    clean, corrupted = prompts(4, 2, 1)
    metric = metric_for(3, 4)
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
    grid, index_df = patching.generic_activation_patch(
        model, corrupted, cache, metric, patching.layer_pos_head_vector_patch_setter, "z",
        index_axis_names=("layer", "pos", "head"), return_index_df=True, progress=True)
    assert "patching z" in capfd.readouterr().err  # the progress bar
    assert list(index_df.columns) == ["layer", "pos", "head"] and len(index_df) == grid.numel()
    rows = [(1, 3, 2), (0, 1, 0)]
    picked = patching.generic_activation_patch(model, corrupted, cache, metric,
                                               patching.layer_pos_head_vector_patch_setter, "z", index_df=rows)
    assert torch.allclose(picked, torch.stack([grid[1, 3, 2], grid[0, 1, 0]]))
    patching.get_act_patch_attn_out(model, corrupted, cache, metric)  # 8 runs: no bar by default
    assert "patching" not in capfd.readouterr().err
    # a compiled model sweeps eager (a backend that does not exist would fail on first use), and stays compiled
    model.compile(backend="no_such_backend")
    try:
        assert torch.allclose(patching.get_act_patch_attn_out(model, corrupted, cache, metric),
                              patching.get_act_patch_attn_out(model, corrupted, cache, metric, patches_per_run=1))
        assert model.is_compiled
    finally:
        model.compile(False)
    with pytest.raises(ValueError, match="same batch size and number of tokens"):
        patching.get_act_patch_resid_pre(model, corrupted[:, :3], cache, metric)
    with pytest.raises(ValueError, match="exactly one of"):
        patching.generic_activation_patch(model, corrupted, cache, metric, patching.layer_pos_patch_setter,
                                          "resid_pre")


# the three "..._every" functions stack these sweeps (passing reuse_prefix on) and are checked against
# TransformerLens above
SWEEPS = sorted(name for name in dir(patching) if name.startswith("get_act_patch_") and not name.endswith("_every"))


def test_reusing_the_prefix_equals_full_recomputation(pair, per_run=3):
    """Every sweep, run from the patched hook on (the corrupted run cached once; by-position sweeps from the
    patched position on, layers packed) or recomputed whole: equal, on a GQA model with a batch of two, for
    a metric that reads every position's logits (3 patches a pass: several passes per layer, packed ones too)."""
    model, _ = pair
    clean, corrupted = prompts(6, 3, 3)
    clean, corrupted = clean.repeat(2, 1), corrupted.repeat(2, 1)
    metric = lambda logits: (logits[:, -1, 3] - logits[:, -1, 4]).mean() + 0.1 * logits[:, :, 5].sum()  # noqa: E731
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
    built = model.graphs.built
    assert len(SWEEPS) == 18
    for name in SWEEPS:
        sweep = getattr(patching, name)
        reused = sweep(model, corrupted, cache, metric, progress=False, patches_per_run=per_run)
        full = sweep(model, corrupted, cache, metric, progress=False, reuse_prefix=False)
        assert reused.shape == full.shape and torch.allclose(reused, full, atol=1e-5), name
    assert model.graphs.built > built  # the resumed graphs were built and used
    assert not model.live_hooks()


LAST_ONLY_SWEEPS = ("get_act_patch_resid_pre", "get_act_patch_attn_head_out_all_pos",
                    "get_act_patch_attn_head_v_by_pos", "get_act_patch_attn_head_pattern_all_pos",
                    "get_act_patch_mlp_out_all_pos")


def test_last_position_metric(pair, monkeypatch, per_run=3):
    """A metric that reads the last position only: every pass (by-position and all-position sweeps) unembeds
    that position alone and the sweeps equal full recomputation. A metric whose reads depend on the values (an
    earlier position once a patch moves the last logit) is given NaN there: those passes are recomputed whole,
    with the same results as full recomputation."""
    model, _ = pair
    clean, corrupted = prompts(6, 3, 3)
    clean, corrupted = clean.repeat(2, 1), corrupted.repeat(2, 1)
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
        threshold = float(model(corrupted)[0, -1, 3])
    positions_computed = []

    def spy(*args, **kwargs):
        logits = run_resumed_after(*args, **kwargs)
        positions_computed.append(logits.shape[1])
        return logits
    monkeypatch.setattr(patch_runs, "run_resumed_after", spy)
    metric = lambda logits: (logits[:, -1, 3] - logits[:, -1, 4]).mean()  # noqa: E731
    for name in LAST_ONLY_SWEEPS:
        sweep = getattr(patching, name)
        reused = sweep(model, corrupted, cache, metric, progress=False, patches_per_run=per_run)
        full = sweep(model, corrupted, cache, metric, progress=False, reuse_prefix=False)
        assert torch.allclose(reused, full, atol=1e-5), name
    assert positions_computed and set(positions_computed) == {1}

    branches = []

    def shifting(logits: torch.Tensor) -> torch.Tensor:
        moved = bool(abs(logits[0, -1, 3] - threshold) > 1e-4)
        branches.append((moved, bool(logits[0, 0, 3].isnan())))
        return logits[0, 0, 3] if moved else logits[0, -1, 3]
    for name in ("get_act_patch_resid_pre", "get_act_patch_attn_head_out_all_pos"):
        sweep = getattr(patching, name)
        reused = sweep(model, corrupted, cache, shifting, progress=False, patches_per_run=per_run)
        full = sweep(model, corrupted, cache, shifting, progress=False, reuse_prefix=False)
        assert not reused.isnan().any() and torch.allclose(reused, full, atol=1e-5), name
    assert (True, True) in branches  # an earlier position was read where NaN: that pass was recomputed
    assert not model.live_hooks()


@pytest.mark.parametrize("family", OTHER_FAMILIES)
@settings(max_examples=examples(1), phases=NO_SHRINK)
@given(data=st.data())
def test_last_position_sweeps_in_every_family(family, data):
    """The families test_patching_properties does not draw (parallel blocks, partial rotary, soft caps,
    sliding windows, post-norms, experts): a last-position metric's sweeps, whose passes run the resumed
    decode graph that unembeds the last position only, equal full recomputation."""
    spec = data.draw(specs_of(family), label="spec")
    model = HookedTransformer.from_pretrained_no_processing(hf_model=build_any_model(spec))
    clean, corrupted = prompts(5, spec.seed, 2)
    metric = metric_for(3, 4)
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
    for name in LAST_ONLY_SWEEPS:
        sweep = getattr(patching, name)
        reused = sweep(model, corrupted, cache, metric, progress=False, patches_per_run=3)
        full = sweep(model, corrupted, cache, metric, progress=False, reuse_prefix=False)
        assert torch.allclose(reused, full, atol=1e-5), name


def test_position_runs_plan():
    """By-position passes: every patch once; a pass starts at its lowest layer and first position, packs only
    consecutive layers' groups of the same positions, and holds at most per_run x length rows; a sweep of
    GPT-2-small's shape (12 layers, 12 positions, 12 heads) needs at most 2 graphs per layer."""
    length, per_run = 6, 4
    rows = [(layer, pos) for layer in range(3) for pos in range(length)]
    runs = position_runs(rows, "resid_pre", per_run, length)
    assert sorted(number for run in runs for number, _ in run.members) == list(range(len(rows)))
    for run in runs:
        layers = sorted({index[0] for _, index in run.members})
        assert run.start == f"blocks.{layers[0]}.hook_resid_pre" and layers == list(range(layers[0], layers[-1] + 1))
        assert run.first == min(index[1] for _, index in run.members)
        assert len(run.members) * (length - run.first) <= per_run * length
        by_hook = run.by_hook("resid_pre")
        assert sorted(by_hook) == [f"blocks.{layer}.hook_resid_pre" for layer in layers]
        for patches in by_hook.values():  # copy i patches members[i], its position counted from the pass's first
            assert all(shifted[1] == run.members[copy][1][1] - run.first for copy, shifted in patches)
    # positions 4 and 5 (2 copies x 2 positions per layer) pack all three layers into one pass
    tail = [run for run in runs if run.first == 4]
    assert len(tail) == 1 and len(tail[0].members) == 6 and tail[0].start == "blocks.0.hook_resid_pre"
    # positions 0..3: 4 copies x 6 positions fill a pass: one per layer
    assert sorted(run.start for run in runs if run.first == 0) == [f"blocks.{layer}.hook_resid_pre" for layer in range(3)]
    assert layer_runs(rows, "resid_pre", per_run)[0].first == 0
    # all-position passes: a layer's remainder shares a pass with the next layer's first patches (12 heads, 8 a
    # pass: 3 passes per 2 layers), never more than 2 layers in a pass
    heads = list(itertools.product(range(12), range(12)))
    runs = layer_runs(heads, "z", 8)
    assert sorted(number for run in runs for number, _ in run.members) == list(range(len(heads)))
    assert len(runs) == 18 and all(len(run.members) == 8 for run in runs)
    for run in runs:
        layers = sorted({index[0] for _, index in run.members})
        assert run.start == f"blocks.{layers[0]}.attn.hook_z" and layers in ([layers[0]], [layers[0], layers[0] + 1])
    assert len({(run.start, frozenset(run.by_hook("z"))) for run in runs}) <= 2 * 12
    assert len(layer_runs([(layer, 0) for layer in (0, 1, 2, 5)], "z", 8)) == 3  # layers 0-1, 2, 5
    for sweep_rows in (list(itertools.product(range(12), range(12))), list(itertools.product(range(12), range(12), range(12)))):
        runs = position_runs(sweep_rows, "z", 8, 12)
        assert sorted(number for run in runs for number, _ in run.members) == list(range(len(sweep_rows)))
        assert len({(run.start, frozenset(run.by_hook("z"))) for run in runs}) <= 2 * 12
        assert len(runs) < len(layer_runs(sweep_rows, "z", 8))  # packed
